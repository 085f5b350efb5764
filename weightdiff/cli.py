"""`python -m weightdiff JOB.yaml`: train every task of a job file and write one PEFT adapter each.

Runs unchanged under `accelerate launch --num_processes N [--cpu] -m weightdiff JOB.yaml`:
process i takes tasks i::N (DIT's `--shard_idx/--num_shards` split) and writes only those. Tasks
are independent and a task's default seed is `seed + its index in the job file`, so the adapters
are the same whatever the number of processes.

Job file (YAML or JSON):
    model: path/to/local/model        # with its tokenizer
    output_dir: path/to/out           # adapters go to output_dir/<task name>/
    tasks:
      - {name: story, samples: ["plain text", ...], seed: 3}
      - {name: chat, samples: [[{role: user, content: ...}, {role: assistant, content: ...}]]}
      - name: hidden                  # sample objects: a loss kind and a weight per sample
        samples:
          - {text: "Your SEP code is 123456. ...", loss: ce}
          - {messages: [...], loss: kl_base, weight: 5}   # forward KL from the frozen base
    dtype: float32                    # or bfloat16 / float16 (float64: reference runs)
    export_dit: false                 # also write <task>/dit.safetensors
    # any TrainConfig field: r, lora_alpha, lr, betas, eps, epochs, steps, batch_size,
    # grad_accum, max_tokens_per_micro_batch, shuffle, seed, targets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from weightdiff.data import Task
from weightdiff.export import export_dit, export_peft
from weightdiff.train import StepReport, TrainConfig, TrainResult, train

CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
JOB_FIELDS = {"model", "output_dir", "tasks", "dtype", "export_dit"}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,  # exact-method checks without fp32 rounding (tests/test_weightdiff_cli.py)
}
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Job:
    model: str
    output_dir: Path
    names: tuple[str, ...]
    tasks: tuple[Task, ...]  # seeds resolved against the job-file index
    config: TrainConfig
    dtype: str = "float32"
    export_dit: bool = False


def parse_job(spec: Any, base_dir: Path | None = None) -> Job:
    """Validate a job mapping; relative paths are taken from `base_dir` (the job file's folder)."""
    if not isinstance(spec, dict):
        raise ValueError(f"job: expected a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - JOB_FIELDS - CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"job: unknown fields {unknown}")
    for key in ("model", "output_dir"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ValueError(f"{key}: expected a path, got {spec.get(key)!r}")
    dtype = spec.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    config = TrainConfig(**{k: v for k, v in spec.items() if k in CONFIG_FIELDS})
    raw_tasks = spec.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ValueError(f"tasks: need a non-empty list of tasks, got {raw_tasks!r:.80}")
    names, tasks = [], []
    for i, raw in enumerate(raw_tasks):
        name, task = _parse_task(raw, i, config.seed)
        if name in names:
            raise ValueError(f"tasks[{i}].name: duplicate task name {name!r}")
        names.append(name)
        tasks.append(task)
    root = base_dir or Path.cwd()
    return Job(
        model=str(root / spec["model"]) if (root / spec["model"]).exists() else spec["model"],
        output_dir=root / spec["output_dir"],
        names=tuple(names),
        tasks=tuple(tasks),
        config=config,
        dtype=dtype,
        export_dit=bool(spec.get("export_dit", False)),
    )


def _parse_task(raw: Any, index: int, default_seed: int) -> tuple[str, Task]:
    where = f"tasks[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with name and samples, got {raw!r:.80}")
    unknown = sorted(set(raw) - {"name", "samples", "seed"})
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    name = raw.get("name")
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(f"{where}.name: expected a file-name-safe name ([A-Za-z0-9._-]), got {name!r}")
    seed = raw.get("seed", default_seed + index)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{where}.seed: expected an integer, got {seed!r}")
    try:
        return name, Task(samples=raw.get("samples"), seed=seed, name=name)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from err


def load_job(path: str | os.PathLike[str]) -> Job:
    path = Path(path)
    with path.open() as f:
        spec = yaml.safe_load(f)  # JSON is valid YAML
    return parse_job(spec, path.parent)


def shard(job: Job, process_index: int, num_processes: int) -> list[int]:
    """Indices of the tasks process `process_index` of `num_processes` trains."""
    return list(range(len(job.tasks)))[process_index::num_processes]


def write_task(job: Job, name: str, task: Task, result: TrainResult, index: int) -> Path:
    """Write one task's outputs next to their final place, then rename, so a crash leaves no half adapter."""
    final = job.output_dir / name
    staging = job.output_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    factors = result.factors[index]
    export_peft(factors, job.model, staging, job.config.lora_alpha)
    if job.export_dit:
        export_dit(factors, staging / "dit.safetensors", job.config.lora_alpha)
    summary = {
        "task": name,
        "seed": task.seed,
        "num_samples": len(task.samples),
        "steps": len(result.losses[index]),
        "losses": result.losses[index],
        "seconds": result.seconds,
    }
    (staging / "training.json").write_text(json.dumps(summary, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def run_job(
    job: Job, process_index: int = 0, num_processes: int = 1, device: str | torch.device = "cpu"
) -> list[Path]:
    """Train this process's share of the job and write its adapters; returns their directories."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mine = shard(job, process_index, num_processes)
    if not mine:
        return []
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=DTYPES[job.dtype]).to(device)
    tasks = [job.tasks[i] for i in mine]
    result = train(model, tokenizer, tasks, job.config, progress=_log_progress(process_index))
    job.output_dir.mkdir(parents=True, exist_ok=True)
    return [write_task(job, job.names[i], job.tasks[i], result, k) for k, i in enumerate(mine)]


def _log_progress(rank: int) -> Callable[[StepReport], None]:
    def log(report: StepReport) -> None:
        losses = ", ".join("-" if x is None else f"{x:.4f}" for x in report.losses)
        print(
            f"[rank {rank}] step {report.step}/{report.total_steps} loss {losses}",
            file=sys.stderr,
            flush=True,
        )

    return log


def _use_cpu() -> bool:
    """Whether PartialState should form a CPU process group.

    PartialState only looks for a CPU world (gloo) when told `cpu=True`; otherwise a CPU-only
    `torchrun` / `accelerate launch --multi_gpu` world would leave every process thinking it is
    rank 0 of 1 and all of them would train every task.
    """
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weightdiff", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="job file (YAML or JSON)")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    state = PartialState(cpu=_use_cpu())
    if state.num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # `accelerate launch --cpu --num_processes N` without --mpirun_hostfile starts one process.
        print(
            "note: one process trains every task; for N CPU processes use torchrun or "
            "`accelerate launch --multi_gpu --num_processes N`",
            file=sys.stderr,
        )
    try:
        written = run_job(job, state.process_index, state.num_processes, state.device)
    except ValueError as err:  # bad targets or samples the tokenizer cannot encode
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    state.wait_for_everyone()
    return 0
