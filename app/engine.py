"""The one worker thread that owns the device.

Route handlers validate, submit a job and await its future (or its event stream); they never
touch torch on the event loop. A bound on everything that waits (jobs not started yet and decode
works not yet in a running batch) makes overload visible at once (429) instead of piling up
latency. Every job gets a cancel flag that long work checks between steps.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.scheduler import Scheduler

log = logging.getLogger(__name__)

_DONE = object()
# While requests decode, background jobs (experiment chunks, weight-diff steps) wait; one runs
# between steps after this many steps, so a steady stream of requests cannot starve them.
BACKGROUND_EVERY = 32
# Jobs started between two decode steps at most (a decoding job's rows then join the batch at the
# next step, within the scheduler's row, token and prefill budgets).
ADMIT_PER_STEP = 64


class QueueFullError(RuntimeError):
    """The engine's queue is full; the client should retry later."""


class Job:
    """A unit of device work plus the way back to the event loop that submitted it."""

    def __init__(
        self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop, stream: bool, background: bool = False
    ) -> None:
        self.fn = fn
        self.background = background
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.events: asyncio.Queue[Any] | None = asyncio.Queue() if stream else None
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def emit(self, item: Any) -> None:
        """Called on the worker thread: hand one streamed item to the event loop."""
        if self.events is not None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:
                self.cancel()

    def _settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
            if self.events is not None:
                self.events.put_nowait(_DONE)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop closed (shutdown): nobody is waiting any more
            pass


class Engine:
    """A bounded FIFO of jobs on a dedicated thread. A plain job runs whole; a generator job hands
    its decode rows to the scheduler's running batches (continuous batching) and resumes when they
    are out, so many requests decode together while plain jobs run between steps."""

    def __init__(
        self,
        queue_size: int,
        on_change: Callable[..., None] | None = None,
        max_batch_rows: int = 256,
        max_batch_tokens: int | None = None,
        max_prefill_tokens: int | None = None,
        before_job: Callable[[], None] | None = None,
    ) -> None:
        # Called on the engine thread before any job's code runs (a job may change the models;
        # decode steps between jobs do not): the compiled decode re-checks its weights then.
        self._before_job = before_job or (lambda: None)
        # Unbounded: `submit` bounds what waits (this queue, the deferred jobs and the scheduler's
        # queued works together) by `queue_size`.
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self.queue_size = queue_size
        self._thread: threading.Thread | None = None
        self._on_change = on_change or (lambda waiting, running, batch_rows=0, batch_tokens_budget=None: None)
        self.running = 0  # requests on the engine: the plain job running plus those in batches
        self.batch_rows = 0  # rows in the running batches
        self._current: Job | None = None
        self.scheduler = Scheduler(max_batch_rows, max_batch_tokens, max_prefill_tokens)
        self._deferred: collections.deque[Job] = collections.deque()  # background jobs held back
        # Jobs submitted and not started yet (queued or deferred), and works the scheduler holds
        # that have not joined a batch: together what `waiting` counts. The first changes under
        # the lock on both threads; the second is published by the engine thread.
        self._lock = threading.Lock()
        self._unstarted = 0
        self._queued_works = 0

    @property
    def waiting(self) -> int:
        """Everything accepted that is not on the device yet (the `lda_num_requests_waiting` gauge)."""
        return self._unstarted + self._queued_works

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, fn: Callable[[Job], Any], stream: bool = False, background: bool = False) -> Job:
        """Queue a job; `background` ones (experiment chunks, training steps) yield to decoding."""
        job = Job(fn, asyncio.get_running_loop(), stream, background)
        with self._lock:
            if self.waiting >= self.queue_size:
                raise QueueFullError(f"the engine queue is full ({self.queue_size} waiting)")
            self._unstarted += 1
            self._queue.put_nowait(job)
        self._publish()
        return job

    async def run(self, fn: Callable[[Job], Any], background: bool = False) -> Any:
        """Submit and await the result; a cancelled await (client gone) cancels the job."""
        job = self.submit(fn, background=background)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    async def stream(self, job: Job) -> AsyncIterator[Any]:
        """Items a streaming job emits, then its result raised or returned via `job.future`."""
        assert job.events is not None
        while True:
            item = await job.events.get()
            if item is _DONE:
                return
            yield item

    def _work(self) -> None:
        stopping = False
        waited = 0  # decode steps the oldest deferred background job has waited
        while True:
            busy = self.scheduler.busy
            if stopping and not busy and not self._deferred:
                return
            started = 0
            # Everything waiting joins before the next step (up to a bound, so decoding goes on):
            # admitting one request per step would leave a full queue waiting that many steps.
            while not stopping and started < ADMIT_PER_STEP:
                try:
                    block = started == 0 and not (self.scheduler.busy or self._deferred)
                    job = self._queue.get(block=block)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True  # drain: work in flight finishes, nothing new starts
                elif job.background and (self.scheduler.busy or self._deferred):
                    self._deferred.append(job)  # interactive decoding goes first
                else:
                    self._start(job)
                    started += 1
            if self._deferred and (not self.scheduler.busy or waited >= BACKGROUND_EVERY):
                self._start(self._deferred.popleft())  # idle, or it waited long enough
                waited = 0
            if self.scheduler.busy:
                for item in self.scheduler.step():
                    self._resume(item.job, item.resume, item)
                waited += bool(self._deferred)
            self._changed()

    def _changed(self) -> None:
        """On the engine thread: publish the counts (other threads read these ints, never the scheduler)."""
        self._queued_works = self.scheduler.queued
        self.running = int(self._current is not None) + len(self.scheduler.admitted)
        self.batch_rows = self.scheduler.rows
        self._publish()

    def _publish(self) -> None:
        self._on_change(self.waiting, self.running, self.batch_rows, self.scheduler.max_tokens)

    def _start(self, job: Job) -> None:
        # Running from here (the engine thread is on it); a generator job's work waits again once
        # it is in the scheduler's queue, counted there (`_resume`).
        with self._lock:
            self._unstarted -= 1
        if job.cancelled:
            job._settle(error=asyncio.CancelledError())
            return
        self._current = job
        self._changed()
        try:
            self._before_job()
            result = job.fn(job)
        except BaseException as exc:  # handed to the awaiting request, never kills the worker
            job._settle(error=exc)
            return
        finally:
            self._current = None
        if inspect.isgenerator(result):
            self._resume(job, result, None)
        else:
            job._settle(result=result)

    def _resume(self, job: Job, gen: Any, item: Any) -> None:
        """Run a generator job to its next BatchWork (queued with the scheduler) or its end."""
        self._current = job
        try:
            self._before_job()
            if item is None:
                work = next(gen)
            elif getattr(item, "error", None) is not None:
                work = gen.throw(item.error)
            else:
                work = gen.send(item.outputs)
            with self._lock:  # its rows wait for a batch from here: counted at once
                self.scheduler.submit(job, gen, work)  # resumed when its rows are out
                self._queued_works = self.scheduler.queued
        except StopIteration as stop:
            job._settle(result=stop.value)
        except BaseException as exc:  # handed to the awaiting request, never kills the worker
            job._settle(error=exc)
        finally:
            self._current = None
