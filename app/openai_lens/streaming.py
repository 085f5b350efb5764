"""OpenAI's Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`.

The stream is answered only once the job has emitted its first item, which it does after the
prompts are encoded and checked: a bad request is still a 400 with a JSON body, not a 200 stream
carrying an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api.deps import get_engine, get_settings, observe
from app.api.generation import Usage
from app.api.streaming import EngineStream, StreamSlot
from app.engine import QueueFullError
from app.openai_lens.jobs import FINISH, usage_body
from app.openai_lens.logprobs import chat_entry

def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Chunks:
    """Lays out one request's chunks; holds back logprobs of tokens whose text is not out yet."""

    def __init__(self, req: Any, rid: str, created: int, chat: bool) -> None:
        self.req, self.chat = req, chat
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": req.model}  # fmt: skip
        self.pending: dict[int, list[tuple[str, float, list[tuple[str, float]]]]] = {}
        self.offset: dict[int, int] = {}
        self.tokens = 0

    def chunk(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        held = self.pending.pop(index, [])
        logprobs = self._logprobs(index, held) if held else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return _data({**self.head, "choices": [choice]})

    def _logprobs(self, index: int, held: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
        if self.chat:
            return {"content": [chat_entry(t, lp, top[: self.req.top_logprobs or 0]) for t, lp, top in held]}
        offsets = []
        for token, _, _ in held:
            offsets.append(self.offset.get(index, 0))
            self.offset[index] = offsets[-1] + len(token)
        return {
            "tokens": [t for t, _, _ in held],
            "token_logprobs": [lp for _, lp, _ in held],
            "top_logprobs": [{**dict(top), t: lp} for t, lp, top in held],
            "text_offset": offsets,
        }

    def item(self, item: dict[str, Any]) -> str | None:
        """One engine item as a chunk, or None while its text is held back."""
        index = item["choice"]
        if "start" in item:
            if self.chat:
                return self.chunk(index, None, role=True)
            echo = item["start"] if getattr(self.req, "echo", False) else ""
            return self.chunk(index, echo) if echo else None
        if item.get("logprob") is not None:
            self.pending.setdefault(index, []).append(item["logprob"])
        if "finish" in item:
            return self.chunk(index, item["text"], FINISH[item["finish"]])
        return self.chunk(index, item["text"]) if item["text"] else None


async def openai_stream(
    request: Request, job_fn: Any, t0: float, usage: Usage, route: str, req: Any, rid: str, created: int,
    chat: bool,
) -> StreamingResponse:  # fmt: skip
    """Submit a streaming job; answer its SSE stream once its prompts passed (else raise its error)."""
    limit = get_settings(request).max_concurrent_streams
    if request.app.state.open_streams >= limit:
        raise QueueFullError(f"too many open streams ({limit}); retry later or use stream: false")
    engine = get_engine(request)
    job = engine.submit(job_fn, stream=True)
    slot = StreamSlot(request.app.state, job)
    items = engine.stream(job)
    try:
        first = await anext(items, None)
        if first is None:  # the job ended before its first item: raise its error (a 400, a 503, ...)
            await job.future
            raise RuntimeError("the job ended without output")
    except BaseException:
        slot.release()
        raise
    chunks = Chunks(req, rid, created, chat)
    return EngineStream(_events(request, job, slot, first, items, chunks, t0, usage, route), slot)


async def _events(
    request: Request, job: Any, slot: StreamSlot, first: dict[str, Any], items: AsyncIterator[Any],
    chunks: Chunks, t0: float, usage: Usage, route: str,
) -> AsyncIterator[str]:  # fmt: skip
    try:
        if (out := chunks.item(first)) is not None:
            yield out
        async for item in items:
            if (out := chunks.item(item)) is not None:
                yield out
        try:
            result = await job.future
        except Exception as exc:  # already streaming: OpenAI's in-band error (the SDK raises it)
            kind = "invalid_request_error" if isinstance(exc, ValueError) else "internal_error"
            yield _data({"error": {"message": str(exc), "type": kind, "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        if result is None:
            return  # cancelled
        observe(request, route, t0, usage)
        if chunks.req.include_usage:
            yield _data({**chunks.head, "choices": [], "usage": usage_body(result)})
        yield "data: [DONE]\n\n"
    finally:
        slot.release()
