"""API keys: a 401/200 matrix over every route, both header forms, open liveness routes (and how
little they say without a key), CORS, the warning when serving beyond loopback without a key."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.api.auth import key_matches
from app.loader import load_pair
from app.main import create_app
from app.settings import Settings
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


def test_liveness_and_readiness_say_only_the_status_without_a_key(client):
    """Open routes on a public pod: a stranger learns that it is up and ready, not what runs there."""
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    assert client.get("/ready", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ready"}
    detail = client.get("/ready", headers={"X-API-Key": "first-key"}).json()
    assert detail["status"] == "ready" and detail["model_after"] and detail["model_before"]


def test_a_failed_load_is_not_described_without_a_key(tmp_path, caplog):
    """The load error names local paths (or gated hub ids): only a key holder and the log see it."""
    missing = str(tmp_path / "missing-model-dir")
    settings = Settings(model_after_id=missing, model_before_id=missing, data_dir=tmp_path, api_key="k")
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health, ready = c.get("/health"), c.get("/ready")
        assert health.status_code == 503 and health.json()["error"]["type"] == "load_failed"
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "not_ready"
        for r in (health, ready):
            assert "missing-model-dir" not in r.text
        keyed = {"Authorization": "Bearer k"}
        assert "missing-model-dir" in c.get("/health", headers=keyed).json()["error"]["message"]
        assert "missing-model-dir" in c.get("/ready", headers=keyed).json()["error"]["message"]
    assert any("missing-model-dir" in r.getMessage() + (r.exc_text or "") for r in caplog.records)


def test_still_loading_says_so_without_naming_the_models(tiny_dirs, tmp_path):
    gate = threading.Event()

    def slow_loader(settings):
        gate.wait(30)
        return load_pair(settings)

    settings = make_settings(tiny_dirs, tmp_path, api_key="k")
    with TestClient(create_app(settings, loader=slow_loader)) as c:
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["message"] == "models are still loading"
        gate.set()
        wait_ready(c)


@pytest.mark.parametrize(
    "host, key, warned",
    [("0.0.0.0", "", True), ("::", "", True), ("10.0.0.5", "", True), ("0.0.0.0", "k", False),
     ("127.0.0.1", "", False), ("localhost", "", False), ("::1", "", False)],
)
def test_a_warning_at_start_when_listening_beyond_loopback_without_a_key(tiny_dirs, tmp_path, caplog, host, key, warned):
    with caplog.at_level(logging.WARNING, logger="app"), TestClient(
        create_app(make_settings(tiny_dirs, tmp_path, host=host, api_key=key))
    ):
        pass
    found = [r for r in caplog.records if r.levelno == logging.WARNING and "without API_KEY" in r.getMessage()]
    assert bool(found) == warned, [r.getMessage() for r in caplog.records]
