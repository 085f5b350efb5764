"""HTTP routes: validate, enqueue on the engine, translate results. No torch here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from lda import IncompatibleTokenizersError, LDAModelPair

from app.amp_jobs import adapter_decoder
from app.amplify import Amplifier
from app.engine import Engine, QueueFullError
from app.errors import ClientDisconnectedError, NotReadyError, error_response
from app.generation import Usage, generate_job, lda_job
from app.info import info_body
from app.metrics import Metrics
from app.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    LDARequest,
    LDAResponse,
    SamplingFields,
    TokenizerCompatibilityResponse,
)
from app.settings import Settings

# 400: a body that is not JSON at all; 422: JSON that breaks the schema or a rule.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 409, 422, 429, 503)
}

# Routes that take `stream: true` answer with Server-Sent Events instead of the JSON body.
STREAMING: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the JSON body, or with `stream: true` SSE `token` events then one `result` (or `error`)",
        "content": {"text/event-stream": {"schema": {"description": "each event's data is JSON"}}},
    },
    **ERRORS,
}

router = APIRouter()


def get_pair(request: Request) -> LDAModelPair:
    pair = request.app.state.pair
    if pair is None:
        error = request.app.state.load_error
        raise NotReadyError(f"models failed to load: {error}" if error else "models are still loading")
    return pair


PairDep = Annotated[LDAModelPair, Depends(get_pair)]


def get_amplifier(request: Request) -> Amplifier:
    amp = getattr(request.app.state, "amplifier", None)
    if amp is None:
        get_pair(request)  # the same 503 as every route that needs the models
        raise NotReadyError("the amplifier is not set up")
    return amp


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def check_limits(settings: Settings, req: SamplingFields, rows: int) -> None:
    if "max_new_tokens" not in req.model_fields_set:  # the default never exceeds the server's limit
        req.max_new_tokens = min(req.max_new_tokens, settings.max_new_tokens_limit)
    if req.max_new_tokens > settings.max_new_tokens_limit:
        raise ValueError(
            f"max_new_tokens must be <= {settings.max_new_tokens_limit}, got {req.max_new_tokens}"
        )
    if rows > settings.max_rows_per_request:
        raise ValueError(
            f"too many rows: prompts x alphas x n = {rows}, the limit is {settings.max_rows_per_request}"
        )
    if len(req.stop) > settings.max_stop_strings:
        raise ValueError(f"too many stop strings: {len(req.stop)}, the limit is {settings.max_stop_strings}")


def _observe(request: Request, route: str, t0: float, usage: Usage) -> None:
    metrics = _metrics(request)
    metrics.e2e.labels(route).observe(time.perf_counter() - t0)
    metrics.tokens.labels(route).inc(usage.tokens)
    if usage.first_token_at is not None:
        metrics.ttft.labels(route).observe(usage.first_token_at - t0)


@router.post("/generate_lda", response_model=LDAResponse, responses=STREAMING)
async def generate_lda(req: LDARequest, request: Request, pair: PairDep) -> Any:
    """Decode with `after + alpha * (after - before)` for every prompt x alpha x n row."""
    t0 = time.perf_counter()
    rows = len(req.prompt_list) * len(req.alpha_list) * req.n
    check_limits(_settings(request), req, rows)
    make_decoder = None
    if req.adapter is not None or req.amplification is not None:
        if req.adapter is not None and req.amplification is not None:
            raise ValueError("give `adapter` or `amplification`, not both")
        make_decoder = adapter_decoder(get_amplifier(request), req)
    elif not pair.compatibility.compatible:
        raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
    usage = Usage()
    job_fn = lda_job(pair, req, usage, make_decoder)
    if req.stream:
        return stream_response(request, job_fn, t0, usage, "/generate_lda")
    body = await run_job(request, job_fn)
    _observe(request, "/generate_lda", t0, usage)
    return body


async def run_job(request: Request, fn: Any) -> Any:
    """Run a job on the engine; if the client disconnects meanwhile, cancel it (it stops within one
    decode step, restoring anything it merged) instead of computing for nobody."""
    job = _engine(request).submit(fn)
    while True:
        done, _ = await asyncio.wait({job.future}, timeout=0.2)
        if done:
            return job.future.result()
        if await request.is_disconnected():
            job.cancel()
            raise ClientDisconnectedError("client disconnected; job cancelled")


def stream_response(request: Request, job_fn: Any, t0: float, usage: Usage, route: str) -> StreamingResponse:
    """Submit a streaming job and answer with its SSE stream, within the open-stream limit."""
    limit = _settings(request).max_concurrent_streams
    if request.app.state.open_streams >= limit:
        raise QueueFullError(f"too many open streams ({limit}); retry later or use stream=false")
    job = _engine(request).submit(job_fn, stream=True)
    request.app.state.open_streams += 1
    return StreamingResponse(_sse(request, job, t0, usage, route), media_type="text/event-stream")


def _sse_event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(
    request: Request, job: Any, t0: float, usage: Usage, route: str = "/generate_lda"
) -> AsyncIterator[str]:
    """Token events as they are sampled, then one `result` (or `error`) event."""
    engine = _engine(request)
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
            _observe(request, route, t0, usage)
            yield _sse_event("result", result)
    finally:
        job.cancel()  # client gone or stream done: the engine stops at the next token
        request.app.state.open_streams -= 1


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(req: GenerateRequest, request: Request, pair: PairDep) -> Any:
    """Both models alone, no amplification, each with its own tokenizer and template."""
    t0 = time.perf_counter()
    check_limits(_settings(request), req, 1)
    usage = Usage()
    body = await run_job(request, generate_job(pair, req, usage))
    _observe(request, "/generate", t0, usage)
    return body


@router.get("/tokenizer_compatibility", response_model=TokenizerCompatibilityResponse, responses=ERRORS)
async def tokenizer_compatibility(pair: PairDep) -> Any:
    c = pair.compatibility
    return {
        "compatible": c.compatible,
        "vocab_size_1": c.vocab_size_after,
        "vocab_size_2": c.vocab_size_before,
        "vocabs_match": c.vocabs_match,
        "warning": c.warning,
        "special_tokens_match": c.special_tokens_match,
        "logits_width_1": c.logits_width_after,
        "logits_width_2": c.logits_width_before,
        "shared_width": c.shared_width,
    }


@router.get("/health", responses={503: ERRORS[503]})
async def health(request: Request) -> Any:
    """Liveness: the process is up (503 only when model loading failed for good)."""
    if request.app.state.load_error:
        return error_response(503, f"models failed to load: {request.app.state.load_error}", "load_failed")
    return {"status": "ok"}


@router.get("/ping", responses={204: {"description": "models still loading"}, 503: ERRORS[503]})
async def ping(request: Request) -> Any:
    """RunPod's load-balancer health check: 200 when ready, 204 while models load."""
    if request.app.state.pair is None:
        return Response(status_code=204 if not request.app.state.load_error else 503)
    return {"status": "healthy"}


@router.get("/ready", responses=ERRORS)
async def ready(request: Request, pair: PairDep) -> Any:
    """Readiness: 200 once both models are loaded, 503 before."""
    return {"status": "ready", "model_after": pair.after.model_id, "model_before": pair.before.model_id}


@router.get("/info", responses=ERRORS)
async def info(request: Request, pair: PairDep) -> Any:
    return info_body(pair, _settings(request), request.app.state.demo)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(_metrics(request).render(), media_type=CONTENT_TYPE_LATEST)

