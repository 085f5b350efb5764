"""An experiment kind whose actor stops in one block until the test kills its process (the test
then checks that the restarted actor's retry changes nothing). Pickled by value, so the actors
need not import the tests package."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray.cloudpickle

from app.batch.experiment import ExperimentKind


def victim_kind(pid_file: Path, start: int) -> type[ExperimentKind]:
    class Victim(ExperimentKind):
        def run_block(self, loaded: Any, pins: dict[str, str], block: dict[str, Any]) -> Any:
            if block["start"] == start and not pid_file.exists():  # the first try only
                pid_file.write_text(str(os.getpid()))
                time.sleep(600)  # SIGKILLed here
            return super().run_block(loaded, pins, block)

    return Victim


ray.cloudpickle.register_pickle_by_value(__import__(__name__))
