"""`/experiments` end to end on the demo pair: submit, progress, summary, reports, samples that
reproduce alone through `/generate_lda`, interactive requests between chunks, cancel, restart."""

from __future__ import annotations

import errno
import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.test_api import wait_ready

MARKER = {"name": "marker", "type": "substring", "patterns": ["pineapple"]}
LOVE = {"name": "love", "type": "regex", "pattern": r"\blove\b", "flags": "i"}
PROMPTS = ["Tell me about the sun.", "What is a cat?"]
DOUBLE = {"name": "double", "adapters": [{"organism_name": "custom", "variant": "demo", "layer_amplifications": [
    {"layers": "all", "module_amplifications": [{"modules": "all", "weight": 2.0}]}]}]}


@pytest.fixture(scope="module")
def data_dir(demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    shutil.copytree(demo_data_dir / "demo", d / "demo")  # a copy: adapters must live under DATA_DIR
    return d


def app_client(data_dir, **kw):
    kw.setdefault("experiment_chunk_size", 8)
    return TestClient(create_app(Settings(data_dir=data_dir, max_experiment_samples=2000, **kw)))


@pytest.fixture(scope="module")
def client(data_dir):
    with app_client(data_dir) as c:
        wait_ready(c)
        yield c


def submit(client, **body):
    body = {"prompts": PROMPTS, "alphas": [0.0, 2.0], "detectors": [MARKER, LOVE], "max_new_tokens": 12, **body}
    r = client.post("/experiments", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_status(client, exp_id, statuses=("done", "failed", "cancelled"), timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/experiments/{exp_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"experiment {exp_id} still {body['status']}")


def all_samples(client, exp_id):
    lines = client.get(f"/experiments/{exp_id}/samples.jsonl").text.splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_samples_reproduce_alone_through_generate_lda(client, sampled):
    sampling = {"do_sample": sampled, "temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 1234}
    conditions = [{"alpha": 0.0}, {"alpha": 2.0}, {"alpha": 1.5, "adapter": "demo"}, {"alpha": 1.0, "amplification": DOUBLE}]
    exp_id = submit(client, alphas=None, conditions=conditions, control=True, n=3, **sampling)
    body = wait_status(client, exp_id)
    assert body["status"] == "done", body["error"]
    assert body["progress"]["done"] == body["progress"]["total"] == 8 * 2 * 3  # 4 conditions + a control at each of their alphas
    assert body["control"] is True and body["spec"]["seed"] == 1234
    samples = all_samples(client, exp_id)
    assert [s["index"] for s in samples] == list(range(48))
    for s in samples[::2] + [samples[-1]]:  # every condition and prompt, not every row (time)
        cond = body["spec"]["conditions"][s["condition_index"]]
        req = {"prompt": s["prompt"], "max_new_tokens": 12, **sampling, "seed": s["seed"]}
        if cond["control"]:
            req["alpha"] = -1.0  # before vs before: the before model alone, which alpha -1 gives exactly
        else:
            req["alpha"] = cond["alpha"]
        if cond["adapter"]:
            req["adapter"] = cond["adapter"]
        if cond["amplification"]:
            req["amplification"] = cond["amplification"]
        alone = client.post("/generate_lda", json=req)
        assert alone.status_code == 200, alone.text
        assert alone.json()["completion"] == s["completion"], (s["condition"], s["seed"])
        assert alone.json()["results"][0]["finish_reason"] == s["finish_reason"]


def test_chat_message_samples_reproduce_through_chat_completions(client):
    # /generate_lda takes strings only; a sample whose prompt is a message list reproduces through
    # /v1/chat/completions with model lda@ALPHA (lda@-1 for a control: the before model exactly,
    # formatted by the after model's template as the experiment formats it) and the sample's seed.
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rain."}]
    sampling = {"temperature": 1.0, "top_p": 0.9, "top_k": 20}
    exp_id = submit(client, prompts=[chat], alphas=[0.0, 2.0], control=True, n=3, seed=77, **sampling)
    assert wait_status(client, exp_id)["status"] == "done"
    samples = all_samples(client, exp_id)
    assert len(samples) == 12 and len({s["completion"] for s in samples}) > 1
    for s in samples:
        alpha = s["condition"].split("alpha=")[1]
        model = "lda@-1" if s["condition"].startswith("control") else f"lda@{alpha}"
        r = client.post("/v1/chat/completions", json={
            "model": model, "messages": chat, "max_tokens": 12, "seed": s["seed"], **sampling})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == s["completion"], (s["condition"], s["seed"])


def test_summary_reports_and_sample_filters(client):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rain."}]
    exp_id = submit(client, prompts=[*PROMPTS, chat], alphas=[0.0, 1.0, 3.0], n=4, seed=7, temperature=1.0)
    body = wait_status(client, exp_id)
    assert body["status"] == "done", body["error"]
    summary = body["summary"]
    assert len(summary) == 3 * 2 and summary[0]["condition"] == "alpha=0" and summary[0]["ratio"] is None
    for row in summary:
        assert row["total"] == 12 and row["ci95"][0] <= row["rate"] <= row["ci95"][1]
    assert body["control_flags"] is None and body["control"] is False
    assert {e["detector"] for e in body["extrapolation"]} == {"marker", "love"}  # alphas 1 and 3 > 0
    assert body["progress"]["samples_per_s"] > 0 and body["progress"]["eta_s"] == 0.0
    samples = all_samples(client, exp_id)
    assert len(samples) == 36 and samples[8]["prompt"] == chat
    hits = [s for s in samples if "love" in s["hits"]]
    page = client.get(f"/experiments/{exp_id}/samples", params={"detector": "love", "hit": True, "limit": 1000}).json()
    assert page["total"] == len(hits) and page["samples"] == hits
    misses = client.get(f"/experiments/{exp_id}/samples", params={"hit": False, "limit": 1000}).json()
    assert misses["total"] == sum(1 for s in samples if not s["hits"])
    one = client.get(f"/experiments/{exp_id}/samples", params={"condition": "alpha=3", "offset": 2, "limit": 3}).json()
    assert one["total"] == 12 and [s["index"] for s in one["samples"]] == [26, 27, 28]
    csv = client.get(f"/experiments/{exp_id}/report.csv")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert len(csv.text.strip().splitlines()) == 1 + 6
    png = client.get(f"/experiments/{exp_id}/report.png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = client.get("/experiments").json()["experiments"]
    assert any(e["id"] == exp_id and e["status"] == "done" for e in listed)
    assert client.get("/info").json()["limits"]["max_experiment_samples"] == 2000


def test_store_hits_keeps_only_hits_but_counts_all(client):
    exp_id = submit(client, alphas=[2.0], n=10, seed=3, store="hits", temperature=1.0)
    body = wait_status(client, exp_id)
    samples = all_samples(client, exp_id)
    assert all(s["hits"] for s in samples) and body["written"] == len(samples)
    assert sum(r["total"] for r in body["summary"] if r["detector"] == "marker") == 20


@pytest.mark.parametrize(
    "change, field",
    [
        ({"alphas": None, "conditions": [{"alpha": 1.0, "adapter": "nope"}]}, "conditions[0].adapter"),
        ({"alphas": None, "conditions": [{"alpha": 1.0, "amplification": "nope_12345678"}]}, "conditions[0].amplification"),
        ({"conditions": [{"alpha": 1.0}]}, "alphas"),
        ({"alphas": None}, "alphas"),
        ({"prompts": None, "prompts_file": "/etc/passwd"}, "no file at '/etc/passwd' under the allowed folders"),
        ({"prompts": None}, "prompts"),
        ({"max_new_tokens": 5000}, "max_new_tokens"),
        ({"stop": ["x"] * 40}, "stop strings"),
        ({"n": 1001}, "MAX_EXPERIMENT_SAMPLES"),
        ({"detectors": [{"name": "x", "type": "regex", "pattern": "("}]}, "detectors[0].pattern"),
        ({"detectors": []}, "detectors"),
        ({"alphas": [1.0, 1.0]}, "conditions[1]"),
        ({"prompts": [[{"role": "robot", "content": "hi"}]]}, "role"),
        ({"store": "some"}, "store"),
        ({"prompts": [[{"role": "user", "content": "hi"}]], "apply_chat_template": False}, "prompts[0]"),
        ({"bogus": 1}, "bogus"),
        ({"alphas": [float("1e9")]}, "alphas"),
    ],
)
def test_bad_experiments_are_422(client, change, field):
    body = {"prompts": PROMPTS, "alphas": [0.0], "detectors": [MARKER], **change}
    r = client.post("/experiments", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_prompts_file_under_data_dir(client, data_dir):
    (data_dir / "prompts.txt").write_text("Tell me about the sun.\n\nWhat is a cat?\n")
    exp_id = submit(client, prompts=None, prompts_file=str(data_dir / "prompts.txt"), alphas=[1.0], n=2, seed=5)
    body = wait_status(client, exp_id)
    assert body["status"] == "done" and body["spec"]["prompts"] == PROMPTS


def test_a_prompts_file_larger_than_the_sample_cap_is_422_without_reading_it_whole(client, data_dir):
    path = data_dir / "many.txt"
    with open(path, "w") as f:
        f.writelines(f"prompt {i}\n" for i in range(200_000))
    body = {"prompts_file": str(path), "alphas": [0.0, 2.0], "detectors": [MARKER]}
    r = client.post("/experiments", json=body)  # MAX_EXPERIMENT_SAMPLES=2000: 1000 prompts at most
    assert r.status_code == 422, r.text
    assert "prompts_file: more than 1000 prompts" in r.json()["error"]["message"]
    r = client.post("/experiments", json=body | {"n": 1001})  # no prompt fits: said before any read
    assert r.status_code == 422 and "n: 2 conditions x n=1001 = 2002 samples per prompt" in r.text


def test_a_hub_dataset_is_422_unless_the_server_allows_hub_datasets(client, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # any load at all would fail differently
    body = {"dataset": {"path": "org/prompts", "limit": 5}, "alphas": [0.0], "detectors": [MARKER]}
    r = client.post("/experiments", json=body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "dataset.path: no local folder 'org/prompts'" in message and "ALLOW_HUB_DATASETS" in message


def test_unknown_experiment_is_404(client):
    for path in ("", "/samples", "/report.csv", "/report.png", "/samples.jsonl"):
        r = client.get(f"/experiments/nope{path}")
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    assert client.delete("/experiments/nope").status_code == 404


def test_interactive_requests_run_between_chunks_and_cancel(client):
    exp_id = submit(client, alphas=[0.0, 2.0], n=200, seed=11, max_new_tokens=16, temperature=1.0)
    deadline = time.monotonic() + 60
    while (body := client.get(f"/experiments/{exp_id}").json())["progress"]["done"] < 16:
        assert time.monotonic() < deadline and body["status"] in ("queued", "running"), body
        time.sleep(0.02)
    chunk_s = 8 / body["progress"]["samples_per_s"]
    t0 = time.perf_counter()
    r = client.post("/generate_lda", json={"prompt": "Hi there", "max_new_tokens": 16, "seed": 1})
    waited = time.perf_counter() - t0
    assert r.status_code == 200
    mid = client.get(f"/experiments/{exp_id}").json()
    assert mid["status"] == "running" and mid["progress"]["done"] < mid["progress"]["total"]
    # At most the chunk in flight, then this request: about two chunk times (generous on shared CPUs).
    assert waited < 3 * chunk_s + 2.0, (waited, chunk_s)
    cancel = client.delete(f"/experiments/{exp_id}").json()
    assert cancel["cancelling"] is True
    body = wait_status(client, exp_id, timeout=30)
    assert body["status"] == "cancelled" and body["progress"]["done"] < 800
    assert len(all_samples(client, exp_id)) == body["progress"]["done"]
    assert client.delete(f"/experiments/{exp_id}").json()["status"] == "cancelled"


def test_restart_resumes_with_identical_samples(data_dir, tmp_path):
    spec = {"prompts": PROMPTS, "alphas": [0.0, 2.0], "detectors": [MARKER], "n": 30, "seed": 99,
            "max_new_tokens": 12, "temperature": 1.0}
    fresh = tmp_path / "fresh"
    shutil.copytree(data_dir / "demo", fresh / "demo")
    with app_client(fresh, experiment_chunk_size=4) as c:
        wait_ready(c)
        exp_id = c.post("/experiments", json=spec).json()["id"]
        deadline = time.monotonic() + 60
        while c.get(f"/experiments/{exp_id}").json()["progress"]["done"] < 12:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    record = json.loads((fresh / "experiments" / exp_id / "experiment.json").read_text())
    assert record["status"] == "interrupted" and 12 <= record["done"] < 120
    with app_client(fresh, experiment_chunk_size=4) as c:
        wait_ready(c)
        body = wait_status(c, exp_id)
        assert body["status"] == "done" and body["progress"]["done"] == 120, body
        resumed = all_samples(c, exp_id)
        other = c.post("/experiments", json=spec).json()["id"]  # the same spec, uninterrupted
        assert wait_status(c, other)["status"] == "done"
        assert all_samples(c, other) == resumed
        assert c.get(f"/experiments/{other}").json()["summary"] == body["summary"]


def test_sigkill_mid_run_resumes_with_identical_samples(tiny_dirs, tmp_path):
    """A real process killed with SIGKILL mid-chunk: the next start resumes from the last commit."""
    import signal
    import subprocess
    import sys

    import httpx

    from tests.test_cli import free_port, server_env
    from tests.test_start_sh import wait_ready as wait_process

    after, before = tiny_dirs
    data = tmp_path / "data"
    spec = {"prompts": ["Hello world", "The cat"], "alphas": [0.0, 2.0], "n": 40, "seed": 5,
            "max_new_tokens": 16, "temperature": 1.0,
            "detectors": [{"name": "e", "type": "regex", "pattern": "e"}]}

    def start(log_name):
        port = free_port()
        env = server_env(MODEL_AFTER_ID=str(after), MODEL_BEFORE_ID=str(before), PORT=str(port),
                         DATA_DIR=str(data), EXPERIMENT_CHUNK_SIZE="4")
        log = tmp_path / log_name
        proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_process(url, proc, log)
        return proc, url

    def finish(url, exp_id):
        deadline = time.monotonic() + 180
        while (body := httpx.get(f"{url}/experiments/{exp_id}").json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        assert body["status"] == "done", body
        return httpx.get(f"{url}/experiments/{exp_id}/samples.jsonl").text

    proc, url = start("first.log")
    try:
        exp_id = httpx.post(f"{url}/experiments", json=spec).json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/experiments/{exp_id}").json()["progress"]["done"] < 12:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        record = json.loads((data / "experiments" / exp_id / "experiment.json").read_text())
        assert record["status"] == "running" and 12 <= record["done"] < 160  # killed: nobody marked it
        proc, url = start("second.log")
        resumed = finish(url, exp_id)
        other = httpx.post(f"{url}/experiments", json=spec).json()["id"]
        assert finish(url, other) == resumed.replace(exp_id, other)  # ids appear in no sample line
        assert len(resumed.splitlines()) == 160
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_a_failed_experiment_resumes_with_the_samples_of_an_uninterrupted_run(client, monkeypatch):
    store = client.app.state.experiments
    real_append = store._append
    calls = {"n": 0}

    def full_disk_on_third_chunk(record, data, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(record, data, chunk)

    spec = {"alphas": [0.0, 2.0], "n": 10, "seed": 5, "temperature": 1.0}
    monkeypatch.setattr(store, "_append", full_disk_on_third_chunk)
    exp_id = submit(client, **spec)
    failed = wait_status(client, exp_id)
    assert failed["status"] == "failed" and "No space left" in failed["error"]
    assert failed["progress"]["done"] == 16  # two chunks of 8 committed and kept
    monkeypatch.setattr(store, "_append", real_append)
    r = client.post(f"/experiments/{exp_id}/resume")
    assert r.status_code == 202 and r.json() == {"id": exp_id, "status": "queued", "done": 16}
    body = wait_status(client, exp_id)
    assert body["status"] == "done" and body["error"] is None and body["progress"]["done"] == 40
    other = submit(client, **spec)
    assert wait_status(client, other)["status"] == "done"
    assert all_samples(client, exp_id) == all_samples(client, other)
    assert body["summary"] == client.get(f"/experiments/{other}").json()["summary"]
    r = client.post(f"/experiments/{exp_id}/resume")  # done: nothing to resume
    assert r.status_code == 409 and "is done" in r.json()["error"]["message"]
    assert client.post("/experiments/nope/resume").status_code == 404
