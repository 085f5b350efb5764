"""API keys: a public pod's port is reachable by anyone, so every route but liveness needs a key."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response

from app.errors import error_response
from app.settings import Settings

OPEN_PATHS = frozenset({"/health", "/ready", "/ping"})


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time against every key, so timing tells neither which key nor how much matched."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def install_auth(app: FastAPI, settings: Settings) -> None:
    keys = settings.api_keys
    if not keys:
        return
    open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_public else set())

    @app.middleware("http")
    async def require_key(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if request.url.path in open_paths or request.method == "OPTIONS":
            return await call_next(request)
        presented = presented_key(request)
        if presented is None or not key_matches(presented, keys):
            return error_response(
                401, "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)", "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)
