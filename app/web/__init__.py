"""The web page: static files over the public HTTP API (no build step, nothing fetched from elsewhere)."""
