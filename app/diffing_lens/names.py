"""File names inside a diffing job's folder (shared by the driver, the routes and steering)."""

RESULT = "result.json"
TOKEN_STATS = "token_stats.json"
ZIP = "results.zip"
RUN_DIR = "run"  # the toolkit's result layout
