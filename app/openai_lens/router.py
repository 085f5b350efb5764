"""`/v1/models`, `/v1/completions`, `/v1/chat/completions`: OpenAI's API over every lens.

The model id picks the lens (app/openai_lens/models.py); the engine job (jobs.py) decodes with the
native routes' semantics; this module only validates, limits and lays out OpenAI's bodies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from lda import IncompatibleTokenizersError, SamplingParams

from app.api.deps import PairDep, SettingsDep, observe
from app.api.generation import Usage
from app.api.schemas import ERRORS, not_found
from app.api.streaming import run_job
from app.diffing_lens.steering import resolve_steer
from app.openai_lens.jobs import FINISH, Choice, Result, Work, completion_job, usage_body
from app.openai_lens.logprobs import chat_logprobs, completion_logprobs
from app.openai_lens.models import Lens, ModelNotFoundError, ParamError, adapter_exists, resolve
from app.openai_lens.schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields
from app.openai_lens.streaming import openai_stream
from app.settings import Settings

router = APIRouter(tags=["openai"])
# 400 for invalid input (OpenAI's status), 404 for an unknown model or adapter; `stream: true`
# answers Server-Sent Events of OpenAI's chunks.
RESPONSES = {
    **not_found("model"),
    200: {
        "description": "the JSON body, or with `stream: true` `data: {chunk}` events ending with `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"description": "each event's data is a JSON chunk"}}},
    },
}
OWNER = "model-diff-service"


def _get_amp(request: Request) -> Any:
    return getattr(request.app.state, "amplifier", None)


@router.get("/v1/models", responses=ERRORS)
async def list_models(request: Request, pair: PairDep) -> Any:
    """The after and before models (by id and alias), `lda`, every adapter and compiled lora_name."""
    created = int(request.app.state.started_at)
    amp = _get_amp(request)

    def card(model_id: str, root: str, parent: str | None = None) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER,
                "root": root, "parent": parent}  # fmt: skip

    after, before = pair.after.model_id, pair.before.model_id
    data = [card(after, after), card("after", after, after), card(before, before), card("before", before, before)]
    data.append(card("lda", after, after))
    if amp is not None:
        base = amp.base_model_id
        for adapter in amp.registry.list():
            data.append(card(adapter.name, str(adapter.source), base))
        names = {*amp.compiled, *amp.written_names()}
        data += [card(name, str(amp.compiled_dir / name), base) for name in sorted(names)]
    seen: set[str] = set()
    unique = [m for m in data if not (m["id"] in seen or seen.add(m["id"]))]  # after == before ids
    return {"object": "list", "data": unique}


def _lens(req: OpenAIFields, pair: Any, amp: Any) -> tuple[Lens, float, str | None]:
    """The lens, its alpha and adapter, with the body's `alpha` / `adapter` extras checked against it."""
    lens = resolve(req.model, pair, amp)
    if lens.kind != "lda":
        for name in ("alpha", "adapter"):
            if getattr(req, name) is not None:
                raise ParamError(f"{name}: only applies to LDA models (lda, lda@ALPHA), not {req.model!r}", name)
        return lens, 0.0, lens.adapter
    if lens.alpha is not None and req.alpha is not None and req.alpha != lens.alpha:
        raise ParamError(f"alpha: {req.alpha:g} contradicts the model {req.model!r}", "alpha")
    if lens.adapter is not None and req.adapter is not None and req.adapter != lens.adapter:
        raise ParamError(f"adapter: {req.adapter!r} contradicts the model {req.model!r}", "adapter")
    alpha = lens.alpha if lens.alpha is not None else (req.alpha if req.alpha is not None else 1.0)
    adapter = lens.adapter or req.adapter
    if adapter is not None:
        if not adapter_exists(adapter, amp):
            raise ModelNotFoundError(f"adapter {adapter!r}: no registered adapter or compiled lora_name")
    elif not pair.compatibility.compatible:
        raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
    return lens, alpha, adapter


async def _steering(request: Request, req: OpenAIFields, resolved: tuple[Lens, float, str | None]) -> Any:
    """The `steer` extra resolved (models after and lda without an adapter), or None."""
    if req.steer is None:
        return None
    lens, _, adapter = resolved
    if lens.kind not in ("after", "lda") or adapter is not None:
        raise ParamError(f"steer: only applies to the models after and lda (no adapter), not {req.model!r}", "steer")
    try:
        return await asyncio.to_thread(resolve_steer, request.app, req.steer)
    except ValueError as exc:
        raise ParamError(str(exc), "steer") from None


def _limits(settings: Settings, req: OpenAIFields, prompts: int, max_tokens: int | None) -> None:
    rows = prompts * req.n
    if rows > settings.max_rows_per_request:
        raise ParamError(
            f"too many choices: prompts x n = {rows}, the limit is {settings.max_rows_per_request} "
            "(MAX_ROWS_PER_REQUEST)",
            "n",
        )
    if max_tokens is not None and max_tokens > settings.max_new_tokens_limit:
        raise ParamError(f"max_tokens must be <= {settings.max_new_tokens_limit}, got {max_tokens}", "max_tokens")
    if len(req.stop_list) > settings.max_stop_strings:
        raise ParamError(f"too many stop strings: {len(req.stop_list)}, the limit is {settings.max_stop_strings}", "stop")


def _work(req: OpenAIFields, settings: Settings, prompts: Any, kind: str, max_tokens: int | None, logprobs: int | None, **kw: Any) -> Work:
    seed = req.seed if req.seed is not None else uuid.uuid4().int % 2**31
    kw.setdefault("steering", None)
    sampling = SamplingParams(temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p)
    return Work(prompts, kind, req.n, max_tokens, settings.max_new_tokens_limit, sampling,
                tuple(req.stop_list), seed, logprobs, max_batch_tokens=settings.max_batch_tokens, **kw)  # fmt: skip


async def _answer(
    request: Request, req: OpenAIFields, work: Work, resolved: tuple[Lens, float, str | None], pair: Any,
    t0: float, route: str, choice: Callable[[Result, Choice], dict[str, Any]],
) -> Any:  # fmt: skip
    """Run the work (or stream it) and wrap each choice's body in OpenAI's envelope."""
    chat = route == "/v1/chat/completions"
    usage = Usage()
    job_fn = completion_job(work, *resolved, pair, _get_amp(request), usage)
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return await openai_stream(request, job_fn, t0, usage, route, req, rid, created, chat=chat)
    result: Result = await run_job(request, job_fn)
    observe(request, route, t0, usage)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice(result, c) for c in result.choices],
            "usage": usage_body(result)}  # fmt: skip


@router.post("/v1/completions", responses=RESPONSES)
async def completions(
    req: CompletionRequest, request: Request, pair: PairDep, settings: SettingsDep
) -> Any:
    """OpenAI's legacy completions (what lm-eval's `local-completions` sends): raw prompts, no template."""
    t0 = time.perf_counter()
    resolved = _lens(req, pair, _get_amp(request))
    prompts = req.prompts
    _limits(settings, req, len(prompts), req.max_tokens)
    kind = "text" if isinstance(prompts[0], str) else "ids"
    work = _work(req, settings, prompts, kind, req.max_tokens, req.logprobs, echo=req.echo,
                 steering=await _steering(request, req, resolved))  # fmt: skip

    def choice(result: Result, c: Choice) -> dict[str, Any]:
        out = c.output
        text = (result.prompt_texts[c.prompt_index] if req.echo else "") + (out.text if out else "")
        logprobs = None
        if req.logprobs is not None:
            entries: list[Any] = list(c.prompt_logprobs or []) if req.echo else []
            entries += (out.logprobs or []) if out else []
            context = () if req.echo else c.prompt_ids
            first = c.prompt_ids[0] if req.echo else None
            logprobs = completion_logprobs(result.side.tokenizer, entries, context, first)
        return {"index": c.index, "text": text, "logprobs": logprobs,
                "finish_reason": FINISH[out.finish_reason] if out else "length"}  # fmt: skip

    return await _answer(request, req, work, resolved, pair, t0, "/v1/completions", choice)


@router.post("/v1/chat/completions", responses=RESPONSES)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, pair: PairDep, settings: SettingsDep
) -> Any:
    """OpenAI's chat completions: messages through the lens's chat template."""
    t0 = time.perf_counter()
    resolved = _lens(req, pair, _get_amp(request))
    _limits(settings, req, 1, req.max_new)
    messages = [m.template_message() for m in req.messages]
    top = req.top_logprobs or 0
    work = _work(req, settings, [messages], "chat", req.max_new, top if req.logprobs else None,
                 add_generation_prompt=req.add_generation_prompt,
                 template_kwargs=req.chat_template_kwargs or {},
                 steering=await _steering(request, req, resolved))  # fmt: skip

    def choice(result: Result, c: Choice) -> dict[str, Any]:
        out = c.output
        assert out is not None  # chat always decodes at least one token
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(result.side.tokenizer, out.logprobs or [], c.prompt_ids, top)
        return {"index": c.index, "message": {"role": "assistant", "content": out.text},
                "logprobs": logprobs, "finish_reason": FINISH[out.finish_reason]}  # fmt: skip

    return await _answer(request, req, work, resolved, pair, t0, "/v1/chat/completions", choice)
