"""Experiments on disk: `root/<id>/spec.json` (written once), `root/<id>/experiment.json` (the
record, rewritten atomically per chunk) and `root/<id>/samples.jsonl` (appended).

The spec never changes after `create`, and it can hold 100k prompts: it is written once, parsed once
(`ExperimentStore.spec`) and shared, not copied, by the records the store hands out, so a chunk
costs a small record write, not a copy, a parse and a rewrite of every prompt. (Records written
before spec.json existed carry the spec inside experiment.json; they load as they are.)

Commit protocol for one chunk, so a crash at any point can neither lose nor double-count samples:
  1. truncate samples.jsonl back to `committed_bytes` (dropping a torn or uncommitted tail), append
     the chunk's lines, fsync;
  2. write the record atomically with the new `done`, `committed_bytes` and counts.
A crash between 1 and 2 leaves the record one chunk behind; the next commit (or `resume_point`)
truncates the file back to the record's `committed_bytes` and the chunk runs again, identically,
because sample i always decodes with `seed + i`. Counts live only in the record, so they always
describe exactly the committed chunks, also with store="hits" where most samples are never written.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lda.experiments.spec import ExperimentSpec
from lda.jobs import RecordStore, write_json_atomic

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "cancelled")
RESUMABLE = ("queued", "interrupted", "failed")


def _serialized(method):
    """Run a read-modify-write method under the store's write lock.

    The engine thread commits chunks while HTTP threads cancel or requeue; without the lock a
    cancel could save a stale copy over a fresh commit (or a commit drop the cancel flag).
    """

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._write_lock:
            return method(self, *args, **kwargs)

    return locked


class ExperimentStoreError(Exception):
    """Writing an experiment failed (disk full, permissions): the runner marks it failed.

    The committed chunks stay on disk and count; the failed chunk is dropped on the next attempt.
    """


@dataclass
class ExperimentRecord:
    id: str
    spec: dict[str, Any]
    total: int
    status: str = "queued"
    done: int = 0  # samples [0, done) are committed
    committed_bytes: int = 0  # length of samples.jsonl at the last commit
    written: int = 0  # lines in samples.jsonl up to committed_bytes
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # [condition][detector] -> hits
    totals: dict[str, int] = field(default_factory=dict)  # [condition] -> samples done
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    run_seconds: float = 0.0  # generation time summed over committed chunks, across restarts
    samples_per_s: float | None = None
    eta_s: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    # Condition label -> content hash of what it decodes with (adapter, amplification config),
    # taken at submit: a chunk refuses to decode when the hash changed (the caller checks it).
    pins: dict[str, str] = field(default_factory=dict)

    def experiment_spec(self) -> ExperimentSpec:
        """The spec parsed afresh; the store's `spec(exp_id)` parses it once per experiment."""
        return ExperimentSpec.from_dict(self.spec)


class ExperimentStore(RecordStore[ExperimentRecord]):
    """Experiment records under `root/<id>/`; readers on any thread get copies, never live records
    (the copies share the record's `spec` dict, which nobody changes after `create`)."""

    FILE = "experiment.json"

    def __init__(self, root: Path) -> None:
        self._write_lock = threading.RLock()  # serializes the read-modify-write methods
        self._specs: dict[str, ExperimentSpec] = {}  # parsed once per experiment, on first use
        self._spec_files: set[str] = set()  # ids whose spec.json exists: their records omit the spec
        super().__init__(root)  # loads the records (`_load`), skipping foreign or damaged files

    def samples_path(self, exp_id: str) -> Path:
        return self.dir(exp_id) / "samples.jsonl"

    def spec_path(self, exp_id: str) -> Path:
        return self.dir(exp_id) / "spec.json"

    def create(self, spec: ExperimentSpec, pins: Mapping[str, str] | None = None) -> ExperimentRecord:
        """Store a new queued experiment; `pins` are the content hashes its chunks must find."""
        record = ExperimentRecord(
            id=uuid.uuid4().hex[:12], spec=spec.to_dict(), total=spec.total, pins=dict(pins or {})
        )
        try:
            self.dir(record.id).mkdir(parents=True)
            self.samples_path(record.id).touch()
            write_json_atomic(self.spec_path(record.id), record.spec)
        except OSError as exc:
            raise ExperimentStoreError(f"creating experiment {record.id} failed: {exc}") from exc
        with self._lock:
            self._spec_files.add(record.id)
            self._specs[record.id] = spec
        self._save(record)
        return self._copy(record)

    def spec(self, exp_id: str) -> ExperimentSpec:
        """The experiment's parsed spec, parsed on first use and kept (a spec never changes)."""
        with self._lock:
            spec = self._specs.get(exp_id)
        if spec is None:
            spec = ExperimentSpec.from_dict(self.require(exp_id).spec)
            with self._lock:
                spec = self._specs.setdefault(exp_id, spec)
        return spec

    def require(self, exp_id: str) -> ExperimentRecord:
        record = self.get(exp_id)
        if record is None:
            raise KeyError(exp_id)
        return record

    @_serialized
    def recover(self) -> list[str]:
        """At startup: mark experiments left running as interrupted; return the ids to resume.

        The ids are those queued or interrupted (not failed: a failure needs `requeue` by a person),
        oldest first.
        """
        def why(record: ExperimentRecord) -> str:
            return f"the server stopped while the experiment was running (at sample {record.done})"

        for record in self._interrupted(("running",), why):
            self._save(record, strict=False)
        return [r.id for r in self.list() if r.status in ("queued", "interrupted")]

    @_serialized
    def resume_point(self, exp_id: str) -> int:
        """The first sample index not durably committed; cuts samples.jsonl back to the last commit."""
        record = self.require(exp_id)
        self._truncate(record)
        return record.done

    @_serialized
    def mark_running(self, exp_id: str) -> ExperimentRecord:
        record = self.require(exp_id)
        self._truncate(record)
        record.status, record.error = "running", None
        record.started = record.started or time.time()
        self._save(record)
        return record

    @_serialized
    def commit_chunk(
        self, exp_id: str, chunk: range, records: Sequence[Mapping[str, Any]], seconds: float
    ) -> ExperimentRecord:
        """Append a finished chunk's samples and count them (see the module docstring)."""
        record = self.require(exp_id)
        if chunk.start != record.done or len(records) != len(chunk):
            raise ValueError(f"chunk {chunk} does not continue experiment {exp_id} at sample {record.done}")
        keep_all = record.spec["store"] == "all"
        lines = [r for r in records if keep_all or r["hits"]]
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in lines).encode()
        self._append(record, data, chunk)
        for sample in records:
            condition = sample["condition"]
            record.totals[condition] = record.totals.get(condition, 0) + 1
            row = record.counts.setdefault(condition, {})
            for name in sample["hits"]:
                row[name] = row.get(name, 0) + 1
        record.done = chunk.stop
        record.committed_bytes += len(data)
        record.written += len(lines)
        record.run_seconds += seconds
        record.samples_per_s = record.done / record.run_seconds if record.run_seconds > 0 else None
        record.eta_s = (record.total - record.done) / record.samples_per_s if record.samples_per_s else None
        if record.done == record.total:
            record.status, record.finished, record.eta_s = "done", time.time(), 0.0
        self._save(record)
        return record

    @_serialized
    def fail(self, exp_id: str, message: str) -> ExperimentRecord:
        record = self.require(exp_id)
        record.status, record.error, record.finished = "failed", message, time.time()
        self._save(record, strict=False)  # already reporting an error: a full disk must not mask it
        return record

    @_serialized
    def cancel(self, exp_id: str) -> ExperimentRecord:
        """Cancel now if not running; a running experiment stops at its next chunk boundary."""
        record = self.require(exp_id)
        if record.status in FINAL:
            return record
        if record.status == "running":
            record.cancel_requested = True
        else:
            record.status, record.finished = "cancelled", time.time()
        self._save(record)
        return record

    @_serialized
    def finish_cancelled(self, exp_id: str) -> ExperimentRecord:
        record = self.require(exp_id)
        record.status, record.finished, record.eta_s = "cancelled", time.time(), None
        self._save(record)
        return record

    @_serialized
    def requeue(self, exp_id: str) -> ExperimentRecord:
        """Queue an interrupted or failed experiment again; it continues from `resume_point`."""
        record = self.require(exp_id)
        if record.status not in RESUMABLE:
            raise ValueError(
                f"experiment {exp_id} is {record.status}; only {', '.join(RESUMABLE)} ones resume"
            )
        record.status, record.error, record.finished = "queued", None, None
        self._save(record)
        return record

    def read_samples(self, exp_id: str) -> Iterator[dict[str, Any]]:
        """The committed sample lines (never a chunk still being written)."""
        record = self.require(exp_id)
        with open(self.samples_path(exp_id), "rb") as f:
            data = f.read(record.committed_bytes)
        for line in data.splitlines():
            yield json.loads(line)

    @_serialized
    def delete(self, exp_id: str) -> None:
        self._remove(exp_id, ("running",), lambda r: f"experiment {exp_id} is running; cancel it first")
        with self._lock:
            self._specs.pop(exp_id, None)
            self._spec_files.discard(exp_id)

    def _append(self, record: ExperimentRecord, data: bytes, chunk: range) -> None:
        path = self.samples_path(record.id)
        try:
            with open(path, "r+b") as f:
                f.truncate(record.committed_bytes)
                f.seek(record.committed_bytes)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            try:  # best effort: leave only committed chunks behind (the next commit truncates anyway)
                os.truncate(path, record.committed_bytes)
            except OSError:
                pass
            raise ExperimentStoreError(
                f"writing samples {chunk.start}..{chunk.stop - 1} of experiment {record.id} failed: {exc}"
            ) from exc

    def _truncate(self, record: ExperimentRecord) -> None:
        path = self.samples_path(record.id)
        try:
            size = path.stat().st_size
            if size < record.committed_bytes:
                raise ExperimentStoreError(
                    f"{path} holds {size} bytes, fewer than the {record.committed_bytes} committed: "
                    "the file was changed outside the service"
                )
            if size > record.committed_bytes:
                os.truncate(path, record.committed_bytes)
        except OSError as exc:
            raise ExperimentStoreError(f"reading back experiment {record.id} failed: {exc}") from exc

    def _load(self, path: Path) -> ExperimentRecord:
        """A record from its experiment.json, with the spec from spec.json (or, in a record
        written before spec.json existed, from experiment.json itself)."""
        data = json.loads(path.read_text())
        inline = "spec" in data
        if not inline:
            data["spec"] = json.loads((path.parent / "spec.json").read_text())
        record = ExperimentRecord(**data)
        if not inline:
            self._spec_files.add(record.id)
        return record

    def _save(self, record: ExperimentRecord, strict: bool = True) -> None:
        """Write the record, then publish it in memory, so memory never runs ahead of the disk.

        With strict=False a failed write still updates memory (used when recording a failure).
        """
        snapshot = self._copy(record)
        # The spec lives in spec.json; only a record from before spec.json keeps it inline.
        omit = ("spec",) if record.id in self._spec_files else ()
        data = {f.name: getattr(snapshot, f.name) for f in fields(snapshot) if f.name not in omit}
        try:
            write_json_atomic(self.dir(record.id) / self.FILE, data)
        except OSError as exc:
            if strict:
                raise ExperimentStoreError(f"saving experiment {record.id} failed: {exc}") from exc
        self._publish(snapshot)

    def _copy(self, record: ExperimentRecord) -> ExperimentRecord:
        """A deep copy sharing the spec dict: it never changes after `create`, and copying 100k
        prompts for every chunk and every GET was most of a chunk's bookkeeping."""
        return copy.deepcopy(record, {id(record.spec): record.spec})
