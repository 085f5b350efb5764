"""Continuous batching on the engine thread: one running decode batch per model set.

A job that decodes is a generator: it prepares its rows, then yields a `BatchWork` and gets the
rows' outputs back (None when the job was cancelled meanwhile) once every row has ended. The
scheduler admits each work into the running batch of its `key` at a step boundary (when the batch
has room and its caches can be re-padded), steps every batch once per engine loop, forwards each
event to the work's handler, and hands finished works back to the engine to resume their jobs.
Jobs that are plain functions (merges, training steps, experiment chunks) run whole between steps,
so a running batch never sees weights a merge changed: it is paused while they run.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from lda import DecodeConfig, Row, RowOutput
from lda.decode import RowFailed, RunningBatch

log = logging.getLogger(__name__)


@dataclass
class BatchWork:
    """Rows a job hands to the running batch of `key` (same models, same tokenizer, same source)."""

    key: Hashable
    make_source: Callable[[], Any]
    tokenizer: Any
    rows: list[Row]
    config: DecodeConfig
    on_event: Callable[[Any], None] = lambda event: None  # on the engine thread, for every event


@dataclass
class InFlight:
    job: Any
    resume: Any  # the job's generator
    work: BatchWork
    outputs: list[RowOutput | None] = field(default_factory=list)
    left: int = 0

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.work.rows)
        self.left = len(self.work.rows)


class Scheduler:
    """Running batches by key, works waiting for room, and what each step finished."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.batches: dict[Hashable, RunningBatch] = {}
        self.waiting: deque[InFlight] = deque()
        self.admitted: dict[int, InFlight] = {}  # id(InFlight) -> it, the ticket of its rows
        self.warned: set[Hashable] = set()  # keys whose caches cannot be re-padded (logged once)

    @property
    def busy(self) -> bool:
        return bool(self.batches or self.waiting)

    @property
    def jobs(self) -> int:
        return len(self.admitted) + len(self.waiting)

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def submit(self, job: Any, resume: Any, work: BatchWork) -> list[InFlight]:
        """Queue a work; returns works that ended at once (admission errors are raised into them)."""
        self.waiting.append(InFlight(job, resume, work))
        return self._admit()

    def _admit(self) -> list[InFlight]:
        """Admit waiting works in order while they fit; the first that does not fit waits (FIFO)."""
        failed = []
        while self.waiting:
            item = self.waiting[0]
            batch = self.batches.get(item.work.key)
            rows = len(item.work.rows)
            if batch is not None and not batch.can_join:
                if item.work.key not in self.warned:
                    self.warned.add(item.work.key)
                    log.warning(
                        "this model's KV caches cannot be re-padded (sliding-window or linear attention): "
                        "its requests decode one at a time, not in a shared batch"
                    )
                break  # waits for the batch to finish
            if batch is not None and len(batch) + rows > self.max_rows:
                break  # waits for rows to leave
            self.waiting.popleft()
            if item.job.cancelled:
                item.outputs = None  # type: ignore[assignment]
                failed.append(item)
                continue
            batch = batch or RunningBatch(item.work.make_source, item.work.tokenizer)
            try:
                batch.admit(item.work.rows, item.work.config, ticket=id(item))
            except Exception as exc:  # noqa: BLE001  (this work's prefill failed: only it)
                item.error = exc  # type: ignore[attr-defined]
                failed.append(item)
                if batch:
                    self.batches[item.work.key] = batch
                continue
            self.batches[item.work.key] = batch
            self.admitted[id(item)] = item
        return failed

    def step(self) -> list[InFlight]:
        """One decode step of every running batch; returns the works that ended (all rows out,
        cancelled, or failed: `error` set)."""
        ended: list[InFlight] = []
        for key, batch in list(self.batches.items()):
            for ticket, item in list(self.admitted.items()):
                if item.work.key == key and item.job.cancelled:
                    batch.cancel(ticket)
                    item.outputs = None  # type: ignore[assignment]
                    ended.append(self.admitted.pop(ticket))
            try:
                for ticket, event in batch.step():
                    item = self.admitted.get(ticket)
                    if item is None:
                        continue
                    if isinstance(event, RowFailed):  # this request alone fails (its rows leave)
                        item.error = event.error  # type: ignore[attr-defined]
                        ended.append(self.admitted.pop(ticket))
                        continue
                    item.work.on_event(event)
                    if isinstance(event, RowOutput):
                        item.outputs[event.row] = event
                        item.left -= 1
                        if item.left == 0:
                            ended.append(self.admitted.pop(ticket))
            except Exception as exc:  # noqa: BLE001  (a step failed: every request in this batch fails)
                log.warning("decode step failed for %d requests: %s", len(batch), exc)
                for ticket, item in list(self.admitted.items()):
                    if item.work.key == key:
                        item.error = exc  # type: ignore[attr-defined]
                        ended.append(self.admitted.pop(ticket))
                del self.batches[key]
                continue
            if not batch:
                del self.batches[key]
        return ended + self._admit()
