"""The web port: health, metrics, the operator API, the management page."""
