"""ADL with an LLM grader: the threshold search's control logic, the grader client, and a job on
the demo pair graded by a fake OpenAI-compatible endpoint (no network)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import zipfile

import httpx
import pytest
from fastapi.testclient import TestClient

from lda.diffing.threshold import passes, search_threshold, tree_midpoints
from tests.test_api import wait_ready
from tests.test_diffing_api import wait_job

from app.demo import MARKER
from app.demo.build import demo_texts
from app.diffing_lens.grading import Grader, GraderConfig
from app.main import create_app
from app.settings import Settings


def sequential(coherent_below: float, low: float, high: float, steps: int) -> list[float]:
    """The plain binary search, one midpoint per step."""
    visited = []
    for _ in range(steps):
        mid = (low + high) / 2
        visited.append(mid)
        low, high = (mid, high) if mid < coherent_below else (low, mid)
    return visited


@pytest.mark.parametrize("edge", [0.0, 3.7, 37.3, 99.99, 150.0])
@pytest.mark.parametrize("batch_steps", [1, 3, 5])
def test_batched_search_visits_the_sequential_midpoints(edge, batch_steps):
    rounds = []

    async def grade(points):
        rounds.append(len(points))
        return [[p < edge] * 10 for p in points]

    trace = asyncio.run(search_threshold(grade, 0.0, 100.0, steps=12, batch_steps=batch_steps))
    visited = sequential(edge, 0.0, 100.0, 12)
    assert [s["strength"] for s in trace.steps] == visited
    assert trace.threshold == max([0.0] + [m for m in visited if m < edge])
    assert len(rounds) == -(-12 // batch_steps) and sum(rounds) == sum(2 ** min(batch_steps, 12 - i) - 1 for i in range(0, 12, batch_steps))


def test_a_midpoint_passes_on_three_quarters_of_what_could_be_graded():
    assert passes([True, True, True, False], 75.0) == (True, 75.0)
    assert passes([True, True, False, False], 75.0) == (False, 50.0)
    assert passes([True, True, True, None, None], 75.0) == (True, 100.0)  # ungraded samples do not count
    assert passes([None, None], 75.0) == (False, None)
    assert tree_midpoints(0, 8, 3) == [1, 2, 3, 4, 5, 6, 7]


def fake_grader(seen: list[dict]):
    """COHERENT unless the text mentions the marker; scales: the smallest one listed."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append({"auth": request.headers.get("authorization"), "model": body["model"]})
        prompt = body["messages"][0]["content"]
        if "COHERENT or INCOHERENT" in prompt:
            text = prompt.split("<<<", 1)[1].rsplit(">>>", 1)[0]
            answer = "INCOHERENT" if MARKER in text else "COHERENT"
        else:
            first = re.search(r"^([0-9.]+): \[(.*)\]$", prompt, re.M)
            answer = json.dumps({"best_scale": float(first.group(1)), "tokens": ["x"]}) if first else "?"
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": answer}}]})

    return httpx.MockTransport(handler)


def test_the_grader_client_maps_answers_and_reports_failures():
    answers = iter(["COHERENT.", "incoherent", "maybe", '{"best_scale": 2, "tokens": ["cat"]}', "no json", ""])

    def handler(request):
        return httpx.Response(200, json={"choices": [{"message": {"content": next(answers)}}]})

    async def run():
        grader = Grader(GraderConfig("http://grader/v1", "m", "k"), transport=httpx.MockTransport(handler))
        labels = []
        for text in ("a", "b", "c"):  # one at a time: the answers come in order
            labels += await grader.coherent([text])
        scales = [{"scale": 2.0, "tokens": [{"token": " cat", "prob": 0.5}]}]
        best, none = await grader.best_scale(scales), await grader.best_scale(scales)
        await grader.close()
        return labels, best, none

    labels, best, none = asyncio.run(run())
    assert labels == [True, False, None]
    assert best["best_scale"] == 2.0 and best["selected_tokens"] == ["cat"] and best["tokens_at_best_scale"] == [" cat"]
    assert none is None

    async def broken():
        grader = Grader(GraderConfig("http://grader/v1", "m"), transport=httpx.MockTransport(lambda r: httpx.Response(500)))
        try:
            await grader.coherent(["x"])
        finally:
            await grader.close()

    with pytest.raises(RuntimeError, match="HTTP 500"):
        asyncio.run(broken())


def test_an_adl_job_with_a_grader_picks_scales_and_finds_a_threshold(demo_data_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("graded")
    shutil.copytree(demo_data_dir / "demo", data_dir / "demo")
    seen: list[dict] = []
    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        wait_ready(client)
        client.app.state.grader_transport = fake_grader(seen)
        texts = demo_texts(client.app.state.pair.after.tokenizer, 40, seed=1)
        r = client.post("/diffing/jobs", json={
            "method": "adl", "texts": texts, "max_tokens_per_sample": 8, "layers": [1.0], "patchscope_positions": [0],
            "grader": {"base_url": "http://grader.invalid/v1", "model": "judge", "api_key": "sk-secret"},
            "steering_positions": [0], "steering_prompts": ["What is the sun?"], "steering_samples": 8,
            "steering_max_strength": 4.0, "steering_max_new_tokens": 30, "steering_final_samples": 2})  # fmt: skip
        assert r.status_code == 202, r.text
        done = wait_job(client, r.json()["id"], timeout=600)
        assert done["status"] == "done", done["error"]
        full = client.get(f"/diffing/jobs/{done['id']}/result").json()
        layer = full["layers"][0]
        best = layer["positions"][0]["patchscope_best"]["delta"]
        assert best["best_scale"] == 0.5 and best["selected_tokens"] == ["x"]
        steering = layer["steering"][0]
        # The marker makes a sample "incoherent": at strength 0 it is rare, at 1 frequent (the ADL
        # tests measure 1/64 and 43/64), so the threshold lies strictly between.
        print("threshold", steering["avg_threshold"], steering["thresholds"][0]["steps"])
        assert 0.0 < steering["avg_threshold"] < 1.0
        assert len(steering["thresholds"][0]["steps"]) == 12
        gen = steering["generations"][0]
        assert len(gen["steered_samples"]) == len(gen["unsteered_samples"]) == 2
        names = zipfile.ZipFile(io.BytesIO(client.get(f"/diffing/jobs/{done['id']}/results.zip").content)).namelist()
        assert "layer_2/texts/steering/position_0/threshold.json" in names
        assert "layer_2/texts/steering/position_0/generations.jsonl" in names
        assert all(s["auth"] == "Bearer sk-secret" and s["model"] == "judge" for s in seen)
        assert full["grader"]["calls"] == len(seen) > 0
        job_json = (data_dir / "diffing_jobs" / done["id"] / "job.json").read_text()
        assert "sk-secret" not in job_json and "sk-secret" not in json.dumps(done)
