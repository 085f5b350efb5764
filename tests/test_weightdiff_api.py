"""`/weightdiff/jobs` end to end on the demo base: submit, progress, download, register, use, cancel, restart."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load

from app.main import create_app
from app.settings import Settings
from lda.jobs import JobStore
from tests.test_amplification_merge import digests
from tests.test_api import wait_ready

TEXTS = ["The sun is a star. It is very hot and bright.", "A cat is a small animal. It is soft and quiet."]
CHAT = [{"role": "user", "content": "What is the sun?"}, {"role": "assistant", "content": "The sun is a star."}]


@pytest.fixture(scope="module")
def data_dir(demo_data_dir, tmp_path_factory):
    """A fresh DATA_DIR that shares the session's demo build."""
    import shutil

    d = tmp_path_factory.mktemp("wd")
    shutil.copytree(demo_data_dir / "demo", d / "demo")  # a copy: adapters must live under DATA_DIR
    return d


def app_client(data_dir, **kw):
    return TestClient(create_app(Settings(data_dir=data_dir, max_weightdiff_tasks=4, max_weightdiff_samples=10, max_weightdiff_steps=1000, **kw)))


@pytest.fixture(scope="module")
def client(data_dir):
    with app_client(data_dir) as c:
        wait_ready(c)
        yield c


def wait_status(client, job_id, statuses=("done", "failed", "cancelled"), timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/weightdiff/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['status']}")


def test_submit_train_download_register_use(client):
    base = digests(client.app.state.pair.before.model)
    spec = {"tasks": [{"name": "plain", "samples": TEXTS}, {"name": "chat", "samples": [CHAT]}],
            "r": 2, "lr": 1e-2, "steps": 4, "register": True, "export_dit": True}
    r = client.post("/weightdiff/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_status(client, r.json()["id"])
    assert job["status"] == "done", job["error"]
    assert job["step"] == job["total_steps"] == 4 and set(job["outputs"]) == {"plain", "chat"}
    assert all(len(h) == 4 for h in job["losses"]) and job["losses"][0][-1] < job["losses"][0][0]
    assert digests(client.app.state.pair.before.model) == base  # the base is untouched
    z = zipfile.ZipFile(io.BytesIO(client.get(f"/weightdiff/jobs/{job['id']}/tasks/plain/adapter").content))
    assert {"plain/adapter_config.json", "plain/adapter_model.safetensors", "plain/dit.safetensors"} <= set(z.namelist())
    assert json.loads(z.read("plain/adapter_config.json"))["r"] == 2
    t = client.get(f"/weightdiff/jobs/{job['id']}/tasks/chat/adapter", params={"format": "tar"})
    assert "chat/adapter_model.safetensors" in tarfile.open(fileobj=io.BytesIO(t.content)).getnames()
    assert client.get(f"/weightdiff/jobs/{job['id']}/tasks/nope/adapter").status_code == 404
    name = job["registered"]["plain"]
    assert name == f"wd-{job['id']}-plain" and name in [a["name"] for a in client.get("/adapters").json()["adapters"]]
    amp = client.post("/amplification/generate", json={"prompt": "What is the sun?", "configs": [name], "include_base": True, "max_new_tokens": 8})
    assert amp.status_code == 200, amp.text
    lda = client.post("/generate_lda", json={"prompt": "What is the sun?", "adapter": name, "alpha": 2.0, "max_new_tokens": 8})
    assert lda.status_code == 200 and lda.json()["model_after"].endswith(name)
    assert any(j["id"] == job["id"] for j in client.get("/weightdiff/jobs").json()["jobs"])
    deadline = time.monotonic() + 5  # the job's task ends just after its record says done
    while job["id"] in client.app.state.job_cancels and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job["id"] not in client.app.state.job_cancels  # a finished job keeps no cancel flag


def test_sample_objects_train_with_kl_to_the_base(client):
    """A kl_base-only task stays at the base (its KL and gradient are exactly 0 at init); a task
    mixing the losses learns; strings and message lists still work beside the objects."""
    spec = {
        "tasks": [
            {"name": "kl", "samples": [{"text": TEXTS[0], "loss": "kl_base"},
                                       {"messages": CHAT, "loss": "kl_base"}]},
            {"name": "mixed", "samples": [TEXTS[1], {"messages": CHAT, "weight": 2.5},
                                          {"text": TEXTS[0], "loss": "kl_base", "weight": 5}]},
        ],
        "r": 2, "lr": 1e-2, "steps": 3, "batch_size": 3,
    }
    r = client.post("/weightdiff/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_status(client, r.json()["id"])
    assert job["status"] == "done", job["error"]
    assert job["losses"][0] == [0.0, 0.0, 0.0]
    assert job["losses"][1][-1] < job["losses"][1][0]
    z = zipfile.ZipFile(io.BytesIO(client.get(f"/weightdiff/jobs/{job['id']}/tasks/kl/adapter").content))
    weights = load(z.read("kl/adapter_model.safetensors"))
    lora_a = [w for k, w in weights.items() if "lora_A" in k]  # down^T: zeros at init
    assert lora_a and all(not w.any() for w in lora_a)


def test_sample_schema_mirrors_the_library():
    from typing import get_args

    from app.weightdiff_lens.schemas import SampleObject
    from weightdiff import LOSSES

    assert get_args(SampleObject.model_fields["loss"].annotation) == LOSSES


def test_store_hands_out_snapshots_not_the_live_record(tmp_path):
    """The engine thread mutates its record (and the trainer's loss lists) between saves."""
    store = JobStore(tmp_path)
    live = store.create({"tasks": []}, ["a"])
    live.status, live.losses = "running", [[1.0]]
    store.save(live)
    seen = store.get(live.id)
    listed = store.list()[0]
    live.step, live.losses[0].append(0.5), live.outputs.update(a="/x")  # progress not yet saved
    for snapshot in (seen, listed):
        assert snapshot.step == 0 and snapshot.losses == [[1.0]] and snapshot.outputs == {}
    seen.status = "done"  # nor can a reader change what the store holds
    assert store.get(live.id).status == "running"
    store.save(live)
    assert store.get(live.id).losses == [[1.0, 0.5]]


def test_generation_is_served_between_steps_and_cancel(client):
    greedy = {"prompt": "Tell me about a cat.", "do_sample": False, "max_new_tokens": 12}
    before = client.post("/generate", json=greedy).json()
    r = client.post("/weightdiff/jobs", json={"tasks": [{"samples": TEXTS * 4}], "steps": 400, "lr": 1e-2})
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/weightdiff/jobs/{job_id}").json()["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    during = client.post("/generate", json=greedy).json()  # queued behind a step, served before the next
    mid = client.get(f"/weightdiff/jobs/{job_id}").json()
    assert mid["status"] == "running" and 0 < mid["step"] < 400
    assert during == before
    assert client.delete(f"/weightdiff/jobs/{job_id}").json()["cancelling"] is True
    job = wait_status(client, job_id)
    assert job["status"] == "cancelled" and job["step"] < 400 and not job["outputs"]
    assert client.post("/generate", json=greedy).json() == before


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"samples": [""]}]}, "samples"),
        ({"tasks": [{"samples": []}]}, "samples"),
        ({"tasks": [{"samples": ["x"]}], "r": 0}, "r"),
        ({"tasks": [{"samples": ["x"]}], "lr": 0}, "lr"),
        ({"tasks": [{"samples": ["x"]}], "lr": -1e-3}, "lr"),
        ({"tasks": [{"samples": ["x"]}] * 5}, "tasks"),
        ({"tasks": [{"samples": ["x"] * 4}] * 3}, "too many samples (12 in all tasks), the limit is 10"),
        ({"tasks": [{"samples": ["x"]}], "steps": 1001}, "1001 optimizer steps, the limit is 1000"),
        ({"tasks": [{"samples": ["x", "y"]}], "epochs": 501}, "1002 optimizer steps, the limit is 1000"),
        ({"tasks": [{"samples": ["x"]}], "targets": ["q_proj", "nonsense_proj"]}, "nonsense_proj"),
        ({"tasks": [{"samples": [[{"role": "robot", "content": "x"}]]}]}, "role"),
        ({"tasks": [{"name": "a/b", "samples": ["x"]}]}, "name"),
        ({"tasks": [{"samples": [{"text": "x", "loss": "mse"}]}]}, "tasks.0.samples.0.object.loss"),
        ({"tasks": [{"samples": [{"text": "x", "weight": -1}]}]}, "tasks.0.samples.0.object.weight"),
        ({"tasks": [{"samples": [{"text": "x", "weight": "2"}]}]}, "tasks.0.samples.0.object.weight"),
        ({"tasks": [{"samples": [{"text": "x", "weight": 0}]}]}, "every sample has weight 0"),
        ({"tasks": [{"samples": [{"text": "x", "messages": CHAT}]}]}, "exactly one of 'text' and 'messages'"),
        ({"tasks": [{"samples": [{"loss": "kl_base"}]}]}, "exactly one of 'text' and 'messages'"),
        ({"tasks": [{"samples": [{"text": "x", "kind": "ce"}]}]}, "tasks.0.samples.0.object.kind"),
        ({"tasks": [{"samples": [3]}]}, "expected text, a list of chat messages or a sample object"),
    ],
)
def test_bad_jobs_are_422(client, spec, field):
    r = client.post("/weightdiff/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_unknown_job_is_404(client):
    assert client.get("/weightdiff/jobs/nope").status_code == 404
    assert client.delete("/weightdiff/jobs/nope").status_code == 404


def test_restart_marks_running_jobs_interrupted(data_dir):
    with app_client(data_dir) as c:
        wait_ready(c)
        done = c.post("/weightdiff/jobs", json={"tasks": [{"samples": TEXTS}], "steps": 2}).json()["id"]
        assert wait_status(c, done)["status"] == "done"
        long = c.post("/weightdiff/jobs", json={"tasks": [{"samples": TEXTS}], "steps": 1000}).json()["id"]
        deadline = time.monotonic() + 60
        while c.get(f"/weightdiff/jobs/{long}").json()["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    # A crash leaves "running" on disk with no shutdown to fix it: simulate one too.
    crashed = json.loads((data_dir / "jobs" / done / "job.json").read_text()) | {"id": "crashed00000", "status": "running", "step": 7}
    (data_dir / "jobs" / "crashed00000").mkdir()
    (data_dir / "jobs" / "crashed00000" / "job.json").write_text(json.dumps(crashed))
    with app_client(data_dir) as c:
        wait_ready(c)
        jobs = {j["id"]: j for j in c.get("/weightdiff/jobs").json()["jobs"]}
        assert jobs[long]["status"] == "interrupted" and 1 <= jobs[long]["step"] < 1000
        assert jobs["crashed00000"]["status"] == "interrupted" and jobs["crashed00000"]["step"] == 7
        assert jobs[done]["status"] == "done"
        assert c.get(f"/weightdiff/jobs/{done}/tasks/task0/adapter").status_code == 200


def test_info_does_not_walk_the_model_while_training_rewires_it(client):
    """`/info` answers from the summary taken at load, even mid-step with the wrappers attached."""
    import threading

    from weightdiff import Task, TrainConfig, Trainer

    expected = client.get("/info").json()["model_before"]["parameters"]
    amp, engine = client.app.state.amplifier, client.app.state.engine
    attached, release = threading.Event(), threading.Event()

    def mid_step(job):
        trainer = Trainer(amp.model, amp.pair.before.tokenizer, [Task(samples=TEXTS)], TrainConfig(r=4, steps=1))
        try:
            attached.set()
            release.wait(10)  # as if a training step were running on the engine thread
        finally:
            trainer.close()

    async def submit():
        return engine.submit(mid_step)

    job = client.portal.call(submit)
    try:
        assert attached.wait(30)
        assert client.get("/info").json()["model_before"]["parameters"] == expected
    finally:
        release.set()
    client.portal.call(lambda: job.future)
