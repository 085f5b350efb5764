"""Diffing jobs survive a cancel and a restart: resumed from the last checkpoint, the results equal
an uninterrupted run's (same batches in the same order, so the same sums bit for bit)."""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient

from tests.test_api import wait_ready
from tests.test_diffing_api import wait_job

from app.demo.build import demo_texts
from app.main import create_app
from app.settings import Settings

MINING = {"method": "logit_diff", "top_k": 5, "batch_size": 2, "examples": 10, "llr_top": 20, "kl_reverse": True,
          "nmf": {"num_topics": 2, "max_iter": 20}}  # fmt: skip
ADL = {"method": "adl", "max_tokens_per_sample": 16, "layers": [1.0, 0.5], "batch_size": 2, "patchscope_positions": [0]}


@pytest.fixture()
def data_dir(demo_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("app.diffing_lens.jobs.CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every batch
    shutil.copytree(demo_data_dir / "demo", tmp_path / "demo")
    return tmp_path


def comparable(client, job_id, method):
    result = client.get(f"/diffing/jobs/{job_id}/result").json()
    if method == "adl":
        vectors = client.get(f"/diffing/jobs/{job_id}/vectors", params={"layer": 2, "position": 3}).json()
        return result, vectors
    return result, client.get(f"/diffing/jobs/{job_id}/token_stats").json()


def reference_and_started(client, body: dict, steps: int) -> tuple[str, str]:
    """A job run whole, and the same job started and left running past `steps` batches."""
    texts = demo_texts(client.app.state.pair.after.tokenizer, 60, seed=2)
    whole = client.post("/diffing/jobs", json=body | {"texts": texts}).json()["id"]
    assert wait_job(client, whole)["status"] == "done"
    job = client.post("/diffing/jobs", json=body | {"texts": texts}).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/diffing/jobs/{job}").json()["step"] < steps and time.monotonic() < deadline:
        time.sleep(0.01)
    return whole, job


@pytest.mark.parametrize("body", [MINING, ADL], ids=["logit_diff", "adl"])
def test_a_cancelled_job_resumes_to_the_uninterrupted_result(data_dir, body):
    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        wait_ready(client)
        whole, job = reference_and_started(client, body, 5)
        client.delete(f"/diffing/jobs/{job}")
        stopped = wait_job(client, job)
        assert stopped["status"] == "cancelled" and 5 <= stopped["step"] < 30
        assert client.post(f"/diffing/jobs/{whole}/resume").status_code == 422  # done: nothing to resume
        r = client.post(f"/diffing/jobs/{job}/resume")
        assert r.status_code == 202, r.text
        done = wait_job(client, job)
        assert done["status"] == "done", done["error"]
        a, b = comparable(client, whole, body["method"]), comparable(client, job, body["method"])
        for key in ("dataset_name", "num_samples", "total_positions"):
            assert a[0].get(key) == b[0].get(key)
        assert a == b


def test_a_job_stopped_by_a_restart_resumes(data_dir):
    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        wait_ready(client)
        whole, job = reference_and_started(client, MINING, 3)
    with TestClient(create_app(Settings(data_dir=data_dir))) as client:  # the restart
        wait_ready(client)
        stopped = client.get(f"/diffing/jobs/{job}").json()
        assert stopped["status"] == "interrupted" and stopped["step"] >= 3
        assert client.post(f"/diffing/jobs/{job}/resume").status_code == 202
        assert wait_job(client, job)["status"] == "done"
        assert comparable(client, whole, "logit_diff") == comparable(client, job, "logit_diff")
