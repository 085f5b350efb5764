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
from app.engine import Job, QueueFullError


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


class StreamSlot:
    """One of the `MAX_CONCURRENT_STREAMS` slots, held from the moment a stream is accepted.

    Released exactly once, whichever comes first: the stream ends, the client leaves mid-stream, or
    the response is torn down before its body ever ran (a client that disconnects before the first
    byte never starts the body generator, so its `finally` cannot be the only place that releases).
    """

    def __init__(self, state: Any, job: Job) -> None:
        self._state, self._job, self._held = state, job, True
        state.open_streams += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._job.cancel()  # the engine stops at the next token instead of decoding for nobody
            # Nobody may ever await the result now: mark its exception as seen so asyncio stays quiet.
            self._job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._state.open_streams -= 1


class EngineStream(StreamingResponse):
    """An SSE response that releases its slot however the response ends."""

    def __init__(self, body: AsyncIterator[str], slot: StreamSlot) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def stream_response(request: Request, job_fn: Any, t0: float, usage: Usage, route: str) -> StreamingResponse:
    """Submit a streaming job and answer with its SSE stream, within the open-stream limit."""
    limit = get_settings(request).max_concurrent_streams
    if request.app.state.open_streams >= limit:
        raise QueueFullError(f"too many open streams ({limit}); retry later or use stream=false")
    job = get_engine(request).submit(job_fn, stream=True)
    slot = StreamSlot(request.app.state, job)
    return EngineStream(_sse(request, job, slot, t0, usage, route), slot)


def _sse_event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(
    request: Request, job: Job, slot: StreamSlot, t0: float, usage: Usage, route: str
) -> AsyncIterator[str]:
    """Token events as they are sampled, then one `result` (or `error`) event."""
    engine = get_engine(request)
    try:
        async for item in engine.stream(job):
            yield _sse_event("token", item)
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
        slot.release()
