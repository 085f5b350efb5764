"""Continuous batching on the engine thread: one running decode batch per model set.

A job that decodes is a generator: it prepares its rows, then yields a `BatchWork` and gets the
rows' outputs back (None when the job was cancelled meanwhile) once every row has ended. The
scheduler admits works into the running batch of their `key` at the next step boundary (those
joining a running batch together: one prefill forward, one cache join), steps every batch once
per engine loop, forwards each event to the work's handler, and hands finished works back to the
engine to resume their jobs. Jobs that are plain functions (merges, training steps)
run whole between steps, so a running batch never sees weights a merge changed: it is paused
while they run.

Admission (at step boundaries, interactive works before background ones, first come first served
within each): a work joins when its key's batch can be re-padded, has rows to spare
(`max_rows`) and tokens to spare (`max_tokens`: rows x the longest prompt + max_new_tokens of any
row, the padded width the caches can reach), and when the prompt tokens prefilled since the last
step leave room (`max_prefill_tokens`), so a flood of new requests cannot stall the rows already
decoding. An empty batch takes any one work. A step that runs out of memory fails the request
admitted last (the rest go on) and lowers `max_tokens` to what the batch then holds.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lda import DecodeConfig, Row, RowOutput
from lda.decode import RowFailed, RunningBatch, distinct_prompts

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
    # Filled by the scheduler: seconds prefilling this work's prompts, then decoding its rows.
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def width(self) -> int:
        """Cache positions a row of this work can reach: its longest prompt + max_new_tokens."""
        return max(len(r.prompt_ids) for r in self.rows) + self.config.max_new_tokens

    @property
    def prompt_tokens(self) -> int:
        """Tokens its prefill computes (each distinct prompt once)."""
        return sum(map(len, distinct_prompts(self.rows)[0]))


@dataclass
class InFlight:
    job: Any
    resume: Any  # the job's generator
    work: BatchWork
    outputs: list[RowOutput | None] = field(default_factory=list)
    left: int = 0
    decoding_since: float = 0.0

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.work.rows)
        self.left = len(self.work.rows)


class Scheduler:
    """Running batches by key, works waiting for room, and what each step finished."""

    def __init__(self, max_rows: int, max_tokens: int | None = None, max_prefill_tokens: int | None = None) -> None:
        self.max_rows = max_rows
        self.max_tokens = max_tokens  # None: rows alone bound a batch
        self.max_prefill_tokens = max_prefill_tokens  # None: every waiting work may join at once
        self.batches: dict[Hashable, RunningBatch] = {}
        self.waiting: deque[InFlight] = deque()  # interactive works, in arrival order
        self.background: deque[InFlight] = deque()  # experiment chunks: after every interactive one
        self.admitted: dict[int, InFlight] = {}  # id(InFlight) -> it, the ticket of its rows
        self.warned: set[Hashable] = set()  # keys whose caches cannot be re-padded (logged once)
        self.prefilled = 0  # prompt tokens prefilled since the last step

    @property
    def busy(self) -> bool:
        return bool(self.batches or self.waiting or self.background)

    @property
    def jobs(self) -> int:
        return len(self.admitted) + len(self.waiting) + len(self.background)

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def submit(self, job: Any, resume: Any, work: BatchWork) -> None:
        """Queue a work; it joins its batch at the next step (with every work queued by then)."""
        item = InFlight(job, resume, work)
        (self.background if getattr(job, "background", False) else self.waiting).append(item)

    def padded_tokens(self, key: Hashable, extra: Sequence[BatchWork] = ()) -> int:
        """The bound on the batch's cache positions: its rows (plus `extra`'s) x the widest width."""
        works = [i.work for i in self.admitted.values() if i.work.key == key] + list(extra)
        batch = self.batches.get(key)
        rows = (len(batch) if batch is not None else 0) + sum(len(w.rows) for w in extra)
        return rows * max((w.width for w in works), default=0)

    def _room(self, item: InFlight, joining: list[BatchWork]) -> bool:
        """Whether the work may join its batch now, beside the works `joining` it at this boundary
        (an empty batch takes any one work)."""
        key, batch = item.work.key, self.batches.get(item.work.key)
        if self.prefilled and self.max_prefill_tokens is not None and (self.rows or joining):
            if self.prefilled + item.work.prompt_tokens > self.max_prefill_tokens:
                return False  # the rows decoding get their step first
        if batch is None or not batch:
            return True  # (`_admit` starts an empty batch with one work alone)
        if not batch.can_join:
            if key not in self.warned:
                self.warned.add(key)
                log.warning(
                    "this model's KV caches cannot be re-padded (sliding-window or linear attention): "
                    "its requests decode one at a time, not in a shared batch"
                )
            return False
        works = joining + [item.work]
        if len(batch) + sum(len(w.rows) for w in works) > self.max_rows:
            return False
        return self.max_tokens is None or self.padded_tokens(key, works) <= self.max_tokens

    def _admit(self) -> list[InFlight]:
        """Admit waiting works in order (interactive first) while they fit; the first that does
        not fit stops admission until the next boundary, so nothing overtakes it. Works joining a
        running batch at one boundary are prefilled together (one forward, one cache join)."""
        failed: list[InFlight] = []
        groups: dict[Hashable, list[InFlight]] = {}
        for queue in (self.waiting, self.background):
            while queue:
                item = queue[0]
                if item.job.cancelled:
                    queue.popleft()
                    item.outputs = None  # type: ignore[assignment]
                    failed.append(item)
                    continue
                group = groups.setdefault(item.work.key, [])
                if not self._room(item, [i.work for i in group]):
                    return failed + self._prefill_groups(groups)
                queue.popleft()
                self.prefilled += item.work.prompt_tokens
                batch = self.batches.get(item.work.key)
                if batch is None or not batch:  # a new batch starts with this work (its caches
                    failed += self._prefill([item])  # decide whether others may join)
                else:
                    group.append(item)
        return failed + self._prefill_groups(groups)

    def _prefill_groups(self, groups: dict[Hashable, list[InFlight]]) -> list[InFlight]:
        return [item for group in groups.values() if group for item in self._prefill(group)]

    def _prefill(self, items: list[InFlight]) -> list[InFlight]:
        """Prefill works of one key into their batch, together; returns those that failed
        (`error` set). If the joint prefill fails, each is tried alone, so a fault stays its own."""
        key = items[0].work.key
        batch = self.batches.get(key) or RunningBatch(items[0].work.make_source, items[0].work.tokenizer)
        started = time.perf_counter()
        try:
            batch.admit_all([(i.work.rows, i.work.config, id(i)) for i in items])
        except Exception as exc:  # noqa: BLE001  (a prefill failed: only its works)
            if len(items) > 1:
                return [f for item in items for f in self._prefill([item])]
            items[0].error = exc  # type: ignore[attr-defined]
            if isinstance(exc, torch.OutOfMemoryError) and batch:
                self._lower_budget(key)
            return items
        finally:
            if batch:
                self.batches[key] = batch
        now = time.perf_counter()
        for item in items:
            item.decoding_since = now
            item.work.prefill_seconds += now - started
            self.admitted[id(item)] = item
        return []

    def _lower_budget(self, key: Hashable) -> None:
        """After an out-of-memory error beside other rows: the batch may hold no more than it holds
        now. (A request that ran out of memory alone says nothing about sharing: MAX_BATCH_TOKENS,
        which chunks each request, is the setting for that.)"""
        held = self.padded_tokens(key)
        if held and (self.max_tokens is None or held < self.max_tokens):
            log.warning("out of memory: a running batch now holds at most %d padded tokens (was %s)",
                        held, self.max_tokens)  # fmt: skip
            self.max_tokens = held

    def _end(self, ticket: int, ended: list[InFlight]) -> InFlight:
        item = self.admitted.pop(ticket)
        item.work.decode_seconds += time.perf_counter() - item.decoding_since
        ended.append(item)
        return item

    def step(self) -> list[InFlight]:
        """Admit what waits, then one decode step of every running batch; returns the works that
        ended (all rows out, cancelled, or failed: `error` set)."""
        self.prefilled = 0
        ended = self._admit()
        for key, batch in list(self.batches.items()):
            for ticket, item in list(self.admitted.items()):
                if item.work.key == key and item.job.cancelled:
                    batch.cancel(ticket)
                    self._end(ticket, ended).outputs = None  # type: ignore[assignment]
            out_of_memory = False
            try:
                for ticket, event in batch.step():
                    item = self.admitted.get(ticket)
                    if item is None:
                        continue
                    if isinstance(event, RowFailed):  # this request alone fails (its rows leave)
                        self._end(ticket, ended).error = event.error  # type: ignore[attr-defined]
                        out_of_memory |= isinstance(event.error, torch.OutOfMemoryError)
                        continue
                    item.work.on_event(event)
                    if isinstance(event, RowOutput):
                        item.outputs[event.row] = event
                        item.left -= 1
                        if item.left == 0:
                            self._end(ticket, ended)
            except Exception as exc:  # noqa: BLE001  (a step failed: every request in this batch fails)
                log.warning("decode step failed for %d requests: %s", len(batch), exc)
                for ticket, item in list(self.admitted.items()):
                    if item.work.key == key:
                        self._end(ticket, ended).error = exc  # type: ignore[attr-defined]
                del self.batches[key]
                continue
            if out_of_memory:
                self._lower_budget(key)
            if not batch:
                del self.batches[key]
        return ended
