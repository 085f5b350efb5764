"""One JSON error shape for every failure: {"error": {"message", "type"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from amplification import AdapterNotFound
from lda import IncompatibleTokenizersError

from app.engine import QueueFullError
from app.openai_lens.models import ModelNotFoundError

log = logging.getLogger(__name__)


class ClientDisconnectedError(RuntimeError):
    """The client went away before its result was ready; the job was cancelled."""


class NotReadyError(RuntimeError):
    """Models are still loading (or failed to load)."""


# vLLM's OpenAI-compatible routes (and its tokenizer routes) answer invalid input with 400, as
# OpenAI clients expect; the native routes keep FastAPI's 422. The toolkit's compile route is
# native in behaviour (its clients were written against this service's 422s).
OPENAI_EXACT = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})
NATIVE_V1 = frozenset({"/v1/compile_and_load_amplification"})


def openai_route(path: str) -> bool:
    return path in OPENAI_EXACT or (path.startswith("/v1/") and path not in NATIVE_V1)


def error_response(
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """OpenAI's error shape: `param` names the offending field, `code` a machine-readable reason."""
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# Tags of request bodies that are unions keyed by a field (`/diffing/jobs`'s `method`): pydantic
# puts the tag into an error's path (`logit_diff.top_k`), where the client sent `top_k`.
UNION_TAGS: set[str] = set()
# A library's ValueError names the field first ("texts: none of ..."): that is its `param`.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\])?(?:\.[A-Za-z_][\w]*(?:\[\d+\])?)*): ")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    return validation_message(exc.errors())


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """The message naming every bad field, and the first field's path (OpenAI's `param`).

    `errors` are pydantic's, located in a request (`("body", field, ...)`) or in a bare body
    (`app.batch` validates job files with the same models and prints this same message)."""
    parts, params = [], []
    for err in errors:
        raw = list(err.get("loc", ()))
        if len(raw) > 1 and raw[0] == "body" and raw[1] in UNION_TAGS:
            del raw[1]
        if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # the key field itself
            raw.append(str(err.get("ctx", {}).get("discriminator", "")).strip("'"))
        loc = ".".join(str(p) for p in raw if p != "body")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
        params.append(loc)
    return "; ".join(parts) or "invalid request", next((p for p in params if p), None)


def _invalid_status(request: Request) -> int:
    return 400 if openai_route(request.url.path) else 422


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(_invalid_status(request), message, "invalid_request_error", param=param)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), "invalid_request_error", param="model", code="model_not_found")

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        if isinstance(exc, AdapterNotFound):
            return error_response(404, str(exc), "not_found")
        if isinstance(exc, IncompatibleTokenizersError):
            return error_response(409, str(exc), "incompatible_models")
        param = getattr(exc, "param", None)
        if param is None and (named := _FIELD_PREFIX.match(str(exc))):
            param = named.group(1)
        return error_response(_invalid_status(request), str(exc), "invalid_request_error", param=param)

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
