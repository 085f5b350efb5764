"""The tail every generation route shares: run a job on the engine, or stream it as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api.deps import get_engine, get_settings, observe
from app.api.errors import ClientDisconnectedError
from app.api.generation import Usage
from app.engine import QueueFullError


async def run_job(request: Request, fn: Any) -> Any:
    """Run a job on the engine; if the client disconnects meanwhile, cancel it (it stops within one
    decode step, restoring anything it merged) instead of computing for nobody."""
    job = get_engine(request).submit(fn)
    while True:
        done, _ = await asyncio.wait({job.future}, timeout=0.2)
        if done:
            return job.future.result()
        if await request.is_disconnected():
            job.cancel()
            raise ClientDisconnectedError("client disconnected; job cancelled")


def stream_response(request: Request, job_fn: Any, t0: float, usage: Usage, route: str) -> StreamingResponse:
    """Submit a streaming job and answer with its SSE stream, within the open-stream limit."""
    limit = get_settings(request).max_concurrent_streams
    if request.app.state.open_streams >= limit:
        raise QueueFullError(f"too many open streams ({limit}); retry later or use stream=false")
    job = get_engine(request).submit(job_fn, stream=True)
    request.app.state.open_streams += 1
    return StreamingResponse(_sse(request, job, t0, usage, route), media_type="text/event-stream")


def _sse_event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(
    request: Request, job: Any, t0: float, usage: Usage, route: str = "/generate_lda"
) -> AsyncIterator[str]:
    """Token events as they are sampled, then one `result` (or `error`) event."""
    engine = get_engine(request)
    try:
        async for item in engine.stream(job):
            yield _sse_event("token", {k: v for k, v in item.items() if k != "event"})
        try:
            result = await job.future
        except Exception as exc:  # the stream is already 200; report in-band, typed as the JSON errors are
            kind = "invalid_request_error" if isinstance(exc, ValueError) else "internal_error"
            yield _sse_event("error", {"error": {"message": str(exc), "type": kind}})
            return
        if result is not None:
            observe(request, route, t0, usage)
            yield _sse_event("result", result)
    finally:
        job.cancel()  # client gone or stream done: the engine stops at the next token
        request.app.state.open_streams -= 1
