"""Background jobs (weight diffs, DIT's interpreter, diffing) on the HTTP side: starting one (the
on-disk job limit, the record, its cancel flag and the asyncio task, kept until it ends), driving it
step by step on the engine (`drive_steps`), and reporting the ones a shutdown cut short.

The records and their store are `lda.jobs`; a kind of job adds a spec (its request schema), a driver
that gives `drive_steps` its start/step/finish callbacks, and a router that calls `start_job`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request

from lda.jobs import JobRecord, JobStore

from app.engine import Job, QueueFullError

log = logging.getLogger(__name__)

# How long background work waits before offering a job to a full engine queue again.
RETRY_FULL_S = 0.2


def start_job(
    request: Request,
    store: JobStore,
    spec: dict[str, Any],
    outputs: list[str],
    cancels: dict[str, threading.Event],
    drive: Callable[[JobRecord, threading.Event], Coroutine[Any, Any, None]],
    limit: int,
    kind: str,
    route: str,
) -> dict[str, str]:
    """Create the record and start `drive(record, cancel)`; a 409 when `limit` jobs are on disk.

    Call it with no await between the caller's checks and here: the limit check and create() run
    without yielding, so two submits cannot both take the last place.
    """
    if len(store) >= limit:
        raise HTTPException(
            409,
            f"{len(store)} {kind} jobs are kept on disk, the limit is {limit} (MAX_WEIGHTDIFF_JOBS, for "
            f"each kind of job): delete finished ones with DELETE {route}/JOB_ID?purge=true",
        )
    record = store.create(spec, outputs)
    run_job_task(request, record, cancels, drive)
    return {"id": record.id, "status": record.status}


def run_job_task(
    request: Request,
    record: JobRecord,
    cancels: dict[str, threading.Event],
    drive: Callable[[JobRecord, threading.Event], Coroutine[Any, Any, None]],
) -> None:
    """Start `drive(record, cancel)` as a task the lifespan cancels at shutdown (a new job, or a
    stopped one resumed); its cancel flag lives in `cancels` while it runs."""
    cancel = cancels[record.id] = threading.Event()
    task = asyncio.create_task(drive(record, cancel))
    tasks: set[asyncio.Task[Any]] = request.app.state.job_tasks
    tasks.add(task)
    # A finished job needs no cancel flag: drop it, so the map holds only jobs still running.
    task.add_done_callback(lambda _: cancels.pop(record.id, None))
    task.add_done_callback(tasks.discard)


async def on_engine(engine: Any, fn: Callable[[Job], Any], background: bool = True) -> Any:
    """Run `fn` as one engine job and return its result.

    Background work waits politely while the queue is full (it is no client's request); an
    interactive job gets the `QueueFullError` at once (a 429).
    """
    while True:
        try:
            return await engine.run(fn, background=background)
        except QueueFullError:
            if not background:
                raise
            await asyncio.sleep(RETRY_FULL_S)


async def drive_steps(
    engine: Any,
    store: JobStore,
    record: JobRecord,
    cancel: threading.Event,
    *,
    start: Callable[[Job], int],
    step: Callable[[Job], None],
    done: Callable[[], bool],
    finish: Callable[..., Any],
    end: Callable[[Job], None] | None = None,
    kind: str = "background",
) -> None:
    """Drive one job from queued to a final status; every state change is saved to `store`.

    `start`, `step`, `end` and a plain `finish` each run as one background engine job, so
    interactive requests run between them:
    - `start` prepares the work and returns the number of steps; the job is then `running`.
    - `step` runs one step and updates the record's progress (saved in the same engine job).
    - Before each step, on the event loop, `done()` ends the loop and a set `cancel` flag makes the
      job `cancelled`: no further step runs.
    - `finish` writes the outputs; the job is then `done`. An `async def` finish is awaited on the
      event loop instead, for outputs that take several engine jobs (it runs them with `on_engine`).
    - `end` runs last whatever happened: it closes what `start` opened.

    An exception in any of them marks the job `failed` with "Type: message"; a job failing never
    takes the server or other jobs down. A cancelled task (shutdown) re-raises: the record stays as
    it was and the lifespan reports it interrupted (`interrupt_active`).

    Args:
        kind: the kind of job, as the log names it ("weight-diff", "interpreter").
    """

    def started(job: Job) -> None:
        total = start(job)
        record.status, record.started, record.total_steps = "running", time.time(), total
        store.save(record)

    def stepped(job: Job) -> None:
        step(job)
        store.save(record)

    def completed(job: Job) -> None:
        record.status, record.finished = "done", time.time()
        store.save(record)

    def finished(job: Job) -> None:  # one engine job: a shutdown meanwhile still finds the job done
        finish(job)
        completed(job)

    try:
        await on_engine(engine, started)
        while not done():
            if cancel.is_set():
                record.status, record.finished = "cancelled", time.time()
                store.save(record)
                return
            await on_engine(engine, stepped)
        if inspect.iscoroutinefunction(finish):
            await finish()
            await on_engine(engine, completed)
        else:
            await on_engine(engine, finished)
    except asyncio.CancelledError:
        raise  # shutdown: the lifespan marks the record interrupted
    except Exception as exc:  # a job failing never takes the server or other jobs down
        log.exception("%s job %s failed", kind, record.id)
        record.status, record.error, record.finished = "failed", f"{type(exc).__name__}: {exc}", time.time()
        store.save(record)  # the driver's live record (not store.fail's copy): `end` below reads it
    finally:
        if end is not None:
            await on_engine(engine, end)


def interrupt_active(store: JobStore) -> list[str]:
    """At shutdown: jobs still queued or running are reported interrupted, never lost."""
    return store.interrupt(lambda r: f"the server shut down at step {r.step}")
