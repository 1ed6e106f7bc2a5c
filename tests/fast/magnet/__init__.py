"""magnet's patterns and failure behaviour on L{magnet.testing} (no broker, no reactor)."""
