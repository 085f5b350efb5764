"""One JSON error shape for every failure: {"error": {"message", "type"}}."""

from __future__ import annotations

import logging

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from amplification import AdapterNotFound
from lda import IncompatibleTokenizersError

from app.engine import QueueFullError

log = logging.getLogger(__name__)


class ClientDisconnectedError(RuntimeError):
    """The client went away before its result was ready; the job was cancelled."""


class NotReadyError(RuntimeError):
    """Models are still loading (or failed to load)."""


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc), "invalid_request_error")

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        if isinstance(exc, AdapterNotFound):
            return error_response(404, str(exc), "not_found")
        if isinstance(exc, IncompatibleTokenizersError):
            return error_response(409, str(exc), "incompatible_models")
        return error_response(422, str(exc), "invalid_request_error")

    @app.exception_handler(FileNotFoundError)
    async def _missing(_: Request, exc: FileNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), "not_found")

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        request.app.state.metrics.rejected.inc()
        return error_response(429, str(exc), "queue_full", {"Retry-After": "1"})

    @app.exception_handler(NotReadyError)
    async def _not_ready(_: Request, exc: NotReadyError) -> JSONResponse:
        return error_response(503, str(exc), "not_ready", {"Retry-After": "5"})

    @app.exception_handler(ClientDisconnectedError)
    async def _gone(_: Request, exc: ClientDisconnectedError) -> JSONResponse:
        return error_response(499, str(exc), "client_disconnected")  # nginx's code; nobody reads it

    @app.exception_handler(torch.OutOfMemoryError)
    async def _oom(_: Request, exc: torch.OutOfMemoryError) -> JSONResponse:
        return error_response(503, f"out of memory for this request: {exc}", "out_of_memory")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
