"""Job records on disk, for every kind of long-running work: one folder per record under a root,
the record a JSON file in it written atomically, outputs beside it.

`RecordStore` is what every store shares: loading the records at start (a damaged or foreign file
skipped, never fatal for the others), handing out copies, marking work a stopped process left active
as interrupted, and deleting a record's folder, only ever one directly under the root.
`JobStore` keeps `JobRecord`s (weight-diff, interpreter and diffing jobs);
`lda.experiments.ExperimentStore` keeps experiments, with their own commit protocol.

A process that dies mid-job leaves `status: running` on disk; `JobStore.recover()` at the next start
marks such jobs (and queued ones) `interrupted`, keeping the step they reached, so no job is ever
silently lost.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "interrupted")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` so that readers (and a crash) see the old file or the new one,
    never a torn one: a temporary file beside it, fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Record(Protocol):
    """What every store needs of its records."""

    id: str
    status: str
    created: float
    error: str | None


R = TypeVar("R", bound=Record)


class RecordStore(Generic[R]):
    """Records under `root/<id>/<FILE>`; readers on any thread get copies, never live records.

    Subclasses name the file, read one (`_load`) and write one (their own save: the copy it writes
    is the one readers get from then on); `_copy` may share parts that never change.
    """

    FILE: ClassVar[str]

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the dict readers copy from
        self._records: dict[str, R] = {}
        for path in sorted(self.root.glob(f"*/{self.FILE}")):
            try:
                record = self._load(path)
            except (OSError, ValueError, TypeError):
                continue  # a half-written or foreign file: never fatal for the other records
            if record.id != path.parent.name:
                # A record is written to `root/<its id>/`: one whose id names another folder (a copied
                # or hand-edited file, an id like "../x") would be saved, marked and deleted there.
                continue
            self._records[record.id] = record

    def _load(self, path: Path) -> R:
        raise NotImplementedError

    def _copy(self, record: R) -> R:
        return copy.deepcopy(record)

    def dir(self, record_id: str) -> Path:
        return self.root / record_id

    def get(self, record_id: str) -> R | None:
        """A copy of the record as last saved (None if unknown)."""
        with self._lock:
            record = self._records.get(record_id)
            return self._copy(record) if record is not None else None

    def require(self, record_id: str) -> R:
        """`get` for an id that must exist (KeyError otherwise)."""
        record = self.get(record_id)
        if record is None:
            raise KeyError(record_id)
        return record

    def list(self) -> list[R]:
        """Copies of all records, oldest first."""
        with self._lock:
            return [self._copy(r) for r in sorted(self._records.values(), key=lambda r: r.created)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def _publish(self, snapshot: R) -> None:
        with self._lock:
            self._records[snapshot.id] = snapshot

    def _interrupted(self, statuses: Collection[str], why: Callable[[R], str]) -> list[R]:
        """Copies of the records whose status is in `statuses`, marked interrupted with the error
        `why(record)` (asked before the status changes); the caller saves them."""
        lost = [r for r in self.list() if r.status in statuses]
        for record in lost:
            record.error = why(record)
            record.status = "interrupted"
        return lost

    def _remove(self, record_id: str, busy: Collection[str], refusal: Callable[[R], str]) -> R:
        """Forget a record and delete its folder, outputs included.

        Raises:
            KeyError: no such record.
            ValueError: `refusal(record)`, when its status is in `busy`.
        """
        with self._lock:
            record = self._records.get(record_id)
            if record is None:
                raise KeyError(record_id)
            if record.status in busy:
                raise ValueError(refusal(record))
            del self._records[record_id]
        folder = self.dir(record_id)
        if folder.resolve().parent == self.root.resolve():  # an id read from a foreign file stays inside
            shutil.rmtree(folder, ignore_errors=True)
        return record


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


class JobStore(RecordStore[JobRecord]):
    """Job records under `root/<id>/job.json`; outputs live beside them.

    The store keeps its own copy of each record: the job's driver mutates its record (and lists it
    shares with the trainer) on the engine thread, so readers on other threads get snapshots taken
    under the lock, never the live object.
    """

    FILE = "job.json"

    def _load(self, path: Path) -> JobRecord:
        return JobRecord(**json.loads(path.read_text()))

    def recover(self) -> list[str]:
        """At start: mark jobs a previous process left active as interrupted; returns their ids."""
        return self.interrupt(lambda r: f"the server stopped while the job was {r.status} (at step {r.step})")

    def interrupt(self, why: Callable[[JobRecord], str]) -> list[str]:
        """Mark every queued or running job interrupted, `why(record)` its error; returns their ids."""
        lost = self._interrupted(ACTIVE, why)
        for record in lost:
            record.finished = time.time()
            self.save(record)
        return [r.id for r in lost]

    def create(self, spec: dict[str, Any], task_names: list[str]) -> JobRecord:
        record = JobRecord(id=uuid.uuid4().hex[:12], spec=spec, task_names=task_names)
        self.dir(record.id).mkdir(parents=True)
        self.save(record)
        return record

    def save(self, record: JobRecord) -> None:
        with self._lock:
            snapshot = copy.deepcopy(record)
            self._records[record.id] = snapshot
            write_json_atomic(self.dir(record.id) / self.FILE, asdict(snapshot))

    def fail(self, job_id: str, message: str) -> JobRecord:
        """Mark the job failed with `message` (what `GET` shows as its error)."""
        record = self.require(job_id)
        record.status, record.error, record.finished = "failed", message, time.time()
        self.save(record)
        return record

    def remove(self, job_id: str) -> JobRecord:
        """Delete a finished job: its record and its folder, outputs included.

        Raises:
            KeyError: no such job.
            ValueError: the job is still queued or running (cancel it first).
        """
        return self._remove(
            job_id, ACTIVE, lambda r: f"job {job_id!r} is {r.status}: cancel it and wait until it stops"
        )
