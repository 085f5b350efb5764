"""`python -m app.batch` on a local Ray with 2 CPU workers and the demo pair: each kind writes what
one server writes for the same body (experiment samples byte for byte, the same summary; the same
adapters; the same scan files), a killed actor changes nothing, an interrupted run resumes, and a
bad job file is refused before Ray starts, with the route's 422 message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from lda.experiments import ExperimentStore
from lda.jobs import JobStore
from tests import batch_kill
from tests.test_api import wait_ready

from app.batch import cli
from app.batch import run as run_module
from app.batch.experiment import ExperimentOutput
from app.batch.pipeline import Options, connect
from app.batch.scan import ScanOutput
from app.demo.build import demo_texts
from app.main import create_app
from app.settings import Settings

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

MARKER = {"name": "marker", "type": "substring", "patterns": ["pineapple"]}
LOVE = {"name": "love", "type": "regex", "pattern": r"\bthe\b", "flags": "i"}
EXPERIMENT = {
    "name": "batch-vs-server",
    "prompts": ["Tell me about the sun.", "What is a cat?"],
    "alphas": [0.0, 2.0],
    "detectors": [MARKER, LOVE],
    "n": 3,
    "seed": 11,
    "do_sample": True,
    "temperature": 1.0,
    "max_new_tokens": 10,
    "store": "all",
}
TEXTS = ["The sun is a star. It is very hot and bright.", "A cat is a small animal. It is soft and quiet."]
WEIGHTDIFF = {
    "tasks": [{"name": f"t{i}", "samples": TEXTS[i % 2 :] + TEXTS[: i % 2]} for i in range(4)],
    "r": 2,
    "lr": 1e-2,
    "steps": 3,
    "seed": 5,
}


@pytest.fixture(scope="module")
def data_dir(demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    shutil.copytree(demo_data_dir / "demo", d / "demo")
    return d


@pytest.fixture(scope="module")
def server(data_dir):
    """One server on the same DATA_DIR: the results the pipeline must reproduce."""
    settings = Settings(data_dir=data_dir, experiment_chunk_size=8, max_weightdiff_tasks=8, max_weightdiff_steps=100)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def local_ray(data_dir):
    """One local Ray for the module, sized for 2 workers of one CPU (as `--workers 2` starts it)."""
    connect(Options(workers=2), Settings(data_dir=data_dir))
    yield
    ray.shutdown()


RUNS: dict[str, Path] = {}  # kind -> an --out holding a finished run of it (for the last test)


@pytest.fixture
def batch(data_dir, local_ray, monkeypatch, tmp_path):
    """`python -m app.batch KIND JOB --workers 2 --out OUT ...` in this process (its Ray is the
    module's); returns (exit code, OUT)."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    out = tmp_path / "out"

    def call(kind: str, body: dict | None, *args: str) -> tuple[int, Path]:
        argv = [kind]
        if body is not None:
            job = tmp_path / f"{kind}.yaml"
            job.write_text(yaml.safe_dump(body))
            argv.append(str(job))
        code = cli.main([*argv, "--workers", "2", "--out", str(out), "--no-progress", *args])
        if code == 0:
            RUNS[kind] = out
        return code, out

    return call


def wait(client, route, job_id, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"{route}/{job_id}").json()
        if body["status"] in ("done", "failed", "cancelled"):
            assert body["status"] == "done", body.get("error")
            return body
        time.sleep(0.05)
    raise AssertionError(f"{route}/{job_id} still running")


@pytest.fixture(scope="module")
def server_experiment(server, data_dir):
    r = server.post("/experiments", json=EXPERIMENT)
    assert r.status_code == 202, r.text
    body = wait(server, "/experiments", r.json()["id"])
    return body, sorted_lines(data_dir / "experiments" / body["id"] / "samples.jsonl")


def sorted_lines(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return sorted(lines, key=lambda line: json.loads(line)["index"])


def only_run(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def assert_same_experiment(out: Path, server_experiment) -> str:
    body, lines = server_experiment
    store = ExperimentStore(out / "experiments")  # what GET /experiments lists with DATA_DIR=out
    (record,) = store.list()
    assert record.status == "done" and record.done == record.total == len(lines) == 12
    assert sorted_lines(store.dir(record.id) / "samples.jsonl") == lines  # byte for byte, by index
    summary = json.loads((store.dir(record.id) / "summary.json").read_text())
    assert summary["summary"] == body["summary"]
    assert summary["extrapolation"] == body["extrapolation"]
    assert (store.dir(record.id) / "report.csv").read_text().count("\n") == 1 + len(body["summary"])
    assert (store.dir(record.id) / "report.png").read_bytes()[:4] == b"\x89PNG"
    return record.id


def test_a_bad_job_is_refused_before_ray_with_the_routes_message(server, batch, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a bad job")

    monkeypatch.setattr(run_module, "connect", no_ray)
    bad = {**EXPERIMENT, "alphas": [1.0, 1.0]}
    expected = server.post("/experiments", json=bad).json()["error"]["message"]
    code, out = batch("experiment", bad)
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR and expected in err, err
    assert "conditions[1]" in err
    bad = {**EXPERIMENT, "detectors": [{"name": "x", "type": "regex", "pattern": "("}], "n": 0}
    expected = server.post("/experiments", json=bad).json()["error"]["message"]
    assert batch("experiment", bad)[0] == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert expected in err and "n: " in err, err
    assert not out.exists()  # nothing written


def test_a_job_the_models_refuse_exits_2_with_the_routes_message(server, batch, capsys):
    """The checks that need the pair run as one task on a worker, before any record is made."""
    body = {"method": "adl", "texts": ["The sun is a star."] * 4, "layers": [99], "max_tokens_per_sample": 4}
    r = server.post("/diffing/jobs", json=body)
    assert r.status_code == 422, r.text
    code, out = batch("scan", body)
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR and f"error: {r.json()['error']['message']}" in err, err
    assert not (out / "diffing_jobs").exists() or not JobStore(out / "diffing_jobs").list()


def test_cli_usage_errors(batch, tmp_path, capsys):
    assert batch("experiment", None)[0] == cli.USAGE_ERROR
    assert "--resume" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert cli.main(["scan", str(tmp_path / "list.yaml")]) == cli.USAGE_ERROR
    assert "one mapping" in capsys.readouterr().err
    assert batch("weightdiff", {**WEIGHTDIFF, "register": True})[0] == cli.USAGE_ERROR
    assert "register" in capsys.readouterr().err
    assert batch("experiment", EXPERIMENT, "--workers", "0")[0] == cli.USAGE_ERROR


def test_experiment_on_two_workers_equals_the_server(batch, server_experiment):
    code, out = batch("experiment", EXPERIMENT, "--block-size", "4")  # 3 blocks over 2 actors
    assert code == 0
    assert_same_experiment(out, server_experiment)


def test_a_killed_actor_loses_nothing(batch, server_experiment, monkeypatch, tmp_path):
    """The actor running block 2 (samples 4-7) is SIGKILLed mid-block: Ray restarts it, the block
    runs again, every sample is committed once and equals the server's."""
    pid_file = tmp_path / "victim.pid"
    monkeypatch.setitem(run_module.KINDS, "experiment", (batch_kill.victim_kind(pid_file, 4), ExperimentOutput))
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(code=batch("experiment", EXPERIMENT, "--block-size", "4")))
    thread.start()
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and thread.is_alive(), "the victim block never started"
        time.sleep(0.1)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    thread.join(timeout=300)
    code, out = result["code"]
    assert code == 0
    assert_same_experiment(out, server_experiment)


def test_an_interrupted_run_resumes_after_its_last_block(batch, server_experiment, monkeypatch, capsys):
    commit = ExperimentOutput.commit
    calls = []

    def interrupted(self, kind, block, records, seconds):
        calls.append(block["start"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second block is handed over
        return commit(self, kind, block, records, seconds)

    monkeypatch.setattr(ExperimentOutput, "commit", interrupted)
    code, out = batch("experiment", EXPERIMENT, "--block-size", "4")
    assert code == cli.INTERRUPTED
    (record,) = ExperimentStore(out / "experiments").list()
    assert record.done == 4 and record.status == "failed" and f"--resume {record.id}" in record.error
    assert f"--resume {record.id}" in capsys.readouterr().err
    monkeypatch.setattr(ExperimentOutput, "commit", commit)
    code, _ = batch("experiment", None, "--resume", record.id)
    assert code == 0
    assert assert_same_experiment(out, server_experiment) == record.id


def test_weightdiff_on_two_workers_equals_the_server(server, data_dir, batch):
    """Blocks of 2 tasks: each task keeps its job-wide seed (`seed + index`). The adapters are the
    server's bit for bit where the server trained the same tasks together: the whole job's first
    two, and the last two as a job of their own with those seeds. (That a task's factors do not
    depend on its companions is the trainer's claim, proven in float64 by test_weightdiff; in fp32
    another batch shape rounds differently, so bits are compared only for the same grouping.)"""
    jobs = [WEIGHTDIFF, {**WEIGHTDIFF, "tasks": [{**t, "seed": 5 + i} for i, t in enumerate(WEIGHTDIFF["tasks"])][2:]}]
    folders = []
    for spec in jobs:
        r = server.post("/weightdiff/jobs", json=spec)
        assert r.status_code == 202, r.text
        folders.append(data_dir / "jobs" / wait(server, "/weightdiff/jobs", r.json()["id"])["id"])
    reference = {"t0": folders[0], "t1": folders[0], "t2": folders[1], "t3": folders[1]}
    code, out = batch("weightdiff", WEIGHTDIFF, "--block-size", "2")  # tasks 0-1 and 2-3 apart
    assert code == 0
    (record,) = JobStore(out / "jobs").list()  # what GET /weightdiff/jobs lists with DATA_DIR=out
    assert record.status == "done" and list(record.outputs) == [t["name"] for t in WEIGHTDIFF["tasks"]]
    assert all(len(curve) == WEIGHTDIFF["steps"] for curve in record.losses)
    for name, path in record.outputs.items():
        want_dir = reference[name] / name
        got, want = load_file(Path(path) / "adapter_model.safetensors"), load_file(want_dir / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].equal(want[key]), (name, key)
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        assert config == json.loads((want_dir / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", ["logit_diff", "adl"])
def test_scan_on_two_workers_equals_the_server(server, data_dir, batch, method, monkeypatch):
    texts = demo_texts(server.app.state.pair.after.tokenizer, 24, seed=0)
    body = {"method": method, "texts": texts, "batch_size": 4, "dataset_name": "demo"}
    body |= {"top_k": 5, "examples": 10} if method == "logit_diff" else {"layers": [0.5], "max_tokens_per_sample": 8}
    r = server.post("/diffing/jobs", json=body)
    assert r.status_code == 202, r.text
    reference = wait(server, "/diffing/jobs", r.json()["id"])
    if method == "logit_diff":  # stopped after 2 of 6 blocks, then resumed: the same files
        commit, calls = ScanOutput.commit, []

        def interrupted(self, kind, block, partial, seconds):
            calls.append(block["start"])
            if len(calls) == 3:
                raise KeyboardInterrupt
            return commit(self, kind, block, partial, seconds)

        monkeypatch.setattr(ScanOutput, "commit", interrupted)
        code, out = batch("scan", body, "--block-size", "1")
        assert code == cli.INTERRUPTED
        (record,) = JobStore(out / "diffing_jobs").list()
        assert record.step == 2 and record.status == "failed"
        monkeypatch.setattr(ScanOutput, "commit", commit)
        code, _ = batch("scan", None, "--resume", record.id)
    else:
        code, out = batch("scan", body, "--block-size", "1")  # one batch per block: the server's sums, in order
    assert code == 0
    (record,) = JobStore(out / "diffing_jobs").list()
    assert record.status == "done" and record.step == record.total_steps == 6
    ref_folder, folder = data_dir / "diffing_jobs" / reference["id"], JobStore(out / "diffing_jobs").dir(record.id)
    ref_files = {p.relative_to(ref_folder): p for p in ref_folder.rglob("*") if p.is_file() and "work" not in p.parts}
    got_files = {p.relative_to(folder): p for p in folder.rglob("*") if p.is_file() and "work" not in p.parts}
    assert ref_files.keys() == got_files.keys()
    for name, path in ref_files.items():
        if name.name in ("job.json", "run_metadata.json", "result.json", "results.zip") or name.suffix == ".png":
            continue  # the record, the files naming the job id; the plots are drawn from the JSON compared
        assert got_files[name].read_bytes() == path.read_bytes(), name
    want = json.loads((ref_folder / "result.json").read_text())
    assert json.loads((folder / "result.json").read_text()) == want


def test_a_uri_destination_is_staged_uploaded_and_downloaded_to_resume():
    import fsspec

    from app.batch.destination import Destination

    first = Destination("memory://batch-runs/one")
    run = first.local / "experiments" / "abc"
    run.mkdir(parents=True)
    (run / "record.json").write_text("{}")
    first.sync()  # within SYNC_SECONDS of the start: nothing uploaded yet
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/batch-runs/one/experiments/abc/record.json")
    first.sync(force=True)
    (run / "samples.jsonl").write_text('{"index": 0}\n')
    first.sync(force=True)  # a second upload lands in the same place, not nested
    assert sorted(fs.find("/batch-runs/one")) == [
        "/batch-runs/one/experiments/abc/record.json", "/batch-runs/one/experiments/abc/samples.jsonl"
    ]
    resumed = Destination("memory://batch-runs/one")  # --resume starts from the uploaded store
    assert (resumed.local / "experiments" / "abc" / "samples.jsonl").read_text() == '{"index": 0}\n'
    assert resumed.local != first.local


def test_a_server_on_the_output_lists_and_serves_the_runs(data_dir, tmp_path):
    """DATA_DIR = the runs' --out: the routes list each run, show it done and serve its files."""
    if set(RUNS) != {"experiment", "weightdiff", "scan"}:
        pytest.skip("needs the runs of the tests above")
    shutil.copytree(data_dir / "demo", tmp_path / "demo")
    for out in RUNS.values():
        shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    with TestClient(create_app(Settings(data_dir=tmp_path))) as client:
        (exp,) = client.get("/experiments").json()["experiments"]
        body = client.get(f"/experiments/{exp['id']}").json()
        assert body["status"] == "done" and body["progress"]["done"] == 12 and body["summary"]
        assert client.get(f"/experiments/{exp['id']}/samples.jsonl").text.count("\n") == 12
        (job,) = client.get("/weightdiff/jobs").json()["jobs"]
        assert client.get(f"/weightdiff/jobs/{job['id']}").json()["status"] == "done"
        r = client.get(f"/weightdiff/jobs/{job['id']}/tasks/t3/adapter")
        assert r.status_code == 200 and len(r.content) > 100
        scans = client.get("/diffing/jobs").json()["jobs"]
        assert scans and all(s["status"] == "done" for s in scans)
        for scan in scans:
            assert client.get(f"/diffing/jobs/{scan['id']}/result").status_code == 200
            assert client.get(f"/diffing/jobs/{scan['id']}/results.zip").content[:2] == b"PK"
