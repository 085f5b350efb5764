"""What route handlers depend on: the engine, settings, metrics, the loaded pair and amplifier.

Handlers name these as `Annotated` dependencies (`EngineDep`, `PairDep`, ...) instead of reading
`request.app.state` themselves, so every route gets the same 503 while the models load.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from lda import LDAModelPair

from app.amplification_lens.amplifier import Amplifier
from app.api.errors import NotReadyError
from app.api.generation import Usage
from app.api.metrics import Metrics
from app.api.schemas import SamplingFields
from app.engine import Engine
from app.settings import Settings


def get_pair(request: Request) -> LDAModelPair:
    pair = request.app.state.pair
    if pair is None:
        error = request.app.state.load_error
        raise NotReadyError(f"models failed to load: {error}" if error else "models are still loading")
    return pair


def get_amplifier(request: Request) -> Amplifier:
    amp = getattr(request.app.state, "amplifier", None)
    if amp is None:
        get_pair(request)  # the same 503 as every route that needs the models
        raise NotReadyError("the amplifier is not set up")
    return amp


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def check_limits(
    settings: Settings, req: SamplingFields, rows: int, what: str = "prompts x alphas x n"
) -> None:
    """Refuse what no chunking makes sensible; `what` names the product that gave `rows`."""
    if "max_new_tokens" not in req.model_fields_set:  # the default never exceeds the server's limit
        req.max_new_tokens = min(req.max_new_tokens, settings.max_new_tokens_limit)
    if req.max_new_tokens > settings.max_new_tokens_limit:
        raise ValueError(
            f"max_new_tokens must be <= {settings.max_new_tokens_limit}, got {req.max_new_tokens}"
        )
    if rows > settings.max_rows_per_request:
        raise ValueError(
            f"too many rows: {what} = {rows}, the limit is {settings.max_rows_per_request} "
            "(MAX_ROWS_PER_REQUEST)"
        )
    if len(req.stop) > settings.max_stop_strings:
        raise ValueError(f"too many stop strings: {len(req.stop)}, the limit is {settings.max_stop_strings}")


def observe(request: Request, route: str, t0: float, usage: Usage) -> None:
    """Record one finished generation request's latency, tokens and time to first token."""
    metrics = get_metrics(request)
    metrics.e2e.labels(route).observe(time.perf_counter() - t0)
    metrics.tokens.labels(route).inc(usage.tokens)
    if usage.first_token_at is not None:
        metrics.ttft.labels(route).observe(usage.first_token_at - t0)
    if usage.prefill_seconds or usage.decode_seconds:  # it decoded in a running batch
        metrics.prefill_time.labels(route).observe(usage.prefill_seconds)
        metrics.decode_time.labels(route).observe(usage.decode_seconds)


PairDep = Annotated[LDAModelPair, Depends(get_pair)]
AmplifierDep = Annotated[Amplifier, Depends(get_amplifier)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
