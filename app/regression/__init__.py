"""The regression CLI: fixed prompts against a live server, compared with a saved baseline."""

from app.regression.cli import PROMPTS, main

__all__ = ["PROMPTS", "main"]
