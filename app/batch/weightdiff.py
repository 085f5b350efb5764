"""`weightdiff`: a weight-diff job's tasks in blocks, each block trained together by an actor with
the library's trainer (tasks are independent, so a task's factors do not depend on its block),
exported by the driver as PEFT adapters into a JobStore under `--out/jobs/`: `DATA_DIR=--out`
lists the job in /weightdiff/jobs and serves its downloads."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lda.jobs import JobStore
from weightdiff import Task, export_dit, export_peft, train
from weightdiff.lora import select_targets

from app.batch.loaded import Loaded
from app.settings import Settings
from app.weightdiff_lens.schemas import JobRequest

BLOCK_TASKS = 8  # tasks an actor trains together unless --block-size says otherwise


class WeightDiffKind:
    name, unit, units = "weightdiff", "task", "tasks"

    def __init__(self, req: JobRequest, job_id: str | None = None, block_size: int | None = None) -> None:
        self.req, self.job_id, self.block_size = req, job_id, block_size or BLOCK_TASKS

    @classmethod
    def parse(cls, raw: Mapping[str, Any], settings: Settings, block_size: int | None) -> WeightDiffKind:
        """A job file's body, as `POST /weightdiff/jobs` reads it (without the server's size limits)."""
        req = JobRequest.model_validate(raw)
        if req.register_adapters:
            raise ValueError(
                "register: a batch run has no server to register adapters on; load the exported "
                "adapters with POST /v1/load_lora_adapter"
            )
        return cls(req, block_size=block_size)

    def prepare(self, loaded: Loaded) -> str | None:
        """Checks the targets on the model; returns the base model's name for the adapter configs."""
        model = loaded.amp.model
        if self.req.targets is not None:
            select_targets(model, self.req.targets)
        config = getattr(model, "config", None)
        return getattr(config, "_name_or_path", None) or None

    def tasks(self, indices: range) -> list[Task]:
        """Tasks with their job-wide seeds: a task's default seed is `seed + its index in the job`,
        whichever block trains it (the trainer would number a block's tasks from 0)."""
        req = self.req
        return [
            Task(req.tasks[i].library_samples(), seed=req.seed + i if req.tasks[i].seed is None else req.tasks[i].seed,
                 name=req.task_names[i])
            for i in indices
        ]  # fmt: skip

    def run_block(self, loaded: Loaded, base_name: str | None, block: dict[str, Any]) -> dict[str, Any]:
        """Train tasks [start, stop) together; their factors (on the CPU) and loss curves."""
        from app.amplification_lens.jobs import text_side

        model, side = loaded.amp.model, text_side(loaded.amp.pair)
        result = train(model, side.tokenizer, self.tasks(range(block["start"], block["stop"])), self.req.train_config())
        factors = [{n: type(f)(f.down.detach().cpu(), f.up.detach().cpu()) for n, f in task.items()} for task in result.factors]
        return {"factors": factors, "losses": result.losses, "steps": result.steps_done}


class WeightDiffOutput:
    """The driver's side: one JobStore record, adapters written as their blocks arrive."""

    def __init__(self, out: Path) -> None:
        self.store = JobStore(out / "jobs")

    def create(self, kind: WeightDiffKind, base_name: str | None) -> str:
        req = kind.req
        record = self.store.create(req.model_dump(), req.task_names)
        record.status, record.started = "running", time.time()
        record.losses = [[] for _ in req.task_names]
        record.result = {"batch": {"base_model": base_name, "block_size": kind.block_size}}
        self.store.save(record)
        return record.id

    def reopen(self, job_id: str) -> tuple[WeightDiffKind, str | None]:
        record = self.store.get(job_id)
        if record is None:
            raise ValueError(f"--resume: no weight-diff job {job_id!r} under {self.store.root}")
        if record.status == "cancelled":
            raise ValueError(f"--resume: weight-diff job {job_id} was cancelled")
        batch = record.result.get("batch") or {}
        kind = WeightDiffKind(JobRequest.model_validate(record.spec), job_id, batch.get("block_size"))
        if record.status != "done":
            record.status, record.error, record.finished = "running", None, None
            self.store.save(record)
        return kind, batch.get("base_model")

    def blocks(self, kind: WeightDiffKind) -> list[dict[str, Any]]:
        record, size = self.store.require(kind.job_id or ""), kind.block_size
        total = len(record.task_names)
        return [
            {"start": s, "stop": min(s + size, total)}
            for s in range(0, total, size)
            if any(name not in record.outputs for name in record.task_names[s : s + size])
        ]

    def progress(self, kind: WeightDiffKind) -> tuple[int, int]:
        record = self.store.require(kind.job_id or "")
        return len(record.outputs), len(record.task_names)

    def commit(self, kind: WeightDiffKind, block: dict[str, Any], output: dict[str, Any], seconds: float) -> int:
        """Export the block's adapters, then record them (a block exported already is skipped)."""
        record, req = self.store.require(kind.job_id or ""), kind.req
        names = record.task_names[block["start"] : block["stop"]]
        if all(name in record.outputs for name in names):
            return 0
        base = record.result.get("batch", {}).get("base_model")
        folder = self.store.dir(record.id)
        for offset, (name, factors) in enumerate(zip(names, output["factors"], strict=True)):
            path = export_peft(factors, base, folder / name, lora_alpha=req.lora_alpha)
            if req.export_dit:
                export_dit(factors, path / "dit.safetensors", lora_alpha=req.lora_alpha)
            record.outputs[name] = str(path)
            record.losses[block["start"] + offset] = output["losses"][offset]
        record.step = max(record.step, output["steps"])
        record.total_steps = max(record.total_steps or 0, output["steps"])
        record.train_seconds += seconds
        self.store.save(record)
        return len(names)

    def fail(self, kind: WeightDiffKind, message: str) -> None:
        self.store.fail(kind.job_id or "", message)

    def finish(self, kind: WeightDiffKind, remote: Any = None) -> list[Path]:
        record = self.store.require(kind.job_id or "")
        if record.status != "done":
            record.status, record.finished = "done", time.time()
            self.store.save(record)
        return [Path(p) for p in record.outputs.values()]

    def describe(self, kind: WeightDiffKind) -> str:
        record = self.store.require(kind.job_id or "")
        last = [f"{name}: loss {h[0]:.4g} -> {h[-1]:.4g}" for name, h in zip(record.task_names, record.losses) if h]
        return "\n".join(last[:20] + ([f"... ({len(last) - 20} more)"] if len(last) > 20 else []))


