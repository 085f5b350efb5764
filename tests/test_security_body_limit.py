"""MAX_BODY_BYTES holds for chunked bodies too, against a real uvicorn server.

The scenario (issue 25, item 2): with MAX_BODY_BYTES=2048 a 90 KB body with `Content-Length` got
413, but the same body sent with `Transfer-Encoding: chunked` (no length) was read whole and
parsed; a 20 MB chunked `/tokenize` grew the server from 0.4 GB to 4.2 GB resident. The limit now
counts the bytes `receive` hands the app: past it the app reads no further and the client gets 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from app.api.middleware import Guard
from app.main import create_app
from tests.test_api import make_settings
from tests.test_cli import free_port

LIMIT = 2048
CHUNK = 64 * 1024
JSON = {"content-type": "application/json"}


class Pulled:
    """Outermost ASGI wrapper: the body bytes the server handed to the app stack, per path."""

    def __init__(self, app) -> None:
        self.app, self.bytes = app, {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                self.bytes[scope["path"]] = self.bytes.get(scope["path"], 0) + len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


class Route:
    """A plain ASGI app that reads the whole body and answers its size, like a route parsing JSON."""

    def __init__(self) -> None:
        self.received = 0
        self.completed = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # what FastAPI answers a cut-off body
                return await self._answer(send, 400, {"detail": "There was an error parsing the body"})
            size += len(message.get("body", b""))
            self.received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.completed += 1
        await self._answer(send, 200, {"bytes": size})

    @staticmethod
    async def _answer(send, status: int, body: dict) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """uvicorn on a loopback port in a thread (it skips signal handlers off the main thread)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        assert thread.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def chunked(body: bytes):
    """A generator body: httpx sends it with `Transfer-Encoding: chunked` and no `Content-Length`."""
    return (body[i : i + CHUNK] for i in range(0, len(body), CHUNK))


def big_json(field: str, size: int) -> bytes:
    return json.dumps({field: "a" * size}).encode()


def assert_413(r: httpx.Response, limit: int = LIMIT) -> None:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["type"] == "request_too_large" and str(limit) in error["message"]


@pytest.fixture(scope="module")
def live(tiny_dirs, tmp_path_factory):
    app = Pulled(create_app(make_settings(tiny_dirs, tmp_path_factory.mktemp("limit"), max_body_bytes=LIMIT)))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").text
            time.sleep(0.1)
        yield client, app


def test_chunked_body_over_the_limit_is_413_like_a_declared_one(live):
    client, _ = live
    body = big_json("prompt", 90_000)
    declared = client.post("/generate_lda", content=body, headers=JSON)
    assert_413(declared)
    streamed = client.post("/generate_lda", content=chunked(body), headers=JSON)
    assert "content-length" not in streamed.request.headers  # really chunked
    assert_413(streamed)


def test_chunked_body_under_the_limit_is_served(live):
    client, _ = live
    body = json.dumps({"prompt": "Hello", "max_new_tokens": 2}).encode()
    r = client.post("/generate_lda", content=chunked(body), headers=JSON)
    assert r.status_code == 200 and r.json()["tokens_generated"] >= 1
    r = client.post("/tokenize", content=chunked(json.dumps({"prompt": "Hello"}).encode()), headers=JSON)
    assert r.status_code == 200 and r.json()["tokens"]


def test_a_20_mb_chunked_tokenize_is_not_read_past_the_limit(live):
    """The server hands the app at most a few socket reads past the limit, never the 20 MB."""
    client, app = live
    body = big_json("prompt", 20 * 1024 * 1024)
    r = client.post("/tokenize", content=chunked(body), headers=JSON)
    assert_413(r)
    assert app.bytes["/tokenize"] < 1024 * 1024, app.bytes  # before the fix: the whole 20 MB
    assert client.post("/tokenize", json={"prompt": "Hello"}).status_code == 200  # still serving


def test_the_route_never_sees_a_body_past_the_limit():
    """Behind the guard, a route reading the body gets at most LIMIT bytes and never its end."""
    route = Route()
    guarded = Guard(route, max_body_bytes=LIMIT, keys=[], metrics_public=False)
    with serving(guarded) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert_413(client.post("/echo", content=chunked(b"x" * (20 * 1024 * 1024))))
        assert route.received <= LIMIT and route.completed == 0
        ok = client.post("/echo", content=chunked(b"x" * LIMIT))  # exactly the limit is allowed
        assert ok.status_code == 200 and ok.json() == {"bytes": LIMIT} and route.completed == 1


async def _call(app, chunks: list[bytes]) -> list[dict]:
    """Drive an ASGI app with a chunked body by hand; returns what it sent."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return sent


def test_a_route_that_raises_on_the_cut_body_still_gets_413():
    async def raising(scope, receive, send):
        while (await receive())["type"] != "http.disconnect":
            pass
        raise RuntimeError("client went away")  # what Starlette's own body reader does

    sent = asyncio.run(_call(Guard(raising, LIMIT, [], False), [b"x" * 1500, b"x" * 1500]))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["type"] == "request_too_large"


def test_a_response_already_started_is_left_alone():
    """An app that answers before reading on cannot be taken back: its own answer stands."""

    async def early(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.body", "body": b"done"})

    sent = asyncio.run(_call(Guard(early, LIMIT, [], False), [b"x" * 1500, b"x" * 1500]))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"done"
