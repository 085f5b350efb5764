"""The one job lifecycle: `drive_steps` on the real engine with fake callbacks, and the stores'
shared parts (`lda.jobs`)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from lda.experiments import ExperimentStore
from lda.jobs import JobStore

from app.api import background
from app.api.background import drive_steps, interrupt_active, on_engine
from app.engine import Engine, QueueFullError


class CountingEngine(Engine):
    """The real engine, counting the jobs it refused because its queue was full."""

    def __init__(self, queue_size: int = 8) -> None:
        super().__init__(queue_size)
        self.refused = 0

    def submit(self, fn: Any, stream: bool = False, background: bool = False) -> Any:
        try:
            return super().submit(fn, stream, background)
        except QueueFullError:
            self.refused += 1
            raise


@pytest.fixture
def engine():
    engine = CountingEngine()
    engine.start()
    yield engine
    engine.stop()


class Fake:
    """A job of `total` steps whose callbacks log what ran, on which thread."""

    def __init__(self, store: JobStore, total: int = 3) -> None:
        self.record = store.create({"kind": "fake"}, [])
        self.cancel = threading.Event()
        self.total = total
        self.calls: list[str] = []
        self.threads: set[str] = set()

    def _ran(self, name: str) -> None:
        self.calls.append(name)
        self.threads.add(threading.current_thread().name)

    def start(self, job: Any) -> int:
        self._ran("start")
        return self.total

    def step(self, job: Any) -> None:
        self._ran("step")
        self.record.step += 1

    def done(self) -> bool:
        return self.record.step >= self.total

    def finish(self, job: Any) -> None:
        self._ran("finish")
        self.record.outputs["out"] = "x"

    def end(self, job: Any) -> None:
        self._ran("end")

    def callbacks(self, **replace: Any) -> dict[str, Any]:
        names = ("start", "step", "done", "finish", "end")
        return {name: getattr(self, name) for name in names} | replace


def drive(engine: Engine, store: JobStore, fake: Fake, **replace: Any) -> None:
    asyncio.run(drive_steps(engine, store, fake.record, fake.cancel, **fake.callbacks(**replace), kind="fake"))


def on_disk(store: JobStore, job_id: str) -> dict[str, Any]:
    return json.loads((store.dir(job_id) / "job.json").read_text())


def test_start_steps_finish_end_on_the_engine_and_every_state_saved(engine, tmp_path):
    store = JobStore(tmp_path)
    fake = Fake(store)
    drive(engine, store, fake)
    assert fake.calls == ["start", "step", "step", "step", "finish", "end"]
    assert fake.threads == {"engine"}
    saved = on_disk(store, fake.record.id)
    assert saved["status"] == "done" and saved["step"] == 3 and saved["total_steps"] == 3
    assert saved["outputs"] == {"out": "x"} and saved["started"] <= saved["finished"]
    assert JobStore(tmp_path).get(fake.record.id).status == "done"


def test_an_async_finish_runs_on_the_loop_and_the_job_is_done_after_it(engine, tmp_path):
    store = JobStore(tmp_path)
    fake = Fake(store, total=1)
    seen: list[str] = []

    async def finish() -> None:  # several engine jobs, as DIT's export and held-out evaluation
        seen.append(await on_engine(engine, lambda job: store.get(fake.record.id).status))
        seen.append(await on_engine(engine, lambda job: threading.current_thread().name))

    drive(engine, store, fake, finish=finish, end=None)
    assert seen == ["running", "engine"]
    assert on_disk(store, fake.record.id)["status"] == "done"
    assert fake.calls == ["start", "step"]


def test_a_cancel_between_steps_stops_before_the_next_step(engine, tmp_path):
    store = JobStore(tmp_path)
    fake = Fake(store, total=5)

    def step(job: Any) -> None:
        Fake.step(fake, job)
        if fake.record.step == 2:
            fake.cancel.set()  # as DELETE does, from another thread, while a step runs

    drive(engine, store, fake, step=step)
    assert fake.calls == ["start", "step", "step", "end"]
    saved = on_disk(store, fake.record.id)
    assert saved["status"] == "cancelled" and saved["step"] == 2 and saved["finished"] is not None


def test_an_error_in_a_step_fails_the_job_with_its_message_and_end_still_runs(engine, tmp_path):
    store = JobStore(tmp_path)
    fake = Fake(store)

    def step(job: Any) -> None:
        Fake.step(fake, job)
        if fake.record.step == 2:
            raise RuntimeError("CUDA out of memory")

    drive(engine, store, fake, step=step)
    assert fake.calls == ["start", "step", "step", "end"]
    saved = on_disk(store, fake.record.id)
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: CUDA out of memory"


def test_an_error_at_start_or_finish_fails_the_job(engine, tmp_path):
    store = JobStore(tmp_path)
    for where in ("start", "finish"):
        fake = Fake(store, total=1)

        def broken(job: Any, where: str = where) -> None:
            raise ValueError(f"bad {where}")

        drive(engine, store, fake, **{where: broken})
        saved = on_disk(store, fake.record.id)
        assert saved["status"] == "failed" and saved["error"] == f"ValueError: bad {where}"
        assert fake.calls[-1] == "end"


def test_a_shutdown_propagates_and_leaves_the_record_for_the_lifespan(engine, tmp_path):
    store = JobStore(tmp_path)
    fake = Fake(store)
    inside, release = threading.Event(), threading.Event()

    def step(job: Any) -> None:
        inside.set()
        release.wait(10)
        Fake.step(fake, job)

    async def main() -> None:
        task = asyncio.create_task(
            drive_steps(engine, store, fake.record, fake.cancel, **fake.callbacks(step=step))
        )
        await asyncio.to_thread(inside.wait, 10)
        task.cancel()  # the lifespan cancels the job tasks while a step runs on the engine
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert fake.calls == ["start", "step", "end"]  # the step in flight ends; no further step, no finish
    saved = on_disk(store, fake.record.id)
    assert saved["status"] == "running" and saved["error"] is None  # not failed, not cancelled
    assert interrupt_active(store) == [fake.record.id]
    saved = on_disk(store, fake.record.id)
    assert saved["status"] == "interrupted" and saved["error"] == "the server shut down at step 1"


def test_a_full_engine_queue_is_waited_out(tmp_path, monkeypatch):
    monkeypatch.setattr(background, "RETRY_FULL_S", 0.01)
    engine = CountingEngine(queue_size=1)
    engine.start()
    store = JobStore(tmp_path)
    fake = Fake(store, total=2)
    busy, release = threading.Event(), threading.Event()

    def hold(job: Any) -> None:
        busy.set()
        release.wait(10)

    async def main() -> None:
        held = engine.submit(hold)  # runs, holding the engine thread
        await asyncio.to_thread(busy.wait, 10)
        queued = engine.submit(lambda job: None)  # waits: the queue (size 1) is full
        task = asyncio.create_task(drive_steps(engine, store, fake.record, fake.cancel, **fake.callbacks()))
        while engine.refused < 3:  # the job's start is refused and offered again
            await asyncio.sleep(0.01)
        assert fake.calls == [] and store.get(fake.record.id).status == "queued"
        release.set()
        await asyncio.gather(held.future, queued.future, task)

    try:
        asyncio.run(main())
    finally:
        release.set()
        engine.stop()
    assert on_disk(store, fake.record.id)["status"] == "done"
    assert fake.calls == ["start", "step", "step", "finish", "end"]


def test_an_interactive_job_is_refused_at_once_when_the_queue_is_full(tmp_path):
    engine = CountingEngine(queue_size=0)
    engine.start()
    try:
        with pytest.raises(QueueFullError):
            asyncio.run(on_engine(engine, lambda job: None, background=False))
    finally:
        engine.stop()
    assert engine.refused == 1


def test_recover_marks_what_a_dead_process_left_active(tmp_path):
    store = JobStore(tmp_path)
    queued = store.create({}, [])
    running = store.create({}, [])
    running.status, running.step = "running", 4
    store.save(running)
    done = store.create({}, [])
    done.status = "done"
    store.save(done)
    fresh = JobStore(tmp_path)
    assert sorted(fresh.recover()) == sorted([queued.id, running.id])
    assert fresh.get(running.id).error == "the server stopped while the job was running (at step 4)"
    assert fresh.get(queued.id).error == "the server stopped while the job was queued (at step 0)"
    assert fresh.get(done.id).status == "done"
    assert {r.status for r in JobStore(tmp_path).list()} == {"interrupted", "done"}


def test_a_record_whose_id_names_another_folder_is_not_loaded(tmp_path):
    """A record file copied in by hand may name any id: it is skipped, so nothing is ever saved,
    marked interrupted or deleted outside its own folder (or the root) through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    jobs = tmp_path / "jobs"
    for folder, status in (("a", "done"), ("b", "running")):
        (jobs / folder).mkdir(parents=True)
        record = {"id": "../outside", "spec": {}, "task_names": [], "status": status}
        (jobs / folder / "job.json").write_text(json.dumps(record))
    good = JobStore(jobs).create({}, [])
    store = JobStore(jobs)
    assert [r.id for r in store.list()] == [good.id]
    assert store.recover() == [good.id] and store.get("../outside") is None  # only its own queued one
    with pytest.raises(KeyError):
        store.remove("../outside")
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]

    experiments = tmp_path / "experiments"
    (experiments / "a").mkdir(parents=True)
    record = {"id": "../outside", "spec": {}, "total": 1, "status": "running"}
    (experiments / "a" / "experiment.json").write_text(json.dumps(record))
    store = ExperimentStore(experiments)
    assert store.list() == [] and store.recover() == []
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_a_job_still_active_is_not_removed(tmp_path):
    store = JobStore(tmp_path)
    record = store.create({}, [])
    with pytest.raises(ValueError, match="is queued: cancel it"):
        store.remove(record.id)
    assert store.dir(record.id).exists() and len(store) == 1
