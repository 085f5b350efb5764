"""Plain ASGI middleware: request counting, body-size limit (declared and streamed), API keys.

Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware re-wraps `receive`, which hides a
client's disconnect from the route, and the route needs to see it to cancel the engine job.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import OPEN_PATHS, is_open, key_matches, presented_key
from app.api.errors import error_response
from app.api.metrics import Metrics


class CountRequests:
    """`lda_requests_total{route, status}`, with the route template the router matched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status["code"])).inc()


class BodyLimit:
    """Counts the bytes `receive` hands the app and cuts the body off past `limit`.

    `Content-Length` alone is not enough: a chunked body has none, and Starlette reads it whole into
    memory before parsing. Past the limit the app gets `http.disconnect` instead of the chunk, so it
    stops reading (nothing beyond the limit is ever buffered) and cannot parse a truncated body;
    uvicorn pauses the socket while nobody reads and discards the rest once the response is sent.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive, self.limit = receive, limit
        self.received = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        if self.exceeded:
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.exceeded = True
                return {"type": "http.disconnect"}
        return message


class Guard:
    """Refuse oversized bodies (413) and, when keys are configured, requests without one (401)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, keys: list[str], metrics_public: bool) -> None:
        self.app, self.max_body_bytes, self.keys = app, max_body_bytes, keys
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self._limited(scope, BodyLimit(receive, self.max_body_bytes), send)

    async def _limited(self, scope: Scope, body: BodyLimit, send: Send) -> None:
        """Run the app on the counted body; answer 413 instead of whatever it made of a cut-off one.

        After the cut the app sees a disconnect (FastAPI answers 400, a route may raise): that
        answer is dropped and the 413 sent in its place, unless the app had started its response
        before the body ran over, when nothing can be taken back.
        """
        started = False

        async def send_unless_cut(message: Message) -> None:
            nonlocal started
            if body.exceeded and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body, send_unless_cut)
        except Exception:
            if not (body.exceeded and not started):
                raise
        if body.exceeded and not started:
            message = f"request body exceeds the limit of {self.max_body_bytes} bytes"
            await error_response(413, message, "request_too_large")(scope, body, send)

    def _refusal(self, scope: Scope, headers: Headers) -> Any:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            message = f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}"
            return error_response(413, message, "request_too_large")
        if not self.keys or is_open(scope["path"], self.open_paths) or scope["method"] == "OPTIONS":
            return None
        presented = presented_key(headers)
        if presented is None or not key_matches(presented, self.keys):
            return error_response(
                401,
                "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            )
        return None
