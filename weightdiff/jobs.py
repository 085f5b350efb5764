"""Weight-diff job records on disk: one folder per job, `job.json` written atomically.

A process that dies mid-job leaves `status: running` on disk; `JobStore.recover()` at the next
start marks such jobs (and queued ones) `interrupted`, keeping the step they reached, so no job is
ever silently lost.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "interrupted")


@dataclass
class JobRecord:
    id: str
    spec: dict[str, Any]
    task_names: list[str]
    status: str = "queued"
    step: int = 0
    total_steps: int | None = None
    losses: list[list[float]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    train_seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    registered: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)  # a kind's own outputs, e.g. held-out metrics

    def public(self) -> dict[str, Any]:
        body = asdict(self)
        body["spec"] = {k: v for k, v in self.spec.items() if k != "tasks"} | {"num_tasks": len(self.task_names)}
        return body


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobStore:
    """Job records under `root/<id>/job.json`; outputs live beside them.

    The store keeps its own copy of each record: the job's driver mutates its record (and lists it
    shares with the trainer) on the engine thread, so readers on other threads get snapshots taken
    under the lock, never the live object.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        for path in sorted(self.root.glob("*/job.json")):
            try:
                record = JobRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a half-written or foreign file: never fatal for the other jobs
            self._jobs[record.id] = record

    def recover(self) -> list[str]:
        """Mark jobs a previous process left active as interrupted; returns their ids."""
        lost = [r for r in self._jobs.values() if r.status in ACTIVE]
        for record in lost:
            record.error = f"the server stopped while the job was {record.status} (at step {record.step})"
            record.status = "interrupted"
            record.finished = time.time()
            self.save(record)
        return [r.id for r in lost]

    def create(self, spec: dict[str, Any], task_names: list[str]) -> JobRecord:
        record = JobRecord(id=uuid.uuid4().hex[:12], spec=spec, task_names=task_names)
        self.dir(record.id).mkdir(parents=True)
        self.save(record)
        return record

    def dir(self, job_id: str) -> Path:
        return self.root / job_id

    def save(self, record: JobRecord) -> None:
        with self._lock:
            snapshot = copy.deepcopy(record)
            self._jobs[record.id] = snapshot
            write_json_atomic(self.dir(record.id) / "job.json", asdict(snapshot))

    def get(self, job_id: str) -> JobRecord | None:
        """A copy of the record as last saved (None if unknown)."""
        with self._lock:
            record = self._jobs.get(job_id)
            return copy.deepcopy(record) if record is not None else None

    def list(self) -> list[JobRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in sorted(self._jobs.values(), key=lambda r: r.created)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def remove(self, job_id: str) -> JobRecord:
        """Delete a finished job: its record and its folder, outputs included.

        Raises:
            KeyError: no such job.
            ValueError: the job is still queued or running (cancel it first).
        """
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                raise KeyError(job_id)
            if record.status in ACTIVE:
                raise ValueError(f"job {job_id!r} is {record.status}: cancel it and wait until it stops")
            del self._jobs[job_id]
        folder = self.dir(job_id)
        if folder.resolve().parent == self.root.resolve():  # an id read from a foreign job.json stays inside
            shutil.rmtree(folder, ignore_errors=True)
        return record
