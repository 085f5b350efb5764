"""Liveness, readiness, `/info` and `/metrics`: the routes about the process, not a lens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.auth import has_access
from app.api.deps import MetricsDep, PairDep, SettingsDep, get_pair
from app.api.errors import NotReadyError, error_response
from app.api.schemas import ERRORS
from app.system.info import info_body

router = APIRouter()


def _has_access(request: Request) -> bool:
    return has_access(request.headers, request.app.state.settings.api_keys)


@router.get("/health", responses={503: ERRORS[503]})
async def health(request: Request) -> Any:
    """Liveness: the process is up (503 only when model loading failed for good).

    With API_KEY set, the reason for a failed load is only said to a caller with a key (it can
    name paths and hub ids); the server logged it when loading failed.
    """
    error = request.app.state.load_error
    if error:
        reason = f": {error}" if _has_access(request) else " (the reason is in the server log)"
        return error_response(503, f"models failed to load{reason}", "load_failed")
    return {"status": "ok"}


@router.get("/ping", responses={204: {"description": "models still loading"}, 503: ERRORS[503]})
async def ping(request: Request) -> Any:
    """RunPod's load-balancer health check: 200 when ready, 204 while models load."""
    if request.app.state.pair is None:
        return Response(status_code=204 if not request.app.state.load_error else 503)
    return {"status": "healthy"}


@router.get("/ready", responses=ERRORS)
async def ready(request: Request) -> Any:
    """Readiness: 200 once both models are loaded, 503 before.

    It needs no key (orchestrators probe it), so without one (when API_KEY is set) it says the
    status only: which models run here, or why they failed to load, is for key holders.
    """
    if not _has_access(request):
        if request.app.state.pair is None:
            failed = request.app.state.load_error is not None
            raise NotReadyError("models failed to load" if failed else "models are still loading")
        return {"status": "ready"}
    pair = get_pair(request)
    return {"status": "ready", "model_after": pair.after.model_id, "model_before": pair.before.model_id}


@router.get("/info", responses=ERRORS)
async def info(request: Request, pair: PairDep, settings: SettingsDep) -> Any:
    return info_body(pair, request.app.state.model_summaries, settings, request.app.state.demo)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
