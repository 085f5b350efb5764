"""Open-stream accounting: a stream slot is released however the response ends."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.test_api import make_settings, wait_ready

CLIENTS = 50


ROUTES = {
    "/generate_lda": {"prompt": "Hello", "stream": True, "max_new_tokens": 40},
    "/v1/chat/completions": {"model": "lda", "messages": [{"role": "user", "content": "Hello"}],
                             "stream": True, "max_tokens": 40},
}  # fmt: skip


def _scope(spec_version: str, body: bytes, path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _gone_before_first_byte(app, spec_version: str, path: str) -> None:
    """One client that sends its request and is gone before any byte of the answer reaches it.

    ASGI 2.4 servers report that by raising OSError from `send` (uvicorn's ClientDisconnected);
    older ones by answering `http.disconnect` to `receive`, which Starlette races the body against.
    """
    body = json.dumps(ROUTES[path]).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            if spec_version == "2.4":
                raise OSError("connection reset by peer")
            await asyncio.sleep(0.01)  # the disconnect wins the race before the body starts

    try:
        await app(_scope(spec_version, body, path), receive, send)
    except Exception:  # the server side of a vanished client; what matters is the state after it
        pass


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_clients_gone_before_the_first_byte_release_their_slots(tiny_dirs, tmp_path, spec_version, path):
    settings = make_settings(tiny_dirs, tmp_path, max_concurrent_streams=4, queue_size=64)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)

        async def many() -> None:
            await asyncio.gather(*(_gone_before_first_byte(c.app, spec_version, path) for _ in range(CLIENTS)))

        c.portal.call(many)
        assert c.app.state.open_streams == 0
        # Nobody left decoding for nobody: the cancelled jobs drain and a real stream still gets a slot.
        with c.stream("POST", path, json={**ROUTES[path], "max_tokens" if "model" in ROUTES[path] else
                      "max_new_tokens": 3}) as s:  # fmt: skip
            end = "data: [DONE]" if "model" in ROUTES[path] else "event: result"
            assert s.status_code == 200 and end in s.read().decode()
        assert c.app.state.open_streams == 0
        assert c.app.state.engine.waiting == 0
