"""The Ray Serve deployment: the same app as two replicas behind Serve's proxy, on the demo pair."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.demo import demo_prompts
from app.ray_serve import REPLICA_HEADER, build_app, deployment_options
from app.settings import Settings

# Set before Ray starts: the raylet hands its environment to the replicas it spawns.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # no token written under ~/.ray for a throwaway local cluster
    "OMP_NUM_THREADS": "1",  # two replicas on two cores
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(demo_data_dir) -> Iterator[str]:
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Half a CPU each: both replicas and Serve's own actors fit the 2 logical CPUs given above.
        args = {"num_replicas": "2", "num_cpus": "0.5", "num_gpus": "0", "data_dir": str(demo_data_dir)}
        serve.run(build_app(args), name="model-diff", route_prefix="/")  # returns once both are up
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_generate_lda_is_answered_by_two_replicas(serve_url):
    from ray import serve

    replicas = serve.status().applications["model-diff"].deployments["model-diff"].replica_states
    assert replicas == {"RUNNING": 2}

    body = {"prompts": [demo_prompts()[0]], "alphas": [0.0, 2.0], "temperature": 0, "max_new_tokens": 12}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{serve_url}/generate_lda", json=body, timeout=60)

    # Concurrent requests: Serve's router sends each to the less busy of the two replicas.
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(16)))
    for r in responses:
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_after"] == "demo/after" and out["model_before"] == "demo/before"
        assert [row["alpha"] for row in out["results"]] == [0.0, 2.0]
        assert out["completion"] == out["results"][0]["completion"] and out["tokens_generated"] > 0
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2
    # Greedy decoding on identical copies of the pair: every replica gives the same text.
    assert len({tuple(row["completion"] for row in r.json()["results"]) for r in responses}) == 1


def test_replicas_are_ready_when_serve_routes_to_them(serve_url):
    # Each replica's start-up waited for its own model load, so /ready holds on every one.
    r = httpx.get(f"{serve_url}/ready", timeout=30)
    assert r.status_code == 200 and REPLICA_HEADER in r.headers


def test_max_ongoing_requests_is_what_one_engine_accepts():
    options = deployment_options(Settings(queue_size=7, device="cpu"), min_replicas=1, max_replicas=4)
    assert options["max_ongoing_requests"] == 8 and options["max_queued_requests"] == 7
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2.0,
    }
    assert options["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 1.0}
    assert deployment_options(Settings(), num_replicas=2, num_gpus=1)["ray_actor_options"]["num_gpus"] == 1.0


def test_unknown_serve_run_arguments_are_refused():
    with pytest.raises(ValueError, match="bogus"):
        build_app({"bogus": "1"})
    with pytest.raises(ValueError, match="num_replicas"):
        build_app({"num_replicas": "two"})
