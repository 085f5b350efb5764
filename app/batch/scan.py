"""`scan`: a diffing job (logit-diff mining + KL, or the activation difference lens) in blocks of
batches. Each actor runs the library's pass over its block and returns the pass's `partial()`;
the driver keeps every partial on disk (what `--resume` skips), and one last task on a worker merges
them in block order into a pass and writes the toolkit's files, as one server's job would. The run
lands in a JobStore under `--out/diffing_jobs/`: `DATA_DIR=--out` lists it in /diffing/jobs."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from pydantic import TypeAdapter

from lda.diffing import mine
from lda.diffing.adl import ADLPass
from lda.diffing.adl_files import write_adl
from lda.jobs import JobStore, write_json_atomic

from app.batch.loaded import Loaded
from app.diffing_lens.jobs import make_pass, metadata, request_from_spec, save_torch_atomic
from app.diffing_lens.names import RESULT, RUN_DIR, TOKEN_STATS, ZIP
from app.diffing_lens.schemas import DiffingRequest
from app.diffing_lens.specs import check_on_pair, resolve_rows, stored_spec
from app.settings import Settings

BLOCK_BATCHES = 4  # batches an actor reduces per block unless --block-size says otherwise
_REQUEST: TypeAdapter[Any] = TypeAdapter(DiffingRequest)


class ScanKind:
    name, unit, units = "scan", "batch", "batches"

    def __init__(self, req: Any, rows: list[Any], job_id: str | None = None, block_size: int | None = None) -> None:
        self.req, self.rows, self.job_id = req, rows, job_id
        self.block_size = block_size or BLOCK_BATCHES
        self.plan: dict[str, Any] = {}  # set once the checks ran (create) or from the store (reopen)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], settings: Settings, block_size: int | None) -> ScanKind:
        """A job file's body, as `POST /diffing/jobs` reads it (without MAX_DIFFING_ROWS: a pipeline
        is for scans larger than one server takes)."""
        req = _REQUEST.validate_python(raw)
        if getattr(req, "grader", None) is not None:
            raise ValueError(
                "grader: a batch scan does not grade (the grader calls an outside API per position); "
                "run the scan here, then grade it on the server"
            )
        return cls(req, resolve_rows(req, settings, None), block_size=block_size)

    def prepare(self, loaded: Loaded) -> dict[str, Any]:
        """The submit's checks on the pair; the plan is the tokenized samples and the stored spec."""
        samples = check_on_pair(self.req, loaded.pair, self.rows)
        return {"samples": samples, "spec": stored_spec(self.req, self.rows, loaded.pair)}

    def batches(self, plan: Mapping[str, Any]) -> list[list[Any]]:
        samples, size = plan["samples"], self.req.batch_size
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def run_block(self, loaded: Loaded, plan: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
        """Batches [start, stop) through a pass of their own; its partial (picklable, on the CPU)."""
        batches = self.batches(plan)
        with tempfile.TemporaryDirectory(prefix="scan-block-") as work:
            state = make_pass(self.req, loaded.pair, plan["samples"], Path(work))
            for batch in batches[block["start"] : block["stop"]]:
                state.add(batch)
            return state.partial()

    def finish(self, loaded: Loaded, plan: dict[str, Any], partials: list[Any], job_id: str) -> dict[str, Any]:
        """On a worker: merge the partials in block order, write the run as the server's job does;
        returns the result and the written files (relative path -> bytes)."""
        req, pair = self.req, loaded.pair
        with tempfile.TemporaryDirectory(prefix="scan-finish-") as tmp:
            root = Path(tmp)
            state = make_pass(req, pair, plan["samples"], root / "work")
            for partial in partials:
                state.merge(partial)
            meta = metadata(SimpleNamespace(id=job_id), req, pair)  # type: ignore[arg-type]
            if isinstance(state, ADLPass):
                result = write_adl(state, root / RUN_DIR, req.dataset_name, meta)
            else:
                result = state.finish(root / RUN_DIR, req.dataset_name, meta)
                write_json_atomic(root / TOKEN_STATS, state.token_stats().to_json())
            files = {
                str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file() and p.relative_to(root).parts[0] != "work"
            }
        return {"result": result, "files": files}


class ScanOutput:
    """The driver's side: one JobStore record; each block's partial saved as it arrives."""

    def __init__(self, out: Path) -> None:
        self.store = JobStore(out / "diffing_jobs")

    def _work(self, job_id: str) -> Path:
        return self.store.dir(job_id) / "work" / "blocks"

    def _block_file(self, job_id: str, start: int) -> Path:
        return self._work(job_id) / f"{start:08d}.pt"

    def create(self, kind: ScanKind, plan: dict[str, Any]) -> str:
        record = self.store.create(plan["spec"], [])
        kind.req = request_from_spec(plan["spec"])  # with the positions the checks defaulted
        kind.plan = plan
        record.status, record.started = "running", time.time()
        record.total_steps = len(kind.batches(plan))
        record.result = {"batch": {"block_size": kind.block_size}}
        self.store.save(record)
        save_torch_atomic(self._work(record.id).parent / "plan.pt", plan)
        return record.id

    def reopen(self, job_id: str) -> tuple[ScanKind, dict[str, Any]]:
        record = self.store.get(job_id)
        plan_file = self._work(job_id).parent / "plan.pt"
        if record is None or not plan_file.exists():
            raise ValueError(f"--resume: no batch scan {job_id!r} under {self.store.root}")
        if record.status == "cancelled":
            raise ValueError(f"--resume: scan {job_id} was cancelled")
        plan = torch.load(plan_file, weights_only=False)  # our own file: samples and the spec
        block_size = (record.result.get("batch") or {}).get("block_size")
        kind = ScanKind(request_from_spec(record.spec), record.spec["rows"], job_id, block_size)
        kind.plan = plan
        if record.status != "done":
            record.status, record.error, record.finished = "running", None, None
            self.store.save(record)
        return kind, plan

    def blocks(self, kind: ScanKind) -> list[dict[str, Any]]:
        total, size = len(kind.batches(kind.plan)), kind.block_size
        starts = range(0, total, size)
        return [
            {"start": s, "stop": min(s + size, total)} for s in starts if not self._block_file(kind.job_id or "", s).exists()
        ]

    def progress(self, kind: ScanKind) -> tuple[int, int]:
        record = self.store.require(kind.job_id or "")
        return record.step, record.total_steps or 0

    def commit(self, kind: ScanKind, block: dict[str, Any], partial: Any, seconds: float) -> int:
        """Keep the block's partial (once: a block saved already is skipped)."""
        job_id = kind.job_id or ""
        path = self._block_file(job_id, block["start"])
        if path.exists():
            return 0
        save_torch_atomic(path, {"block": block, "partial": partial})
        record = self.store.require(job_id)
        record.step += block["stop"] - block["start"]
        record.train_seconds += seconds
        self.store.save(record)
        return block["stop"] - block["start"]

    def fail(self, kind: ScanKind, message: str) -> None:
        self.store.fail(kind.job_id or "", message)

    def finish(self, kind: ScanKind, remote: Any) -> None:
        """Merge on a worker, then publish the files, result.json and the zip as the server does."""
        job_id = kind.job_id or ""
        record = self.store.require(job_id)
        if record.status == "done":
            return
        saved = [torch.load(p, weights_only=False) for p in sorted(self._work(job_id).glob("*.pt"))]
        partials = [s["partial"] for s in sorted(saved, key=lambda s: s["block"]["start"])]
        done = remote(kind.finish, kind.plan, partials, job_id)
        folder = self.store.dir(job_id)
        for name, data in done["files"].items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        write_json_atomic(folder / RESULT, done["result"])
        mine.zip_dir(folder / RUN_DIR, folder / ZIP)
        record.result = done["result"] | {"batch": record.result.get("batch")}
        record.outputs = {"run": str(folder / RUN_DIR), "zip": str(folder / ZIP)}
        record.status, record.finished = "done", time.time()
        self.store.save(record)

    def describe(self, kind: ScanKind) -> str:
        record = self.store.require(kind.job_id or "")
        return f"scan {record.id}: {record.step} batches; files under {self.store.dir(record.id) / RUN_DIR}"

