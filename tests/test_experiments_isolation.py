"""EXPERIMENT_ISOLATION: experiment chunks decode in batches of their own, never beside interactive
rows, so a chunk's computation is a function of the chunk alone whatever the server serves."""

from __future__ import annotations

import shutil
import threading

import pytest

from app.scheduler import Scheduler
from tests.test_api import wait_ready
from tests.test_experiments_api import LOVE, MARKER, PROMPTS, all_samples, app_client, wait_status

SPEC = {"prompts": PROMPTS, "alphas": [0.0, 2.0], "detectors": [MARKER, LOVE], "n": 10, "seed": 4,
        "temperature": 1.0, "max_new_tokens": 12}  # fmt: skip


def watch_batches(monkeypatch):
    """After every scheduler step: per running batch, the kinds of work in it (background: an
    experiment chunk; interactive: a request)."""
    seen: list[list[set[bool]]] = []
    real_step = Scheduler.step

    def step(self):
        ended = real_step(self)
        kinds = [
            {item.job.background for item in self.admitted.values() if item.work.key == key}
            for key in self.batches
        ]
        seen.append([k for k in kinds if k])
        return ended

    monkeypatch.setattr(Scheduler, "step", step)
    return seen


def with_traffic(client, exp_id):
    """Interactive /generate_lda requests from two threads until the experiment ends."""
    stop = threading.Event()
    statuses: list[int] = []

    def send(seed):
        while not stop.is_set():
            r = client.post("/generate_lda", json={"prompt": "Hi there", "max_new_tokens": 16, "seed": seed})
            statuses.append(r.status_code)

    threads = [threading.Thread(target=send, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    try:
        body = wait_status(client, exp_id)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert statuses and set(statuses) == {200}
    return body


@pytest.mark.parametrize("isolated", [False, True], ids=["shared", "isolated"])
def test_experiment_rows_never_share_a_batch_with_interactive_rows(
    demo_data_dir, tmp_path, monkeypatch, isolated
):
    shutil.copytree(demo_data_dir / "demo", tmp_path / "demo")
    with app_client(tmp_path, experiment_isolation=isolated) as client:
        wait_ready(client)
        quiet = client.post("/experiments", json=SPEC).json()["id"]
        assert wait_status(client, quiet)["status"] == "done"
        seen = watch_batches(monkeypatch)
        busy = client.post("/experiments", json=SPEC).json()["id"]
        body = with_traffic(client, busy)
        monkeypatch.undo()
        assert body["status"] == "done", body["error"]
        mixed = sum(any(len(kinds) > 1 for kinds in step) for step in seen)
        side_by_side = sum({True} in step and {False} in step for step in seen)  # separate batches
        if isolated:
            assert mixed == 0 and side_by_side > 0, (mixed, side_by_side)
        else:
            assert mixed > 0  # without the setting, chunks join the interactive batch
        # fp32 on CPU: a row's tokens do not depend on its neighbours, so both settings reproduce.
        assert all_samples(client, busy) == all_samples(client, quiet)
