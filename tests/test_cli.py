"""The real process: `python -m app` on loopback, the regression CLI against it, bad settings."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app import regression


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "DTYPE", "DEVICE", "PORT", "HOST"))
    }
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


@contextlib.contextmanager
def running_server(env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """`python -m app` as a real process until /ready; on exit SIGTERM, which must drain and exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        yield url
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()  # SIGTERM drains and exits cleanly
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    after, before = tiny_dirs
    port = free_port()
    env = server_env(
        MODEL_AFTER_ID=str(after),
        MODEL_BEFORE_ID=str(before),
        PORT=str(port),
        DATA_DIR=str(tmp_path_factory.mktemp("data")),
        LOG_LEVEL="warning",
    )
    with running_server(env, port, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


ARGS = ["--max-tokens", "8", "--temperature", "1.0"]


def test_regression_run_and_report(server, capsys):
    assert regression.main(["--server", server, *ARGS]) == 0
    out = capsys.readouterr().out
    assert "Server is up" in out and out.count("] ") >= 5 and "Tokens:" in out


def test_baseline_match_and_mismatch(server, tmp_path, capsys):
    saved = tmp_path / "baseline.json"
    assert regression.main(["--server", server, *ARGS, "--seed", "3", "-o", str(saved)]) == 0
    data = json.loads(saved.read_text())
    assert data["settings"]["seed"] == 3 and len(data["results"]) == 5
    # Settings come from the baseline, so a bare re-run reproduces it.
    assert regression.main(["--server", server, "--baseline", str(saved)]) == 0
    assert "PASS" in capsys.readouterr().out
    changed = regression.PROMPTS[2]
    for r in data["results"]:
        if r["prompt"] == changed:
            r["completion"] += " (edited)"
    saved.write_text(json.dumps(data))
    assert regression.main(["--server", server, "--baseline", str(saved)]) == 1
    out = capsys.readouterr().out
    assert f"CHANGED: {changed}" in out and "1 of 5 prompts changed" in out
    # A different seed than the baseline's changes completions too.
    data["results"][2]["completion"] = data["results"][2]["completion"].removesuffix(" (edited)")
    saved.write_text(json.dumps(data))
    assert (
        regression.main(["--server", server, "--baseline", str(saved), "--seed", "4", "--temperature", "1.5"])
        == 1
    )


def test_baseline_needs_a_seed(server, tmp_path, capsys):
    unseeded = tmp_path / "b.json"
    unseeded.write_text(json.dumps({"settings": {"seed": None}, "results": []}))
    assert regression.main(["--server", server, "--baseline", str(unseeded)]) == 1
    assert "seeded" in capsys.readouterr().out


def test_server_down_fails_fast(capsys):
    t0 = time.monotonic()
    assert regression.main(["--server", f"http://127.0.0.1:{free_port()}"]) == 1
    assert time.monotonic() - t0 < 10
    assert "not reachable" in capsys.readouterr().out


def test_live_server_streams_sse(server):
    body = {"prompt": "Hello world", "max_new_tokens": 6, "stream": True, "seed": 1}
    with httpx.stream("POST", f"{server}/generate_lda", json=body, timeout=30) as r:
        text = r.read().decode()
    assert r.status_code == 200 and text.count("event: token") >= 1 and "event: result" in text


@pytest.mark.parametrize(
    "env, name",
    [
        ({"DTYPE": "float8"}, "DTYPE"),
        ({"PORT": "eighty"}, "PORT"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"QUEUE_SIZE": "0"}, "QUEUE_SIZE"),
    ],
)
def test_invalid_settings_stop_with_one_line(env, name):
    proc = subprocess.run(
        [sys.executable, "-m", "app"], env=server_env(**env), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings") and name in lines[0], (
        proc.stderr
    )


def test_client_disconnect_frees_the_engine(server):
    # Big enough that the client's 0.5 s timeout ends it on any machine: 480 tokens x 16 rows of the
    # tiny pair took under 0.5 s on an idle 2-core one, x 256 rows 2.7 s (the context is 512 tokens).
    big = {"prompt": "Hello world", "max_new_tokens": 480, "n": 256, "temperature": 0, "stop": []}
    quick = {"prompt": "Hello world", "max_new_tokens": 1}
    t0 = time.monotonic()
    httpx.post(f"{server}/generate_lda", json=quick, timeout=30)
    alone = time.monotonic() - t0
    t0 = time.monotonic()
    full = httpx.post(f"{server}/generate_lda", json=big | {"max_new_tokens": 120}, timeout=60)
    per_120 = time.monotonic() - t0
    assert full.status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/generate_lda", json=big, timeout=0.5)  # the client gives up
    t0 = time.monotonic()
    r = httpx.post(f"{server}/generate_lda", json=quick, timeout=60)
    waited = time.monotonic() - t0
    assert r.status_code == 200
    # Without cancellation the quick request would queue behind ~2x `per_120` of decoding.
    assert waited < alone + per_120, (waited, alone, per_120)


def test_stream_disconnect_mid_stream_frees_the_engine(server):
    """A streaming client that hangs up after two tokens: the job stops at the next decode step,
    and the next request runs at once and normally."""
    big = {"prompt": "Hello world", "max_new_tokens": 480, "n": 16, "temperature": 0, "stop": []}
    quick = {"prompt": "Hello world", "max_new_tokens": 4, "temperature": 0, "seed": 0}
    expected = httpx.post(f"{server}/generate_lda", json=quick, timeout=30).json()["results"]
    t0 = time.monotonic()
    assert httpx.post(f"{server}/generate_lda", json=big | {"max_new_tokens": 120}, timeout=60).status_code == 200
    per_120 = time.monotonic() - t0
    tokens = 0
    with httpx.stream("POST", f"{server}/generate_lda", json=big | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            tokens += line.startswith("event: token")
            if tokens == 2:
                break  # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    r = httpx.post(f"{server}/generate_lda", json=quick, timeout=60)
    waited = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["results"] == expected
    # Without cancellation the quick request would queue behind ~4x `per_120` of decoding.
    assert waited < per_120, (waited, per_120)
