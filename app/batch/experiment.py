"""`experiment`: an experiment's samples in blocks of `chunk_size`, each decoded by an actor
through the server's chunk code (`chunk_generate` + `run_chunk_steps`), committed in order to an
ExperimentStore under `--out/experiments/`: `DATA_DIR=--out` lists it in /experiments."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lda import IncompatibleTokenizersError
from lda.experiments import ExperimentSpec, ExperimentStore, report_csv, report_png
from lda.experiments.runner import run_chunk_steps

from app.api.schemas import SamplingFields
from app.batch.loaded import Loaded
from app.experiments_lens.jobs import ChunkContext, check_spec, chunk_generate
from app.experiments_lens.schemas import ExperimentRequest
from app.experiments_lens.specs import build_spec, summary
from app.scheduler import run_alone
from app.settings import Settings


class ExperimentKind:
    name, unit, units = "experiment", "sample", "samples"

    def __init__(self, spec: ExperimentSpec, job_id: str | None = None) -> None:
        self.spec, self.job_id = spec, job_id

    @classmethod
    def parse(cls, raw: Mapping[str, Any], settings: Settings, block_size: int | None) -> ExperimentKind:
        """A job file's body, as `POST /experiments` reads it (no MAX_EXPERIMENT_SAMPLES: a
        pipeline is for runs larger than one server takes)."""
        req = ExperimentRequest.model_validate(raw)
        if block_size is not None:
            settings = settings.model_copy(update={"experiment_chunk_size": block_size})
        return cls(build_spec(req, settings, None))

    def prepare(self, loaded: Loaded) -> dict[str, str]:
        """The submit's checks on the pair; returns the pins (condition -> adapter content hash)."""
        pair, spec = loaded.pair, self.spec
        plain = [c for c in spec.conditions if c.adapter is None and c.amplification is None]
        if plain and not pair.compatibility.compatible:
            raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
        return check_spec(pair, loaded.amp, spec, self.fields, loaded.steerer)

    @property
    def fields(self) -> SamplingFields:
        return SamplingFields(**self.spec.sampling)

    def run_block(self, loaded: Loaded, pins: dict[str, str], block: dict[str, Any]) -> list[dict[str, Any]]:
        """Samples [start, stop): decoded in batches of their own, as EXPERIMENT_ISOLATION does."""
        assert self.job_id is not None
        context = ChunkContext(self.job_id, pins, isolated=True)
        generate = chunk_generate(
            loaded.pair, loaded.amp, self.fields, loaded.settings.max_batch_tokens, lambda: False, context,
            loaded.steerer,
        )  # fmt: skip
        steps = run_chunk_steps(self.spec, range(block["start"], block["stop"]), generate)
        return run_alone(steps, loaded.scheduler())


class ExperimentOutput:
    """The driver's side: the store under `--out`, one chunk commit per block."""

    def __init__(self, out: Path) -> None:
        self.store = ExperimentStore(out / "experiments")

    def create(self, kind: ExperimentKind, pins: dict[str, str]) -> str:
        record = self.store.create(kind.spec, pins)
        self.store.mark_running(record.id)
        return record.id

    def reopen(self, exp_id: str) -> tuple[ExperimentKind, dict[str, str]]:
        record = self.store.get(exp_id)
        if record is None:
            raise ValueError(f"--resume: no experiment {exp_id!r} under {self.store.root}")
        if record.status == "done":
            return ExperimentKind(self.store.spec(exp_id), exp_id), record.pins
        if record.status == "cancelled":
            raise ValueError(f"--resume: experiment {exp_id} was cancelled")
        self.store.mark_running(exp_id)
        return ExperimentKind(self.store.spec(exp_id), exp_id), record.pins

    def blocks(self, kind: ExperimentKind) -> list[dict[str, Any]]:
        assert kind.job_id is not None
        spec, start = kind.spec, self.store.resume_point(kind.job_id)
        return [
            {"start": s, "stop": min(s + spec.chunk_size, spec.total)} for s in range(start, spec.total, spec.chunk_size)
        ]

    def progress(self, kind: ExperimentKind) -> tuple[int, int]:
        record = self.store.require(kind.job_id or "")
        return record.done, record.total

    def commit(self, kind: ExperimentKind, block: dict[str, Any], records: list[dict[str, Any]], seconds: float) -> int:
        """Append the block's samples; a block committed already (a retry) is skipped. Returns the
        units it added."""
        exp_id = kind.job_id or ""
        if block["start"] < self.store.require(exp_id).done:
            return 0
        self.store.commit_chunk(exp_id, range(block["start"], block["stop"]), records, seconds)
        return block["stop"] - block["start"]

    def fail(self, kind: ExperimentKind, message: str) -> None:
        self.store.fail(kind.job_id or "", message)

    def finish(self, kind: ExperimentKind, remote: Any = None) -> list[Path]:
        """summary.json (the GET body's summary), report.csv and report.png beside the samples."""
        exp_id = kind.job_id or ""
        record, folder = self.store.require(exp_id), self.store.dir(exp_id)
        body = summary(record, kind.spec)
        paths = [folder / "summary.json", folder / "report.csv", folder / "report.png"]
        paths[0].write_text(json.dumps(body, indent=2) + "\n")
        paths[1].write_text(report_csv(body["summary"]))
        report_png(body["summary"], paths[2], title=kind.spec.name)
        return paths

    def describe(self, kind: ExperimentKind) -> str:
        record = self.store.require(kind.job_id or "")
        rows = summary(record, kind.spec)["summary"]
        lines = [f"{r['condition']:>24}  {r['detector']:<16} {r['hits']}/{r['total']}" for r in rows]
        return "\n".join(lines)
