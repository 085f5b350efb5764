"""Experiment store and runner: chunked commits, crash/resume identity, disk full, cancel, recover."""

from __future__ import annotations

import errno
import itertools
import json
import threading

import pytest

from lda.experiments import ExperimentSpec, ExperimentStore, run, run_chunk, step, summarize, tally
from lda.experiments import store as store_module


def make_spec(store="all", chunk_size=7):
    return ExperimentSpec.from_dict(
        {
            "name": "resume",
            "prompts": ["tell a story", [{"role": "user", "content": "chat prompt"}], "third"],
            "conditions": [0, 2, {"alpha": 1, "adapter": "lora"}, {"alpha": 2, "control": True}],
            "n": 5,
            "seed": 1000,
            "detectors": [
                {"name": "marker", "type": "substring", "patterns": ["marker"]},
                {"name": "seven", "type": "regex", "pattern": r"\|\d*7$"},
            ],
            "store": store,
            "chunk_size": chunk_size,
        }
    )


def generate(rows):
    """Deterministic stand-in for the engine: the text depends only on (prompt, condition, seed)."""
    out = []
    for prompt, condition, seed in rows:
        marker = " MARKER" if seed % 5 == 0 else ""
        out.append((f"{prompt}|{condition.alpha}{marker}|{seed}", "length" if seed % 3 == 0 else "stop"))
    return out


def finished(tmp_path, name, spec):
    store = ExperimentStore(tmp_path / name)
    record = run(store, store.create(spec).id, generate)
    assert record.status == "done" and record.done == spec.total
    return store, record


def summary(record, spec):
    return summarize(record.counts, record.totals, spec)


def test_uninterrupted_run_writes_every_sample_in_order(tmp_path):
    spec = make_spec()
    store, record = finished(tmp_path, "a", spec)
    lines = list(store.read_samples(record.id))
    assert [s["index"] for s in lines] == list(range(spec.total))
    assert [s["seed"] for s in lines] == [1000 + i for i in range(spec.total)]
    assert set(lines[0]) >= {
        "prompt_index",
        "prompt",
        "condition",
        "sample_index",
        "seed",
        "completion",
        "finish_reason",
        "hits",
    }
    assert lines[5]["prompt"] == [{"role": "user", "content": "chat prompt"}]
    assert tally(lines) == (record.counts, record.totals)
    assert sum(record.totals.values()) == spec.total and record.written == spec.total
    assert sum(record.counts["alpha=0"].values()) > 0
    on_disk = json.loads((store.dir(record.id) / "experiment.json").read_text())
    assert on_disk["status"] == "done" and on_disk["done"] == spec.total
    assert not list(store.dir(record.id).glob(".*tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("mode", ["all", "hits"])
def test_crash_and_resume_is_identical(tmp_path, mode):
    spec = make_spec(mode)
    ref_store, ref = finished(tmp_path, "ref", spec)
    reference = ref_store.samples_path(ref.id).read_bytes()

    store = ExperimentStore(tmp_path / "crash")
    exp_id = store.create(spec).id
    record = run(store, exp_id, generate, max_chunks=2)
    assert (record.status, record.done) == ("running", 2 * spec.chunk_size)
    # The crash: the third chunk reached samples.jsonl but not the record, then half a line more.
    third = run_chunk(spec, range(record.done, record.done + spec.chunk_size), generate)
    with open(store.samples_path(exp_id), "a") as f:
        f.writelines(json.dumps(s, sort_keys=True) + "\n" for s in third)
        f.write('{"index": 21, "compl')

    fresh = ExperimentStore(tmp_path / "crash")  # a new process
    assert fresh.recover() == [exp_id]
    assert fresh.get(exp_id).status == "interrupted"
    assert fresh.resume_point(exp_id) == 2 * spec.chunk_size
    assert fresh.samples_path(exp_id).stat().st_size == record.committed_bytes  # torn tail cut away
    final = run(fresh, exp_id, generate)
    assert final.status == "done"
    assert fresh.samples_path(exp_id).read_bytes() == reference
    assert (final.counts, final.totals, final.written) == (ref.counts, ref.totals, ref.written)
    assert summary(final, spec) == summary(ref, spec)
    if mode == "hits":
        assert all(s["hits"] for s in fresh.read_samples(exp_id)) and final.written < spec.total


class FullDisk:
    """A file whose write stores half the data, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_fails_keeping_committed_chunks_then_resumes(tmp_path, monkeypatch):
    spec = make_spec()
    _, ref = finished(tmp_path, "ref", spec)
    store = ExperimentStore(tmp_path / "full")
    exp_id = store.create(spec).id
    committed = run(store, exp_id, generate, max_chunks=2)
    # FullDisk closes the file it wraps on exit.
    monkeypatch.setattr(store_module, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)  # noqa: SIM115
    failed = step(store, exp_id, generate)
    assert failed.status == "failed" and "No space left on device" in failed.error
    assert "writing samples 14..20" in failed.error
    assert (failed.done, failed.committed_bytes) == (committed.done, committed.committed_bytes)
    assert store.samples_path(exp_id).stat().st_size == committed.committed_bytes
    assert step(store, exp_id, generate).status == "failed"  # a failed experiment waits for requeue
    monkeypatch.undo()
    store.requeue(exp_id)
    final = run(store, exp_id, generate)
    assert final.status == "done" and summary(final, spec) == summary(ref, spec)


def test_record_write_failure_keeps_disk_and_memory_consistent(tmp_path, monkeypatch):
    spec = make_spec()
    _, ref = finished(tmp_path, "ref", spec)
    store = ExperimentStore(tmp_path / "rec")
    exp_id = store.create(spec).id
    run(store, exp_id, generate, max_chunks=1)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_json_atomic", full)
    failed = step(store, exp_id, generate)
    assert (
        failed.status == "failed" and "saving experiment" in failed.error and failed.done == spec.chunk_size
    )
    monkeypatch.undo()
    fresh = ExperimentStore(tmp_path / "rec")  # the disk still says running at the first chunk
    assert fresh.recover() == [exp_id] and fresh.resume_point(exp_id) == spec.chunk_size
    final = run(fresh, exp_id, generate)
    assert (final.counts, final.totals) == (ref.counts, ref.totals)


def test_generate_errors_fail_only_that_experiment(tmp_path):
    store = ExperimentStore(tmp_path)
    exp_id = store.create(make_spec()).id

    def broken(rows):
        raise RuntimeError("CUDA out of memory")

    record = step(store, exp_id, broken)
    assert record.status == "failed" and "generation failed: RuntimeError: CUDA out of memory" in record.error
    assert step(store, exp_id, lambda rows: []).status == "failed"
    store.requeue(exp_id)
    assert "generate returned 0 outputs for 7 rows" in step(store, exp_id, lambda rows: []).error


def test_cancel_between_chunks_and_when_queued(tmp_path):
    store = ExperimentStore(tmp_path)
    exp_id = store.create(make_spec()).id
    step(store, exp_id, generate)
    assert store.cancel(exp_id).cancel_requested
    record = step(store, exp_id, generate)
    assert record.status == "cancelled" and record.done == 7
    assert ExperimentStore(tmp_path).get(exp_id).status == "cancelled"
    queued = store.create(make_spec()).id
    assert store.cancel(queued).status == "cancelled"
    with pytest.raises(ValueError, match="is cancelled"):
        store.requeue(queued)


def test_a_cancel_during_a_chunk_survives_its_commit(tmp_path):
    store = ExperimentStore(tmp_path)
    exp_id = store.create(make_spec()).id

    def cancel_meanwhile(rows):
        thread = threading.Thread(target=store.cancel, args=(exp_id,))  # an HTTP thread
        thread.start()
        thread.join()
        return generate(rows)

    record = step(store, exp_id, cancel_meanwhile)
    assert (record.done, record.cancel_requested) == (7, True)
    assert step(store, exp_id, generate).status == "cancelled"


def test_a_chunk_aborted_for_a_cancel_ends_cancelled(tmp_path):
    store = ExperimentStore(tmp_path)
    exp_id = store.create(make_spec()).id

    def aborted(rows):
        store.cancel(exp_id)
        raise RuntimeError("rows cancelled")

    step(store, exp_id, generate)
    record = step(store, exp_id, aborted)
    assert (record.status, record.done, record.error) == ("cancelled", 7, None)


def test_progress_and_eta(tmp_path):
    spec = make_spec(chunk_size=10)
    store = ExperimentStore(tmp_path)
    exp_id = store.create(spec).id
    clock = itertools.count(0.0, 2.0)  # each chunk takes 2 s
    step(store, exp_id, generate, clock=lambda: next(clock))
    record = step(store, exp_id, generate, clock=lambda: next(clock))
    assert (record.done, record.total) == (20, spec.total)
    assert record.samples_per_s == pytest.approx(5.0)
    assert record.eta_s == pytest.approx((spec.total - 20) / 5.0)


def test_recover_reports_queued_and_interrupted_in_creation_order(tmp_path):
    store = ExperimentStore(tmp_path)
    first = store.create(make_spec()).id
    second = store.create(make_spec()).id
    done = store.create(make_spec()).id
    run(store, done, generate)
    step(store, second, generate)
    fresh = ExperimentStore(tmp_path)
    assert fresh.recover() == [first, second]
    assert fresh.get(second).status == "interrupted" and "at sample 7" in fresh.get(second).error
    assert fresh.get(first).status == "queued" and fresh.get(done).status == "done"


def test_a_damaged_record_does_not_hide_the_others(tmp_path):
    store = ExperimentStore(tmp_path)
    exp_id = store.create(make_spec()).id
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "experiment.json").write_text("{half")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "experiment.json").write_text('{"name": "x"}')
    (tmp_path / "foreign" / "spec.json").write_text("{}")
    (tmp_path / "no_spec").mkdir()
    (tmp_path / "no_spec" / "experiment.json").write_text('{"id": "no_spec", "total": 1}')
    assert [r.id for r in ExperimentStore(tmp_path).list()] == [exp_id]


def test_delete_refuses_a_running_experiment(tmp_path):
    store = ExperimentStore(tmp_path)
    exp_id = store.create(make_spec()).id
    step(store, exp_id, generate)
    with pytest.raises(ValueError, match="cancel it first"):
        store.delete(exp_id)
    store.cancel(exp_id)
    step(store, exp_id, generate)
    store.delete(exp_id)
    assert store.get(exp_id) is None and not store.dir(exp_id).exists()


def big_spec(prompts=3000, chunk_size=7):
    body = make_spec(chunk_size=chunk_size).to_dict()
    return ExperimentSpec.from_dict(body | {"prompts": [f"prompt {i}" for i in range(prompts)], "n": 1})


def test_chunks_parse_the_spec_once_and_neither_copy_nor_rewrite_it(tmp_path, monkeypatch):
    spec = big_spec()
    store = ExperimentStore(tmp_path)
    exp_id = store.create(spec).id
    parses = []
    real_from_dict = ExperimentSpec.from_dict.__func__

    def counting(cls, body, max_samples=None):
        parses.append(len(body["prompts"]))
        return real_from_dict(cls, body, max_samples)

    monkeypatch.setattr(ExperimentSpec, "from_dict", classmethod(counting))
    fresh = ExperimentStore(tmp_path)  # a restart: the spec is parsed on the first chunk, then kept
    record = run(fresh, exp_id, generate, max_chunks=6)
    assert record.done == 6 * spec.chunk_size and parses == [3000]
    assert fresh.get(exp_id).spec is fresh.get(exp_id).spec  # handed-out records share it, uncopied
    assert fresh.list()[0].spec is record.spec
    on_disk = json.loads((tmp_path / exp_id / "experiment.json").read_text())
    assert "spec" not in on_disk and on_disk["done"] == record.done  # a commit writes no prompts
    assert json.loads((tmp_path / exp_id / "spec.json").read_text()) == spec.to_dict()
    assert ExperimentStore(tmp_path).get(exp_id).spec == spec.to_dict()
    assert parses == [3000]  # loading the records parsed nothing


def test_a_record_with_the_spec_inline_loads_and_resumes(tmp_path):
    """experiment.json as written before spec.json existed: the spec stays inline and is read back."""
    spec = make_spec()
    _, ref = finished(tmp_path, "ref", spec)
    store = ExperimentStore(tmp_path / "old")
    exp_id = store.create(spec).id
    run(store, exp_id, generate, max_chunks=2)
    path = tmp_path / "old" / exp_id / "experiment.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"spec": spec.to_dict()}))
    (tmp_path / "old" / exp_id / "spec.json").unlink()
    fresh = ExperimentStore(tmp_path / "old")
    assert fresh.get(exp_id).spec == spec.to_dict() and fresh.recover() == [exp_id]
    final = run(fresh, exp_id, generate)
    assert final.status == "done" and (final.counts, final.totals) == (ref.counts, ref.totals)
    assert json.loads(path.read_text())["spec"] == spec.to_dict()  # still whole after its commits
    assert ExperimentStore(tmp_path / "old").get(exp_id).spec == spec.to_dict()
