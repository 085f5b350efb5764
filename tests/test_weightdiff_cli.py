"""`python -m weightdiff JOB.yaml`: job validation, sharding, and one process == two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny import save, tiny_llama
from weightdiff.cli import load_job, parse_job, run_job, shard

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "The quick brown fox."}]


pytestmark = pytest.mark.usefixtures("one_thread")


def job_spec(output_dir: str, **overrides) -> dict:
    spec = {
        "model": "model",
        "output_dir": output_dir,
        "steps": 2,
        "r": 2,
        "lr": 1e-2,
        "tasks": [
            {"name": "fox", "samples": ["The quick brown fox jumps over the lazy dog.", "Hello world"]},
            {"name": "chat", "samples": [CHAT], "seed": 7},
        ],
    }
    spec.update(overrides)
    return spec


def one_task(*samples) -> dict:
    return {"tasks": [{"name": "a", "samples": list(samples)}]}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("weightdiff-job")
    save(tiny_llama(tokenizer, seed=31), tokenizer, root / "model")
    return root


def write_job(root: Path, name: str, spec: dict) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_parse_job_resolves_paths_and_seeds(job_dir):
    job = load_job(write_job(job_dir, "parse.yaml", job_spec("out", seed=100)))
    assert job.model == str(job_dir / "model") and job.output_dir == job_dir / "out"
    assert job.names == ("fox", "chat") and [t.seed for t in job.tasks] == [100, 7]
    assert job.config.steps == 2 and job.config.r == 2
    assert shard(job, 0, 2) == [0] and shard(job, 1, 2) == [1] and shard(job, 2, 3) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"tasks": []}, "tasks"),
        ({"r": 0}, "r"),
        ({"lr": 0}, "lr"),
        ({"targets": ["q_proj", "bogus_proj"]}, None),
        ({"epoch": 3}, "epoch"),
        ({"dtype": "int8"}, "dtype"),
        ({"tasks": [{"name": "a", "samples": ["x"]}, {"name": "a", "samples": ["y"]}]}, r"tasks\[1\].name"),
        ({"tasks": [{"name": "../a", "samples": ["x"]}]}, r"tasks\[0\].name"),
        ({"tasks": [{"name": "a", "samples": [""]}]}, r"tasks\[0\].samples\[0\]: empty text"),
        (
            one_task("x", {"text": "y", "loss": "mse"}),
            r"tasks\[0\]\.samples\[1\]\.loss: expected one of \['ce', 'kl_base'\], got 'mse'",
        ),
        (one_task({"text": "y", "weight": -2}), r"tasks\[0\]\.samples\[0\]\.weight: .* got -2"),
        (one_task({"text": "y", "weight": 0}), r"tasks\[0\]\.samples: every sample has weight 0"),
        (one_task({"text": "y", "messages": CHAT}), r"tasks\[0\]\.samples\[0\]: .*exactly one of"),
    ],
)
def test_bad_jobs_raise_value_error(overrides, field):
    spec = job_spec("out", **overrides)
    if field is None:
        parse_job(spec)  # target names are checked against the model, when training starts
        return
    with pytest.raises(ValueError, match=field):
        parse_job(spec)


def kl_job(output_dir: str) -> dict:
    """A CE task, a task mixing CE and KL, and a KL-only task, as sample objects in a job file."""
    tasks = [
        {"name": "fox", "samples": [{"text": "The quick brown fox jumps over the lazy dog."}]},
        {"name": "mixed", "samples": ["Hello world", {"messages": CHAT, "loss": "kl_base", "weight": 5}]},
        {"name": "kl", "samples": [{"text": "Hello world", "loss": "kl_base"},
                                   {"messages": CHAT, "loss": "kl_base"}]},
    ]
    return job_spec(output_dir, tasks=tasks, batch_size=2)


def test_job_file_accepts_sample_objects(job_dir):
    job = load_job(write_job(job_dir, "objects.yaml", kl_job("objects")))
    assert job.tasks[1].samples[1] == {"messages": CHAT, "loss": "kl_base", "weight": 5}
    written = run_job(job)
    assert [p.name for p in written] == ["fox", "mixed", "kl"]
    summary = json.loads((job_dir / "objects" / "kl" / "training.json").read_text())
    assert summary["losses"] == [0.0, 0.0]  # KL from the base is exactly 0 at init and stays there
    kl_only = load_file(job_dir / "objects" / "kl" / "adapter_model.safetensors")
    lora_a = [w for k, w in kl_only.items() if "lora_A" in k]  # down^T, zeros at init
    assert lora_a and all(not w.any() for w in lora_a)
    mixed = load_file(job_dir / "objects" / "mixed" / "adapter_model.safetensors")
    assert any(w.any() for k, w in mixed.items() if "lora_A" in k)


def test_unknown_target_fails_before_training(job_dir):
    job = load_job(write_job(job_dir, "bad-target.yaml", job_spec("bad", targets=["q_proj", "bogus_proj"])))
    with pytest.raises(ValueError, match="bogus_proj"):
        run_job(job)
    assert not (job_dir / "bad").exists()


def adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(out / name / "adapter_model.safetensors") for name in ("fox", "chat")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(job_dir: Path, name: str, launcher_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    job = write_job(job_dir, f"{name}.yaml", job_spec(name, dtype="float64"))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher_args,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "weightdiff",
        str(job),
    ]
    proc = subprocess.run(cmd, check=False, cwd=job_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_adapters(a: Path, b: Path) -> None:
    """The sharded runs train each task alone, the single run trains both in one batch: the same
    factors by the method, not bit for bit. The runs are float64 (`dtype: float64`) because in fp32
    the two batch layouts round differently and Adam's per-element normalisation amplifies that to
    ~1.7e-6 on some CPUs (see tests/test_weightdiff.py, EXACT); in float64 they agree to ~1e-15.
    A real sharding bug (wrong task, wrong seed) differs by O(lr) = 1e-2 or O(the init) = 0.3."""
    one, two = adapters(a), adapters(b)
    for task in one:
        assert one[task].keys() == two[task].keys()
        for key in one[task]:
            assert one[task][key].dtype == two[task][key].dtype == torch.float64
            torch.testing.assert_close(two[task][key], one[task][key], rtol=0.0, atol=1e-10)


@pytest.fixture(scope="module")
def single_run(job_dir) -> Path:
    written = run_job(load_job(write_job(job_dir, "one.yaml", job_spec("one", dtype="float64"))))
    assert [p.name for p in written] == ["fox", "chat"]
    assert (job_dir / "one" / "fox" / "adapter_config.json").exists()
    return job_dir / "one"


def test_accelerate_launch_cpu_gives_the_same_adapters(job_dir, single_run):
    """The documented command. Without an MPI hostfile accelerate's simple launcher starts ONE
    process for `--cpu --num_processes 2`; the CLI says so and trains every task there."""
    proc = launch(job_dir, "cpu", ["--cpu"])
    assert "one process trains every task" in proc.stderr or "[rank 1]" in proc.stderr
    assert_same_adapters(single_run, job_dir / "cpu")


def test_two_processes_write_the_same_adapters_as_one(job_dir, single_run):
    """Two real processes (tasks 0::2 and 1::2): `--multi_gpu` starts them through torchrun, and
    on a CPU-only host the CLI forms a gloo CPU group."""
    proc = launch(job_dir, "two", ["--multi_gpu"])
    assert "[rank 0]" in proc.stderr and "[rank 1]" in proc.stderr, proc.stderr[-3000:]
    assert_same_adapters(single_run, job_dir / "two")
