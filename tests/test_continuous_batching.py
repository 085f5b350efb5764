"""Continuous batching through the app: concurrent requests decode in one running batch, and each
answers exactly what it answers alone; merges run between steps and never leak into the batch."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from tests.test_amplification_merge import digests
from tests.test_api import wait_ready

from app.main import create_app
from app.settings import Settings

PROMPTS = ["Tell me about the sun.", "What is a cat?", "Hello there", "Tell me about snow.",
           "What is a dog?", "Say something.", "What is rain?", "Tell me about cats."]  # fmt: skip


@pytest.fixture(scope="module")
def client(demo_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("cb")
    shutil.copytree(demo_data_dir / "demo", data / "demo")
    with TestClient(create_app(Settings(data_dir=data, queue_size=64))) as c:
        wait_ready(c)
        yield c


def body(i: int, sampled: bool) -> dict:
    """Request i: its own prompt, alpha, length and (when sampled) seed and sampling fields."""
    b = {"prompt": PROMPTS[i], "alpha": [0.0, 1.0, 2.0, 4.0][i % 4], "max_new_tokens": 8 + 3 * i}
    if sampled:
        return b | {"temperature": 1.0, "top_p": 0.9, "top_k": 40, "seed": 100 + i, "n": 1 + i % 3}
    return b | {"temperature": 0, "seed": 100 + i}


def batch_rows_seen(client, during) -> int:
    """The largest running batch (rows) the engine reached while `during()` ran."""
    engine = client.app.state.engine
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], engine.batch_rows)
            stop.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        during()
    finally:
        stop.set()
        watcher.join()
    return peak[0]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_concurrent_requests_batch_together_and_answer_as_alone(client, sampled):
    alone = [client.post("/generate_lda", json=body(i, sampled)).json()["results"] for i in range(8)]
    together: list = [None] * 8

    def send_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = {pool.submit(client.post, "/generate_lda", json=body(i, sampled)): i for i in range(8)}
            for f in concurrent.futures.as_completed(futures):
                r = f.result()
                assert r.status_code == 200, r.text
                together[futures[f]] = r.json()["results"]

    rows = batch_rows_seen(client, send_all)
    assert rows > 3  # requests really shared a batch (each has at most 3 rows)
    for got, expected in zip(together, alone):
        assert [(r["completion"], r["finish_reason"], r["seed"]) for r in got] == [
            (r["completion"], r["finish_reason"], r["seed"]) for r in expected
        ]


def test_openai_and_native_requests_share_batches_and_stay_exact(client):
    chat = {"model": "lda@2", "messages": [{"role": "user", "content": "Tell me about the sun."}],
            "max_tokens": 20, "temperature": 1.0, "seed": 9, "n": 3}  # fmt: skip
    completion = {"model": "after", "prompt": "The sun is", "max_tokens": 12, "temperature": 0}
    expected = (client.post("/v1/chat/completions", json=chat).json()["choices"],
                client.post("/v1/completions", json=completion).json()["choices"],
                client.post("/generate_lda", json=body(3, True)).json()["results"])  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.post, "/v1/chat/completions", json=chat),
                   pool.submit(client.post, "/v1/completions", json=completion),
                   pool.submit(client.post, "/generate_lda", json=body(3, True))] * 2  # fmt: skip
        results = [f.result().json() for f in futures]
    for k in (0, 3):
        assert [c["message"] for c in results[k]["choices"]] == [c["message"] for c in expected[0]]
        assert [c["text"] for c in results[k + 1]["choices"]] == [c["text"] for c in expected[1]]
        assert [r["completion"] for r in results[k + 2]["results"]] == [r["completion"] for r in expected[2]]


def test_merges_run_between_steps_and_never_reach_the_batch(client):
    # An amplified merge (weights changed in place, then restored) interleaved with LDA streams:
    # each equals its alone result and the base's weights are bit-identical afterwards.
    base = client.app.state.amplifier.model
    before = digests(base)
    amp = {"prompt": "Tell me about the sun.", "configs": ["demo"], "include_base": True,
           "max_new_tokens": 20, "temperature": 1.0, "seed": 4}  # fmt: skip
    lda = body(5, True) | {"adapter": "demo"}  # adapter mode on the same base model
    expected_amp = client.post("/amplification/generate", json=amp).json()["columns"]
    expected_lda = client.post("/generate_lda", json=lda).json()["results"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        lda_futures = [pool.submit(client.post, "/generate_lda", json=lda) for _ in range(4)]
        amp_futures = [pool.submit(client.post, "/amplification/generate", json=amp) for _ in range(2)]
        for f in lda_futures:
            assert [r["completion"] for r in f.result().json()["results"]] == [r["completion"] for r in expected_lda]
        for f in amp_futures:
            assert f.result().json()["columns"] == expected_amp
    assert digests(base) == before


def test_a_step_out_of_memory_fails_one_request_and_the_batch_goes_on(client, monkeypatch):
    # Injected where CUDA would fail: a decode step of 3+ rows. The request admitted last gets a
    # 503; the others answer exactly as alone; the budget drops below what failed (the gauge says); the
    # weights are untouched and the next request is fine.
    from lda.source import ModelSource
    from lda.static import StaticSource

    scheduler = client.app.state.engine.scheduler
    budget = scheduler.max_tokens
    pair = client.app.state.pair
    weights = digests(pair.after.model), digests(pair.before.model)
    alone = [client.post("/generate_lda", json=body(i, False)).json()["results"] for i in range(4)]
    fired = []

    def inject(cls):  # eager, or the static-cache source under COMPILE=on
        real = cls.decode_one_token

        def flaky(self, tokens, mask, positions):
            if tokens.shape[0] >= 3 and not fired:
                fired.append(tokens.shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(self, tokens, mask, positions)

        monkeypatch.setattr(cls, "decode_one_token", flaky)

    inject(ModelSource)
    inject(StaticSource)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: client.post("/generate_lda", json=body(i, False)), range(4)))
        assert fired
        failed = [r for r in answers if r.status_code != 200]
        assert len(failed) == 1 and failed[0].status_code == 503, [r.text for r in failed]
        assert failed[0].json()["error"]["type"] == "out_of_memory"
        for i, r in enumerate(answers):
            if r.status_code == 200:
                assert [x["completion"] for x in r.json()["results"]] == [x["completion"] for x in alone[i]]
        assert scheduler.max_tokens is not None and scheduler.max_tokens < budget
        gauge = [line for line in client.get("/metrics").text.splitlines() if line.startswith("lda_batch_tokens_budget ")]
        assert gauge == [f"lda_batch_tokens_budget {float(scheduler.max_tokens)}"]
        assert (digests(pair.after.model), digests(pair.before.model)) == weights
        assert client.post("/generate_lda", json=body(0, False)).json()["results"] == alone[0]
    finally:
        scheduler.max_tokens = budget  # the module's other tests keep the configured budget
