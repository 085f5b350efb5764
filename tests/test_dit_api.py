"""`/dit/jobs`, `/dit/describe`, `/dit/evaluate` end to end on the demo base with registered diffs."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import tarfile
import time
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient

from app.amplification_lens.jobs import text_side
from app.main import create_app
from app.settings import Settings
from lda.experiments.stats import wilson
from tests.test_amplification_merge import digests
from tests.test_api import wait_ready
from weightdiff import DEFAULT_QUESTION, LoRAFactors, decoder_linears, export_peft
from weightdiff.interpreter import wrappers

TOPICS = ["cats", "dogs", "the sun"]
DIFFS = [f"d{i}" for i in range(6)]  # d{i} encodes TOPICS[i % 3]


@pytest.fixture(scope="module")
def data_dir(demo_data_dir, tmp_path_factory):
    """A fresh DATA_DIR that shares the session's demo build (adapters must live under it)."""
    d = tmp_path_factory.mktemp("dit")
    shutil.copytree(demo_data_dir / "demo", d / "demo")
    return d


def app_client(data_dir, **kw):
    limits = {"max_dit_pairs": 12, "max_describe_diffs": 8, "max_weightdiff_steps": 1000} | kw
    return TestClient(create_app(Settings(data_dir=data_dir, **limits)))


def write_diffs(client, data_dir) -> None:
    """Rank-1/2 PEFT diffs on the base, each topic's sharing a direction, registered as d0..d5."""
    model = client.app.state.amplifier.model
    linears = decoder_linears(model)
    for i, name in enumerate(DIFFS):
        topic, own = torch.Generator().manual_seed(100 + i % 3), torch.Generator().manual_seed(200 + i)
        factors = {
            n: LoRAFactors(
                torch.cat([torch.randn(lin.in_features, 1, generator=topic) * 0.3,
                           torch.randn(lin.in_features, i % 2, generator=own) * 0.03], 1),
                torch.cat([torch.randn(1, lin.out_features, generator=topic) * 0.3,
                           torch.randn(i % 2, lin.out_features, generator=own) * 0.03], 0),
            )
            for n, lin in linears.items()
        }
        path = export_peft(factors, model, data_dir / "diffs" / name, lora_alpha=1 + i % 2)
        r = client.post("/adapters", json={"name": name, "source": str(path)})
        assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def client(data_dir):
    with app_client(data_dir) as c:
        wait_ready(c)
        write_diffs(c, data_dir)
        yield c


def wait_status(client, job_id, statuses=("done", "failed", "cancelled"), timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/dit/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['status']}")


def base_model(client):
    return client.app.state.amplifier.model


@pytest.fixture(scope="module")
def trained(client):
    """One finished job on d0..d3 with d4, d5 held out, L registered as dit-<job>."""
    base = digests(base_model(client))
    spec = {
        "pairs": [{"diff": d, "description": TOPICS[i % 3]} for i, d in enumerate(DIFFS[:4])],
        "test_pairs": [{"diff": d, "description": TOPICS[(i + 4) % 3]} for i, d in enumerate(DIFFS[4:])],
        "r": 4, "lr": 2e-2, "steps": 12, "batch_size": 4, "register": True, "export_dit": True,
        "max_new_tokens": 6,
    }
    r = client.post("/dit/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_status(client, r.json()["id"])
    assert job["status"] == "done", job["error"]
    assert digests(base_model(client)) == base and not wrappers(base_model(client))
    return job


def test_job_lifecycle_download_and_register(client, trained):
    job = trained
    assert job["step"] == job["total_steps"] == 12 and len(job["losses"]) == 12
    assert job["losses"][-1] < job["losses"][0]
    assert job["spec"]["num_pairs"] == 4 and job["spec"]["num_test_pairs"] == 2 and "pairs" not in job["spec"]
    test = job["result"]["test"]
    assert test["n"] == 2 and test["candidates"] == ["dogs", "the sun"] and test["chance"] == 0.5
    assert {"exact", "exact_ci", "candidate_accuracy", "no_dit", "no_diff", "items", "loss"} <= set(test)
    assert [i["diff"] for i in test["items"]] == ["d4", "d5"] and "text" in test["items"][0]["no_dit"]
    name = job["registered"]
    assert name == f"dit-{job['id']}" and name in [a["name"] for a in client.get("/adapters").json()["adapters"]]
    z = zipfile.ZipFile(io.BytesIO(client.get(job["adapter"]).content))
    top = f"dit-{job['id']}"
    assert {f"{top}/{f}" for f in ("adapter_config.json", "adapter_model.safetensors", "dit.json", "dit-adapter.pt")} <= set(z.namelist())
    info = json.loads(z.read(f"{top}/dit.json"))
    assert info["question"] == DEFAULT_QUESTION and info["r"] == 4 and len(info["target_modules"]) == len(decoder_linears(base_model(client)))
    assert info["base_model"]["linears_sha256"]
    t = client.get(job["adapter"], params={"format": "tar"})
    assert f"{top}/adapter_model.safetensors" in tarfile.open(fileobj=io.BytesIO(t.content)).getnames()
    assert any(j["id"] == job["id"] for j in client.get("/dit/jobs").json()["jobs"])


def test_describe_matches_a_client_recomputation(client, trained):
    """Logprobs equal a plain HF forward on merged weights (W + L); dit null and diffs null work."""
    base = digests(base_model(client))
    dit = trained["registered"]
    body = {"dit": dit, "diffs": ["d4", None, "d0"], "candidates": TOPICS, "max_new_tokens": 5}
    r = client.post("/dit/describe", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["diff"] for x in results] == ["d4", None, "d0"] and [c["text"] for c in results[0]["candidates"]] == TOPICS
    amp = client.app.state.amplifier
    tokenizer = text_side(amp.pair).tokenizer
    merged = copy.deepcopy(amp.model)
    with torch.no_grad():
        for adapter in (amp.registry.get("d4"), amp.registry.get(dit)):
            for module, (a, b) in adapter.factors.items():
                merged.get_submodule(module).weight += adapter.scaling * (b @ a).to(merged.dtype)
    prefix = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_QUESTION}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    for c in results[0]["candidates"]:
        ids = tokenizer(c["text"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = merged(input_ids=torch.tensor([prefix + ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(prefix) - 1 : -1], -1)[torch.arange(len(ids)), torch.tensor(ids)].sum()
        # fp32 on both sides; the merge rounds each weight once (2**-24 relative), which moves a
        # logit by ~width * 2**-24 of its magnitude per layer: 1e-3 nats is ~100x that here.
        assert math.isclose(c["logprob"], float(logp), abs_tol=1e-3), (c, float(logp))
    alone = client.post("/dit/describe", json=body | {"diffs": ["d0"]}).json()["results"][0]
    assert alone["text"] == results[2]["text"]
    no_dit = client.post("/dit/describe", json=body | {"dit": None}).json()["results"]
    assert len(no_dit) == 3 and no_dit[0]["candidates"][0]["logprob"] != results[0]["candidates"][0]["logprob"]
    assert digests(base_model(client)) == base and not wrappers(base_model(client))


def test_describe_sampling_is_seeded(client, trained):
    body = {"dit": trained["registered"], "diffs": ["d1", "d2"], "temperature": 1.0, "seed": 7, "max_new_tokens": 8}
    first = client.post("/dit/describe", json=body).json()
    assert first == client.post("/dit/describe", json=body).json()
    second_alone = client.post("/dit/describe", json=body | {"diffs": ["d2"], "seed": 8}).json()
    assert second_alone["results"][0]["text"] == first["results"][1]["text"]


def test_evaluate_numbers_on_a_hand_made_case(client, trained):
    """Descriptions picked from describe's own answers, so every number is known in advance."""
    dit = trained["registered"]
    ask = {"dit": dit, "diffs": ["d0", "d1", "d2"], "candidates": TOPICS, "max_new_tokens": 6}
    answers = client.post("/dit/describe", json=ask).json()["results"]
    best = [max(a["candidates"], key=lambda c: c["logprob"])["text"] for a in answers]
    wrong = next(t for t in TOPICS if t != best[1])
    pairs = [{"diff": "d0", "description": best[0]}, {"diff": "d1", "description": wrong}, {"diff": "d2", "description": best[2]}]
    r = client.post("/dit/evaluate", json={"dit": dit, "pairs": pairs, "candidates": TOPICS, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 3 and body["chance"] == pytest.approx(1 / 3)
    assert body["candidate_hits"] == 2 and body["candidate_accuracy"] == pytest.approx(2 / 3)
    assert body["candidate_accuracy_ci"] == list(wilson(2, 3))
    assert [i["candidate"] for i in body["items"]] == best and [i["text"] for i in body["items"]] == [a["text"] for a in answers]
    assert body["exact_hits"] == sum(i["exact"] for i in body["items"]) and body["exact_ci"] == list(wilson(body["exact_hits"], 3))
    assert {"exact", "candidate_accuracy", "exact_ci"} <= set(body["no_dit"]) and body["no_diff"]["exact_hits"] in (0, 3)
    assert len({i["no_diff"]["text"] for i in body["items"]}) == 1  # M + L with no diff: one answer
    exact = client.post("/dit/evaluate", json={"dit": dit, "pairs": [{"diff": "d0", "description": answers[0]["text"].upper() + "."}] * 2, "max_new_tokens": 6}).json()
    assert exact["exact_hits"] == (2 if answers[0]["text"].strip() else 0) and exact["chance"] is None


@pytest.mark.parametrize(
    "route, body, status, field",
    [
        ("/dit/jobs", {"pairs": []}, 422, "pairs"),
        ("/dit/jobs", {"pairs": [{"diff": "nope", "description": "x"}]}, 422, "pairs[0].diff: no adapter named 'nope'"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}], "test_pairs": [{"diff": "nope", "description": "x"}]}, 422, "test_pairs[0].diff"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "  "}]}, 422, "description"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}] * 13}, 422, "pairs: too many pairs (13"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}], "batch_size": 9}, 422, "batch_size"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}], "r": 0}, 422, "r"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}], "lr": 0}, 422, "lr"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}], "steps": 1001}, 422, "1001 optimizer steps"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}] * 2, "test_fraction": 0.5, "test_pairs": [{"diff": "d0", "description": "x"}]}, 422, "test_pairs"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}], "test_fraction": 0.5}, 422, "test_fraction"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x"}] * 2, "test_fraction": 0.5, "candidates": ["y", "z"]}, 422, "].description: 'x' is not among"),
        ("/dit/jobs", {"pairs": [{"diff": "d0", "description": "x " * 600}]}, 422, "pairs[0].description"),
        ("/dit/describe", {"dit": "nope", "diffs": ["d0"]}, 422, "dit: no adapter named 'nope'"),
        ("/dit/describe", {"dit": None, "diffs": ["d0", "nope"]}, 422, "diffs[1]"),
        ("/dit/describe", {"dit": None, "diffs": []}, 422, "diffs"),
        ("/dit/describe", {"dit": None, "diffs": ["d0"] * 9}, 422, "diffs: too many diffs (9)"),
        ("/dit/describe", {"dit": None, "diffs": ["d0"], "temperature": -1}, 422, "temperature"),
        ("/dit/describe", {"dit": None, "diffs": ["d0"], "max_new_tokens": 100000}, 422, "max_new_tokens"),
        ("/dit/describe", {"diffs": ["d0"]}, 422, "dit"),
        ("/dit/describe", {"dit": None, "diffs": ["d0"], "candidates": ["a", ""]}, 422, "candidates"),
        ("/dit/evaluate", {"dit": None, "pairs": [{"diff": "d0", "description": "x"}]}, 422, "dit"),
        ("/dit/evaluate", {"dit": "d1", "pairs": []}, 422, "pairs"),
        ("/dit/evaluate", {"dit": "d1", "pairs": [{"diff": "d0", "description": "x"}], "candidates": ["y"]}, 422, "pairs[0].description"),
        ("/dit/evaluate", {"dit": "d1", "pairs": [{"diff": "zz", "description": "x"}]}, 422, "pairs[0].diff"),
    ],
)
def test_bad_input_names_the_field(client, route, body, status, field):
    base = digests(base_model(client))
    jobs = len(client.get("/dit/jobs").json()["jobs"])
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    assert field in r.json()["error"]["message"]
    assert len(client.get("/dit/jobs").json()["jobs"]) == jobs and digests(base_model(client)) == base


def test_unknown_job_is_404(client):
    assert client.get("/dit/jobs/nope").status_code == 404
    assert client.delete("/dit/jobs/nope").status_code == 404
    assert client.get("/dit/jobs/nope/adapter").status_code == 404


def test_generation_between_steps_cancel_and_purge(client):
    base = digests(base_model(client))
    greedy = {"prompt": "Tell me about a cat.", "do_sample": False, "max_new_tokens": 12}
    before = client.post("/generate", json=greedy).json()
    spec = {"pairs": [{"diff": d, "description": TOPICS[i % 3]} for i, d in enumerate(DIFFS)], "steps": 400, "batch_size": 2, "register": True}
    job_id = client.post("/dit/jobs", json=spec).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/dit/jobs/{job_id}").json()["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.post("/generate", json=greedy).json() == before  # served between steps, plain model
    mid = client.get(f"/dit/jobs/{job_id}").json()
    assert mid["status"] == "running" and 0 < mid["step"] < 400 and len(mid["losses"]) >= 2
    assert client.delete(f"/dit/jobs/{job_id}").json()["cancelling"] is True
    job = wait_status(client, job_id)
    assert job["status"] == "cancelled" and job["adapter"] is None and job["registered"] is None
    assert client.get(f"/dit/jobs/{job_id}/adapter").status_code == 404
    assert digests(base_model(client)) == base and not wrappers(base_model(client))
    assert client.delete(f"/dit/jobs/{job_id}", params={"purge": True}).json()["deleted"] is True
    assert client.get(f"/dit/jobs/{job_id}").status_code == 404


def test_failed_job_leaves_base_intact(client, monkeypatch):
    from weightdiff import InterpreterTrainer

    base = digests(base_model(client))

    def boom(self):
        raise RuntimeError("simulated fault in a step")

    monkeypatch.setattr(InterpreterTrainer, "step", boom)
    job_id = client.post("/dit/jobs", json={"pairs": [{"diff": "d0", "description": "cats"}], "steps": 3}).json()["id"]
    job = wait_status(client, job_id)
    assert job["status"] == "failed" and "simulated fault" in job["error"]
    assert digests(base_model(client)) == base and not wrappers(base_model(client))
    monkeypatch.undo()
    greedy = {"prompt": "Tell me about a cat.", "do_sample": False, "max_new_tokens": 4}
    assert client.post("/generate", json=greedy).status_code == 200


def test_purge_unregisters_the_interpreter(client):
    pairs = [{"diff": "d0", "description": "cats"}, {"diff": "d1", "description": "dogs"}]
    spec = {"pairs": pairs, "test_fraction": 0.5, "steps": 1, "r": 2, "register": True}
    job = wait_status(client, client.post("/dit/jobs", json=spec).json()["id"])
    assert job["status"] == "done" and job["registered"] in client.app.state.amplifier.registry
    assert job["result"]["train_pairs"] == job["result"]["test_pairs"] == 1 and job["result"]["test"]["n"] == 1
    assert job["result"]["test"]["candidate_accuracy"] is None  # one held-out description: no closed set
    assert client.delete(f"/dit/jobs/{job['id']}", params={"purge": True}).status_code == 200
    assert job["registered"] not in client.app.state.amplifier.registry


def test_restart_marks_running_jobs_interrupted(data_dir, client):
    pairs = [{"diff": d, "description": TOPICS[i % 3]} for i, d in enumerate(DIFFS)]
    with app_client(data_dir) as c:  # a second server on the same DATA_DIR, shut down mid-job
        wait_ready(c)
        write_diffs(c, data_dir)
        long = c.post("/dit/jobs", json={"pairs": pairs, "steps": 1000, "batch_size": 2}).json()["id"]
        deadline = time.monotonic() + 60
        while c.get(f"/dit/jobs/{long}").json()["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    record = json.loads((data_dir / "dit_jobs" / long / "job.json").read_text())
    assert record["status"] == "interrupted" and 1 <= record["step"] < 1000
    # A crash leaves "running" on disk with no shutdown to fix it: simulate one too.
    (data_dir / "dit_jobs" / "crashed00000").mkdir()
    crashed = record | {"id": "crashed00000", "status": "running", "step": 7, "error": None}
    (data_dir / "dit_jobs" / "crashed00000" / "job.json").write_text(json.dumps(crashed))
    with app_client(data_dir) as c:
        wait_ready(c)
        jobs = {j["id"]: j for j in c.get("/dit/jobs").json()["jobs"]}
        assert jobs[long]["status"] == "interrupted" and jobs[long]["step"] == record["step"]
        assert jobs["crashed00000"]["status"] == "interrupted" and "step 7" in jobs["crashed00000"]["error"]


@pytest.mark.parametrize(
    "path, method",
    [("/dit/jobs/{job_id}", "get"), ("/dit/jobs/{job_id}", "delete"), ("/dit/jobs/{job_id}/adapter", "get")],
)
def test_404_is_documented(client, path, method):
    responses = client.get("/openapi.json").json()["paths"][path][method]["responses"]
    assert responses["404"]["description"].startswith("no such ") and {"422", "503"} <= set(responses)
