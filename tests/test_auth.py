"""API keys: a 401/200 matrix over every route, both header forms, open liveness routes, CORS."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.auth import key_matches
from app.main import create_app
from tests.test_api import make_settings, wait_ready

OPEN = {"/health", "/ready", "/ping"}


@pytest.fixture(scope="module")
def client(tiny_dirs, tmp_path_factory):
    settings = make_settings(tiny_dirs, tmp_path_factory.mktemp("auth"), api_key="first-key, second-key")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)  # /ready is open, so waiting needs no key
        yield c


def every_route(client):
    paths = client.get("/openapi.json", headers={"X-API-Key": "first-key"}).json()["paths"]
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops]
    return sorted(routes + [("GET", "/docs"), ("GET", "/openapi.json")])


def call(client, method, path, headers=None):
    path = path.replace("{name}", "nope").replace("{job_id}", "nope").replace("{task}", "nope")
    body = {"prompt": "Hello", "max_new_tokens": 2} if method == "POST" else None
    return client.request(method, path, json=body, headers=headers or {})


def test_every_route_needs_a_key_except_liveness(client):
    checked = 0
    for method, path in every_route(client):
        no_key = call(client, method, path)
        wrong = call(client, method, path, {"Authorization": "Bearer wrong"})
        bearer = call(client, method, path, {"Authorization": "Bearer second-key"})
        x_key = call(client, method, path, {"X-API-Key": "first-key"})
        if path in OPEN:
            assert no_key.status_code != 401, path
            continue
        checked += 1
        assert no_key.status_code == 401 and wrong.status_code == 401, (method, path)
        assert no_key.json()["error"]["type"] == "unauthorized"
        assert no_key.headers["www-authenticate"] == "Bearer"
        assert bearer.status_code != 401 and x_key.status_code != 401, (method, path)
    assert checked >= 15


def test_metrics_public_setting(tiny_dirs, tmp_path):
    settings = make_settings(tiny_dirs, tmp_path, api_key="k", metrics_public=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/info").status_code == 401


def test_no_key_configured_means_open(tiny_dirs, tmp_path):
    with TestClient(create_app(make_settings(tiny_dirs, tmp_path))) as c:
        wait_ready(c)
        assert c.get("/info").status_code == 200


def test_cors_off_unless_origins_set(tiny_dirs, tmp_path):
    pre = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(make_settings(tiny_dirs, tmp_path))) as c:
        assert "access-control-allow-origin" not in c.options("/generate_lda", headers=pre).headers
    with TestClient(create_app(make_settings(tiny_dirs, tmp_path, cors_origins="https://example.org"))) as c:
        assert c.options("/generate_lda", headers=pre).headers["access-control-allow-origin"] == "https://example.org"


def test_key_comparison():
    assert key_matches("abc", ["x", "abc"]) and not key_matches("ab", ["abc"]) and not key_matches("abc", [])
