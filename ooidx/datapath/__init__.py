"""The data path: DAP requests by name or URL, through the controller, cache and fetcher."""
