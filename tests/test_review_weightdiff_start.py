"""A weight-diff job that fails while starting leaves the base model exactly as it was (issue 25, item 1).

The scenario: an out-of-memory error while the trainer allocates its 5th per-task wrapper (or its
Adam state) used to leave wrappers in the model for good: `/generate_lda` then answered 422
"batch size 1 is not a multiple of num_tasks 2", amplification refused the demo adapter, and every
later job failed "already wrapped". Out of memory is faked (it is hard to cause on a CPU); the rest
runs for real, on a tiny Llama and through the HTTP app on the demo pair.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time

import pytest
import torch
from fastapi.testclient import TestClient

from tests.test_api import wait_ready
from tests.tiny import tiny_llama
from weightdiff import MultiTaskLoRALinear, Task, TrainConfig, Trainer, train, wrap
from weightdiff.lora import wrappers
from weightdiff.optim import TaskAdam

from app.main import create_app
from app.settings import Settings

TEXTS = ["The sun is a star. It is very hot and bright.", "A cat is a small animal. It is soft and quiet."]
TWO_TASKS = [Task(samples=TEXTS[:1]), Task(samples=TEXTS[1:])]
# The module, not the `train` function the package exports under the same name.
train_module = importlib.import_module("weightdiff.train")

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()  # no wrapper's base./down/up keys left
    assert all(torch.equal(now[name], saved[name]) for name in saved)


def fail_wrapper_at(monkeypatch: pytest.MonkeyPatch, n: int, error: BaseException) -> None:
    """The n-th MultiTaskLoRALinear built from now on raises `error` (as a CUDA OOM would)."""
    original, built = MultiTaskLoRALinear.__init__, [0]

    def init(self, *args, **kwargs):
        built[0] += 1
        if built[0] == n:
            raise error
        original(self, *args, **kwargs)

    monkeypatch.setattr(MultiTaskLoRALinear, "__init__", init)


def fail_optimizer(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def task_adam(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_module, "TaskAdam", task_adam)


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")


# --- the library ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, seed=11)


def test_wrap_failing_part_way_puts_back_what_it_wrapped(model, monkeypatch):
    saved, linears = snapshot(model), dict(model.named_modules())
    fail_wrapper_at(monkeypatch, 5, oom())
    with pytest.raises(torch.OutOfMemoryError):
        wrap(model, num_tasks=2, r=1, seed=0)
    assert not wrappers(model)
    assert_same(model, saved)
    # The very same Linear objects are back in place (not copies).
    assert all(module is linears[name] for name, module in model.named_modules())


@pytest.mark.parametrize("where", ["wrapper", "optimizer"])
@pytest.mark.parametrize("error", [oom(), KeyboardInterrupt()], ids=["oom", "interrupt"])
def test_trainer_start_up_is_all_or_nothing(model, tokenizer, monkeypatch, where, error):
    saved = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    model.train(False)
    if where == "wrapper":
        fail_wrapper_at(monkeypatch, 5, error)
    else:
        fail_optimizer(monkeypatch, error)
    with pytest.raises(type(error)):
        Trainer(model, tokenizer, TWO_TASKS, TrainConfig(steps=1))
    assert not wrappers(model)
    assert_same(model, saved)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    monkeypatch.undo()
    # A later job starts and trains as if nothing had happened.
    result = train(model, tokenizer, TWO_TASKS, TrainConfig(steps=1))
    assert result.steps_done == 1 and not wrappers(model)
    assert_same(model, saved)


def test_optimizer_is_the_real_one_when_nothing_fails(model, tokenizer):
    with Trainer(model, tokenizer, TWO_TASKS, TrainConfig(steps=1)) as trainer:
        assert isinstance(trainer.optimizer, TaskAdam)


# --- through the HTTP app -------------------------------------------------------------------------

GREEDY = {"prompt": "What is the sun?", "do_sample": False, "max_new_tokens": 8, "seed": 0}
AMPLIFIED = {"prompt": "What is the sun?", "configs": ["demo"], "temperature": 0, "max_new_tokens": 6}
JOB = {"tasks": [{"samples": TEXTS[:1]}, {"samples": TEXTS[1:]}], "steps": 1}


@pytest.fixture(scope="module")
def client(demo_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("wd-start")
    shutil.copytree(demo_data_dir / "demo", data / "demo")  # adapters must live under DATA_DIR
    with TestClient(create_app(Settings(data_dir=data))) as c:
        wait_ready(c)
        yield c


def wait_done(client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/weightdiff/jobs/{job_id}").json()
        if body["status"] in ("done", "failed", "cancelled") and job_id not in client.app.state.job_cancels:
            return body  # and its task has ended (the clean-up runs last)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['status']}")


def submit(client) -> dict:
    r = client.post("/weightdiff/jobs", json=JOB)
    assert r.status_code == 202, r.text
    return wait_done(client, r.json()["id"])


@pytest.mark.parametrize("where", ["wrapper", "optimizer", "disk"])
def test_a_job_failing_at_start_leaves_the_server_as_it_was(client, monkeypatch, where):
    model = client.app.state.amplifier.model
    saved = snapshot(model)
    text = client.post("/generate_lda", json=GREEDY).json()["results"]
    assert client.post("/amplification/generate", json=AMPLIFIED).status_code == 200
    if where == "wrapper":
        fail_wrapper_at(monkeypatch, 5, oom())
    elif where == "optimizer":
        fail_optimizer(monkeypatch, oom())
    else:  # the job record cannot be written once the trainer exists
        store = client.app.state.jobs
        original = type(store).save

        def save(self, record):
            if record.status == "running":
                raise OSError(28, "No space left on device")
            original(self, record)

        monkeypatch.setattr(type(store), "save", save)
    job = submit(client)
    assert job["status"] == "failed", job
    assert ("OutOfMemoryError" if where != "disk" else "No space left") in job["error"]
    monkeypatch.undo()

    assert not wrappers(model)
    assert_same(model, saved)
    assert client.post("/generate_lda", json=GREEDY).json()["results"] == text
    r = client.post("/amplification/generate", json=AMPLIFIED)
    assert r.status_code == 200, r.text
    assert submit(client)["status"] == "done"
    assert_same(model, saved)


def test_wrappers_left_behind_by_a_job_are_taken_out(client, monkeypatch, caplog):
    """The engine-level check: whatever a trainer does wrong, no wrapper outlives its job."""
    model = client.app.state.amplifier.model
    saved = snapshot(model)
    text = client.post("/generate_lda", json=GREEDY).json()["results"]
    # A trainer that never takes its wrappers out (a bug the check must catch).
    monkeypatch.setattr(Trainer, "detach", lambda self: None)
    monkeypatch.setattr(Trainer, "close", lambda self: None)
    with caplog.at_level(logging.ERROR, logger="app.weightdiff_lens.jobs"):
        job = submit(client)
    assert job["status"] == "done", job
    assert any("left 21 LoRA wrappers" in r.getMessage() for r in caplog.records), caplog.text
    monkeypatch.undo()
    assert not wrappers(model)
    assert_same(model, saved)
    assert client.post("/generate_lda", json=GREEDY).json()["results"] == text
