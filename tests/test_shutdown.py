"""SIGTERM on the real process with work in flight: the open stream drains to its `result`, a
running weight-diff job is marked interrupted on disk, and the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx

from tests.test_cli import free_port, server_env
from tests.test_start_sh import wait_ready


def test_sigterm_drains_the_stream_in_flight_and_interrupts_jobs(tiny_dirs, tmp_path):
    after, before = tiny_dirs
    port, data = free_port(), tmp_path / "data"
    env = server_env(MODEL_AFTER_ID=str(after), MODEL_BEFORE_ID=str(before), PORT=str(port),
                     DATA_DIR=str(data), LOG_LEVEL="info", SHUTDOWN_TIMEOUT="60")
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        job = httpx.post(f"{url}/weightdiff/jobs", json={"tasks": [{"samples": ["a b c d"]}], "steps": 100000})
        assert job.status_code == 202, job.text
        body = {"prompts": [f"p{i}" for i in range(8)], "alphas": [0.0, 1.0], "max_new_tokens": 256,
                "temperature": 1.0, "seed": 1, "stream": True}
        events: list[tuple[str, float]] = []
        sent = None
        with httpx.stream("POST", f"{url}/generate_lda", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append((line[7:], time.monotonic()))
                    if sent is None:  # the stream is open and decoding: stop the server now
                        proc.send_signal(signal.SIGTERM)
                        sent = time.monotonic()
        assert proc.wait(90) == 0, log.read_text()
        names = [name for name, _ in events]
        assert names[-1] == "result", names[-5:]
        assert sum(t > sent for _, t in events) > 1  # tokens kept coming after the signal: it drained
        record = json.loads((data / "jobs" / job.json()["id"] / "job.json").read_text())
        assert record["status"] == "interrupted" and "shut down" in record["error"]
    finally:
        if proc.poll() is None:
            proc.kill()
