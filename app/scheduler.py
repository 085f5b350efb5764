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
decoding. An empty batch takes any one work. A background work that has waited `promote_after`
steps goes before the interactive ones (which then wait behind it until its rows fit), so a steady
stream of requests cannot starve an experiment.

Out of memory: a step that runs out fails the request admitted last (the rest go on), a joining
prefill that runs out fails its own request; beside other rows, either lowers `max_tokens` to below
the size that failed (never below what the batch holds), and `recover_after` clean steps raise it
again towards the configured value, so one oversized request cannot leave the server decoding one
request at a time for good.
"""

from __future__ import annotations

import itertools
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


# Tickets of the rows in the running batches: unique for the process's life (an `id()` is reused as
# soon as its object is freed, and a reused ticket would make a new request's rows look cancelled).
_tickets = itertools.count()


@dataclass
class InFlight:
    job: Any
    resume: Any  # the job's generator
    work: BatchWork
    outputs: list[RowOutput | None] = field(default_factory=list)
    left: int = 0
    decoding_since: float = 0.0
    queued_step: int = 0  # the scheduler's step count when it was queued
    ticket: int = field(default_factory=lambda: next(_tickets))

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.work.rows)
        self.left = len(self.work.rows)


# Steps a background work waits before it goes ahead of interactive ones.
PROMOTE_AFTER = 32
# Clean decode steps (no out-of-memory error) after which a lowered token budget doubles again.
RECOVER_AFTER = 256
# After an out-of-memory error beside other rows, the budget drops to this fraction of the padded
# tokens that failed: a margin, since activations grow with more than the cache.
BACKOFF = 0.75


class Scheduler:
    """Running batches by key, works waiting for room, and what each step finished."""

    def __init__(
        self,
        max_rows: int,
        max_tokens: int | None = None,
        max_prefill_tokens: int | None = None,
        promote_after: int = PROMOTE_AFTER,
        recover_after: int = RECOVER_AFTER,
    ) -> None:
        self.max_rows = max_rows
        self.configured_tokens = max_tokens
        self.max_tokens = max_tokens  # None: rows alone bound a batch; lowered for a while by an OOM
        self.max_prefill_tokens = max_prefill_tokens  # None: every waiting work may join at once
        self.promote_after = promote_after
        self.recover_after = recover_after
        self.batches: dict[Hashable, RunningBatch] = {}
        self.waiting: deque[InFlight] = deque()  # interactive works, in arrival order
        self.background: deque[InFlight] = deque()  # experiment chunks: after the interactive ones
        self.admitted: dict[int, InFlight] = {}  # ticket -> the work whose rows carry it
        self.warned: set[Hashable] = set()  # keys whose caches cannot be re-padded (logged once)
        self.prefilled = 0  # prompt tokens prefilled since the last step
        self.steps = 0  # decode steps so far (the clock of promotion)
        self.clean_steps = 0  # steps since the budget last changed or an OOM happened

    @property
    def busy(self) -> bool:
        return bool(self.batches or self.waiting or self.background)

    @property
    def queued(self) -> int:
        """Works waiting to join a batch."""
        return len(self.waiting) + len(self.background)

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def submit(self, job: Any, resume: Any, work: BatchWork) -> None:
        """Queue a work; it joins its batch at the next step (with every work queued by then)."""
        item = InFlight(job, resume, work, queued_step=self.steps)
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
        queues = (self.waiting, self.background)
        if self.background and self.steps - self.background[0].queued_step >= self.promote_after:
            queues = (self.background, self.waiting)  # it waited long enough: the rest wait behind it
        for queue in queues:
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
            batch.admit_all([(i.work.rows, i.work.config, i.ticket) for i in items])
        except Exception as exc:  # noqa: BLE001  (a prefill failed: only its works)
            if len(items) > 1:
                return [f for item in items for f in self._prefill([item])]
            items[0].error = exc  # type: ignore[attr-defined]
            if isinstance(exc, torch.OutOfMemoryError) and batch:
                self._lower_budget(key, items[0].work)
            return items
        finally:
            if batch:
                self.batches[key] = batch
        now = time.perf_counter()
        for item in items:
            item.decoding_since = now
            item.work.prefill_seconds += now - started
            self.admitted[item.ticket] = item
        return []

    def _lower_budget(self, key: Hashable, failed: BatchWork) -> None:
        """After `failed` ran out of memory beside other rows: the batch may hold less than the
        padded tokens that failed (those it holds now plus `failed`'s), by a margin, but never less
        than it holds now. (A request that ran out of memory alone says nothing about sharing:
        MAX_BATCH_TOKENS, which chunks each request, is the setting for that.)"""
        held = self.padded_tokens(key)
        if not held:
            return
        budget = max(held, int(self.padded_tokens(key, [failed]) * BACKOFF))
        self.clean_steps = 0
        if self.max_tokens is None or budget < self.max_tokens:
            self._set_budget(budget, "out of memory")

    def _recover_budget(self) -> None:
        """Every `recover_after` clean steps a lowered budget doubles, up to the configured one."""
        if self.max_tokens == self.configured_tokens or self.clean_steps < self.recover_after:
            return
        self.clean_steps = 0
        doubled = 2 * self.max_tokens  # type: ignore[operator]
        configured = self.configured_tokens
        self._set_budget(doubled if configured is None or doubled < configured else configured, "recovered")

    def _set_budget(self, budget: int | None, why: str) -> None:
        log.warning("%s: a running batch now holds at most %s padded tokens (was %s, configured %s)",
                    why, budget, self.max_tokens, self.configured_tokens)  # fmt: skip
        self.max_tokens = budget

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
        self.steps += 1
        for key, batch in list(self.batches.items()):
            for ticket, item in list(self.admitted.items()):
                if item.work.key == key and item.job.cancelled:
                    batch.cancel(ticket)
                    self._end(ticket, ended).outputs = None  # type: ignore[assignment]
            out_of_memory: list[InFlight] = []  # works the step failed for lack of memory
            try:
                for ticket, event in batch.step():
                    item = self.admitted.get(ticket)
                    if item is None:
                        continue
                    if isinstance(event, RowFailed):  # this request alone fails (its rows leave)
                        self._end(ticket, ended).error = event.error  # type: ignore[attr-defined]
                        if isinstance(event.error, torch.OutOfMemoryError):
                            out_of_memory.append(item)
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
            for item in out_of_memory:
                self._lower_budget(key, item.work)
            if not batch:
                del self.batches[key]
        if self.batches:
            self.clean_steps += 1
            self._recover_budget()
        return ended


class _Alone:
    """The job `run_alone` drives: never cancelled, queued as background work."""

    cancelled = False
    background = True


def run_alone(steps: Any, scheduler: Scheduler) -> Any:
    """Drive one generator job (what a server's engine job returns) to its end on this thread,
    with `scheduler` to itself: offline pipelines (`app.batch`) decode through the same running
    batches as the server, with no engine and no other request beside them."""
    job = _Alone()
    try:
        work = next(steps)
        while True:
            scheduler.submit(job, steps, work)
            ended: list[InFlight] = []
            while not ended:
                ended = scheduler.step()
            error = getattr(ended[0], "error", None)
            work = steps.throw(error) if error is not None else steps.send(ended[0].outputs)
    except StopIteration as stop:
        return stop.value
