"""The experiment CLI: submit a rare-behaviour experiment to a live server, follow it, report it."""

from app.experiment.cli import main

__all__ = ["main"]
