"""What a pipeline process loads once: the settings' model pair and its amplifier (adapters,
amplification configs), as the server's lifespan loads them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import torch

from lda.jobs import JobStore

from app.amplification_lens.amplifier import Amplifier
from app.diffing_lens.steering import Steering, resolve_steer
from app.loader import load_pair
from app.main import setup_amplifier
from app.scheduler import Scheduler
from app.settings import Settings


@dataclass
class Loaded:
    settings: Settings
    pair: Any
    amp: Amplifier

    def steerer(self, body: Any, where: str) -> Steering:
        """An ADL job's steering vector, read from the diffing jobs under DATA_DIR (as the server)."""
        app = SimpleNamespace(state=SimpleNamespace(diffing_jobs=self.diffing_jobs, pair=self.pair))
        return resolve_steer(app, body, where)

    @cached_property
    def diffing_jobs(self) -> JobStore:
        return JobStore(self.settings.data_dir / "diffing_jobs")

    def scheduler(self) -> Scheduler:
        """A scheduler of the server's batch bounds, for one block's decoding."""
        s = self.settings
        return Scheduler(s.max_batch_rows, s.max_batch_tokens, s.max_prefill_tokens)


_cache: dict[str, Loaded] = {}


def load(settings: Settings, threads: int | None = None) -> Loaded:
    """The pair of `settings`, loaded on the first call in this process and kept."""
    if threads:
        torch.set_num_threads(threads)
    key = settings.model_dump_json()
    if key not in _cache:
        pair, demo = load_pair(settings)
        _cache[key] = Loaded(settings, pair, setup_amplifier(pair, demo, settings))
    return _cache[key]
