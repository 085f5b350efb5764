"""Every route through the real app and engine on tiny local models."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.loader import load_pair
from app.main import create_app
from app.settings import Settings


def wait_ready(client: TestClient, timeout: float | None = None) -> None:
    if timeout is None:
        # COMPILE=on compiles every decode shape before /ready: ~30-90 s on 2 cores, cold cache.
        timeout = 600.0 if client.app.state.settings.compile == "on" else 60.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/ready').json()}")


def make_settings(tiny_dirs, tmp_path, **kw) -> Settings:
    after, before = tiny_dirs
    base = dict(
        model_after_id=str(after),
        model_before_id=str(before),
        data_dir=tmp_path,
        max_new_tokens_limit=64,
        max_rows_per_request=8,
        queue_size=4,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def client(tiny_dirs, tmp_path_factory):
    app = create_app(make_settings(tiny_dirs, tmp_path_factory.mktemp("data")))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def lda(client, **body):
    body.setdefault("prompt", "Hello world")
    return client.post("/generate_lda", json=body)


def test_seed_fields_and_rows(client):
    r = lda(client, prompts=["Hello world"], prompt="x")
    assert r.status_code == 422  # prompt and prompts together
    r = client.post(
        "/generate_lda",
        json={
            "prompts": ["Hello world", "What should I do?"],
            "alphas": [0.0, 2.0],
            "n": 2,
            "seed": 5,
            "max_new_tokens": 6,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    for field in (
        "prompt",
        "formatted_prompt",
        "completion",
        "text",
        "alpha",
        "model_after",
        "model_before",
        "tokens_generated",
        "stopped_early",
    ):
        assert field in body
    rows = body["results"]
    assert len(rows) == 8
    assert [(x["prompt_index"], x["alpha"], x["sample_index"]) for x in rows][:4] == [
        (0, 0.0, 0),
        (0, 0.0, 1),
        (0, 2.0, 0),
        (0, 2.0, 1),
    ]
    assert [x["seed"] for x in rows] == list(range(5, 13))
    assert body["completion"] == rows[0]["completion"] and body["formatted_prompt"].startswith("<s>")
    assert rows[0]["text"].endswith(rows[0]["completion"])


def test_a_row_reproduces_alone_with_its_seed(client):
    body = client.post(
        "/generate_lda",
        json={
            "prompts": ["Hello world", "A"],
            "alphas": [1.0, 3.0],
            "seed": 100,
            "max_new_tokens": 10,
            "temperature": 1.0,
        },
    ).json()
    for row in body["results"]:
        alone = lda(
            client,
            prompt=row["prompt"],
            alpha=row["alpha"],
            seed=row["seed"],
            max_new_tokens=10,
            temperature=1.0,
        ).json()
        assert alone["completion"] == row["completion"]


def test_greedy_alpha_endpoints_match_generate(client):
    plain = client.post(
        "/generate", json={"prompt": "Hello world", "do_sample": False, "max_new_tokens": 12}
    ).json()
    assert set(plain) == {"prompt", "model_1", "model_2"}
    zero = lda(client, alpha=0.0, do_sample=False, max_new_tokens=12).json()
    minus = lda(client, alpha=-1.0, temperature=0.0, max_new_tokens=12).json()
    assert zero["completion"] == plain["model_1"]["completion"]
    assert minus["completion"] == plain["model_2"]["completion"]
    assert plain["model_1"]["completion"] != plain["model_2"]["completion"]


def test_details(client):
    body = lda(client, details=True, max_new_tokens=4, seed=1).json()
    details = body["results"][0]["details"]
    assert len(details) >= 1
    assert {"token_id", "token", "logprob_after", "logprob_before", "logprob_amplified"} <= set(details[0])


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_streaming_matches_the_result(client):
    with client.stream(
        "POST",
        "/generate_lda",
        json={
            "prompts": ["Hello world", "A"],
            "n": 2,
            "seed": 3,
            "max_new_tokens": 12,
            "stream": True,
            "stop": ["e"],
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    assert events[-1][0] == "result"
    result = events[-1][1]
    streamed = ["" for _ in result["results"]]
    for name, data in events[:-1]:
        assert name == "token"
        streamed[data["row"]] += data["text"]
    assert streamed == [row["completion"] for row in result["results"]]
    assert sum(len(s) for s in streamed) > 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "max_new_tokens": 65}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": ["a", "b", "c"], "alphas": [0, 1, 2]}, "rows"),
        ({"prompt": 123}, "prompt"),
        ({"prompt": "x", "alpha": "big"}, "alpha"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "alphas": []}, "alphas"),
        ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
        ({}, "prompt"),
    ],
)
def test_bad_fields_are_422_naming_the_field(client, body, field):
    r = client.post("/generate_lda", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and field in err["message"]


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"prompt": "x", "alpha": NaN}', "alpha"),
        ('{"prompt": "x", "alpha": Infinity}', "alpha"),
        ('{"prompt": "x", "alphas": [1, -Infinity]}', "alphas"),
        ('{"prompt": "x", "temperature": NaN}', "temperature"),
        ("{not json", ""),
    ],
)
def test_non_finite_numbers_and_bad_json_are_422(client, raw, field):
    r = client.post("/generate_lda", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and field in r.json()["error"]["message"]


def test_generate_validates_too(client):
    assert client.post("/generate", json={"prompt": ""}).status_code == 422
    assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 1000}).status_code == 422


def test_compatibility_info_health_metrics(client):
    c = client.get("/tokenizer_compatibility").json()
    assert (
        c["compatible"]
        and c["vocabs_match"]
        and c["vocab_size_1"] == c["vocab_size_2"]
        and c["shared_width"] > 0
    )
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model_after"]["layers"] == 2 and info["model_after"]["dtype"] == "float32"
    assert info["model_after"]["device"] == "cpu" and info["versions"]["torch"]
    lda(client, max_new_tokens=3)
    text = client.get("/metrics").text
    for name in (
        "lda_requests_total",
        "lda_num_requests_waiting",
        "lda_num_requests_running",
        "lda_time_to_first_token_seconds_bucket",
        "lda_e2e_request_latency_seconds_bucket",
        "lda_generation_tokens_total",
    ):
        assert name in text
    assert 'route="/generate_lda",status="200"' in text
    assert 'route="/generate_lda",status="422"' in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    for phase in ("prefill", "decode"):  # the request's time in the running batch, by phase
        name = f'lda_request_{phase}_time_seconds'
        assert float(values[f'{name}_count{{route="/generate_lda"}}']) >= 1
        assert float(values[f'{name}_sum{{route="/generate_lda"}}']) > 0


def rejections(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("lda_queue_rejections_total "):
            return float(line.split()[1])
    raise AssertionError("lda_queue_rejections_total missing from /metrics")


def test_queue_full_is_429_with_retry_after(client):
    engine = client.app.state.engine
    rejected = rejections(client)
    gate = threading.Event()

    async def submit(fn):
        engine.submit(fn)

    client.portal.call(submit, lambda job: gate.wait(10))
    deadline = time.monotonic() + 5
    while engine.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        for _ in range(engine.queue_size):
            client.portal.call(submit, lambda job: None)
        r = lda(client, max_new_tokens=2)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "queue_full"
        assert rejections(client) == rejected + 1
    finally:
        gate.set()
    deadline = time.monotonic() + 5
    while engine.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lda(client, max_new_tokens=2).status_code == 200


def test_not_ready_until_loaded(tiny_dirs, tmp_path):
    gate = threading.Event()

    def slow_loader(settings):
        gate.wait(30)
        return load_pair(settings)

    with TestClient(create_app(make_settings(tiny_dirs, tmp_path), loader=slow_loader)) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        assert lda(c).status_code == 503
        gate.set()
        wait_ready(c)
        assert lda(c, max_new_tokens=2).status_code == 200


def test_incompatible_pair_is_409_for_lda_only(tiny_dirs, tmp_path):
    from lda import LDAModelPair, Side
    from app.demo import build_tokenizer
    from tests.tiny import CORPUS, tiny_llama

    def loader(settings):
        pair, _ = load_pair(settings)
        tok = build_tokenizer([t.upper() for t in CORPUS], vocab_size=300)
        return LDAModelPair(pair.after, Side("other", tiny_llama(tok, seed=9), tok)), None

    with TestClient(create_app(make_settings(tiny_dirs, tmp_path), loader=loader)) as c:
        wait_ready(c)
        r = lda(c)
        assert r.status_code == 409 and "vocabularies" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "incompatible_models"
        assert c.get("/tokenizer_compatibility").json()["compatible"] is False
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 3}).status_code == 200


def test_failed_load_reports_on_health_and_ready(tmp_path):
    settings = Settings(
        model_after_id=str(tmp_path / "missing"), model_before_id=str(tmp_path / "missing"), data_dir=tmp_path
    )
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").status_code == 503
        assert "failed to load" in c.get("/ready").json()["error"]["message"]


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/generate_lda",
        "/generate",
        "/tokenizer_compatibility",
        "/health",
        "/ready",
        "/info",
        "/metrics",
    } <= set(paths)


@pytest.mark.parametrize(
    "path, method",
    [
        ("/adapters/{name}", "get"),
        ("/adapters/{name}", "delete"),
        ("/weightdiff/jobs/{job_id}", "get"),
        ("/weightdiff/jobs/{job_id}", "delete"),
        ("/weightdiff/jobs/{job_id}/tasks/{task}/adapter", "get"),
    ],
)
def test_404_is_documented_as_not_found(client, path, method):
    responses = client.get("/openapi.json").json()["paths"][path][method]["responses"]
    assert responses["404"]["description"].startswith("no such ")
    assert responses["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"422", "503"} <= set(responses)  # and the errors every route can answer


def test_prompt_plus_completion_must_fit_the_context_window(client):
    long_prompt = "hello world " * 300  # > 512 tokens, the tiny models' window
    for route in ("/generate_lda", "/generate"):
        r = client.post(route, json={"prompt": long_prompt, "max_new_tokens": 10})
        assert r.status_code == 422, r.text
        msg = r.json()["error"]["message"]
        assert "context window of 512 tokens" in msg and "max_new_tokens (10)" in msg
    assert lda(client, max_new_tokens=2).status_code == 200  # and the engine keeps serving


def test_stream_reports_errors_in_band(client):
    body = {"prompt": "hello world " * 300, "max_new_tokens": 10, "stream": True}
    with client.stream("POST", "/generate_lda", json=body) as r:
        events = parse_sse(r.read().decode())
    assert events == [("error", {"error": {"message": events[0][1]["error"]["message"], "type": "invalid_request_error"}})]
    assert "context window" in events[0][1]["error"]["message"]


def test_body_size_and_open_stream_limits(tiny_dirs, tmp_path):
    settings = make_settings(tiny_dirs, tmp_path, max_body_bytes=2048, max_concurrent_streams=1)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/generate_lda", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "2048" in r.json()["error"]["message"]
        c.app.state.open_streams = 1  # as if another client held the only stream
        r = c.post("/generate_lda", json={"prompt": "Hello", "stream": True})
        assert r.status_code == 429 and "open streams" in r.json()["error"]["message"]
        assert rejections(c) == 1  # a refused stream is a rejection too
        c.app.state.open_streams = 0
        with c.stream("POST", "/generate_lda", json={"prompt": "Hello", "stream": True, "max_new_tokens": 3}) as s:
            assert s.status_code == 200 and "event: result" in s.read().decode()
        assert c.app.state.open_streams == 0  # released when the stream ended
