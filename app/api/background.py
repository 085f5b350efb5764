"""Starting a background training job (weight diffs, DIT's interpreter): the on-disk job limit,
the record, its cancel flag and the asyncio task that drives it, kept until it ends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request

from weightdiff.jobs import JobRecord, JobStore


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
    cancel = cancels[record.id] = threading.Event()
    task = asyncio.create_task(drive(record, cancel))
    tasks: set[asyncio.Task[Any]] = request.app.state.job_tasks
    tasks.add(task)
    # A finished job needs no cancel flag: drop it, so the map holds only jobs still running.
    task.add_done_callback(lambda _: cancels.pop(record.id, None))
    task.add_done_callback(tasks.discard)
    return {"id": record.id, "status": record.status}
