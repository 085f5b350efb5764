"""An adapter replaced mid-experiment fails the experiment (resumably) instead of silently changing
the samples after it: conditions are pinned by content hash at submit."""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
from safetensors.torch import load_file, save_file

from tests.test_api import wait_ready
from tests.test_experiments_api import MARKER, PROMPTS, all_samples, app_client, wait_status

SPEC = {
    "prompts": PROMPTS,
    "conditions": [{"alpha": 1.5, "adapter": "pinned"}, {"alpha": 0.0}],
    "n": 12,
    "seed": 21,
    "temperature": 1.0,
    "max_new_tokens": 8,
    "detectors": [MARKER],
}


@pytest.fixture(scope="module")
def setup(demo_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("pins")
    shutil.copytree(demo_data_dir / "demo", data / "demo")
    adapter = next((data / "demo").glob("*/adapter"))
    original, changed = data / "adapters" / "original", data / "adapters" / "changed"
    shutil.copytree(adapter, original)
    shutil.copytree(adapter, changed)
    weights = load_file(changed / "adapter_model.safetensors")
    doubled = {k: v * 2 if "lora_B" in k else v for k, v in weights.items()}
    save_file(doubled, changed / "adapter_model.safetensors")
    with app_client(data) as client:
        wait_ready(client)
        yield client, original, changed


def register(client, source):
    client.delete("/adapters/pinned")
    r = client.post("/adapters", json={"name": "pinned", "source": str(source)})
    assert r.status_code == 201, r.text


@pytest.fixture
def pause_before_chunk(setup, monkeypatch):
    """Hold the experiment driver before it submits chunk `chunk` (0-based) until `release` is set;
    released at teardown too, so a failing test cannot leave the server's shutdown waiting."""
    runner = setup[0].app.state.experiment_runner
    real = runner._on_engine
    releases = []

    def pause(chunk):
        calls, paused, release = [0], threading.Event(), threading.Event()
        releases.append(release)

        async def on_engine(exp_id, fn):
            calls[0] += 1
            if calls[0] == chunk + 1:
                paused.set()
                await asyncio.to_thread(release.wait)
            return await real(exp_id, fn)

        monkeypatch.setattr(runner, "_on_engine", on_engine)
        return paused, release

    yield pause
    for release in releases:
        release.set()


def test_a_replaced_adapter_fails_the_experiment_and_resume_finishes_it_identically(
    setup, monkeypatch, pause_before_chunk
):
    client, original, changed = setup
    register(client, original)
    paused, release = pause_before_chunk(chunk=1)
    r = client.post("/experiments", json=SPEC)
    assert r.status_code == 202, r.text
    exp_id = r.json()["id"]
    assert paused.wait(120)
    pins = client.get(f"/experiments/{exp_id}").json()["pins"]
    assert list(pins) == ["adapter=pinned alpha=1.5"] and len(pins["adapter=pinned alpha=1.5"]) == 64
    register(client, changed)  # DELETE + POST under the same name, other weights
    release.set()
    failed = wait_status(client, exp_id)
    assert failed["status"] == "failed" and failed["progress"]["done"] == 8, failed
    assert (
        "condition 'adapter=pinned alpha=1.5': adapter 'pinned' changed since the experiment was submitted"
        in failed["error"]
    )
    assert f"register the original again, then POST /experiments/{exp_id}/resume" in failed["error"]
    committed = all_samples(client, exp_id)
    monkeypatch.undo()

    assert client.post(f"/experiments/{exp_id}/resume").status_code == 202  # still the other weights
    again = wait_status(client, exp_id)
    assert again["status"] == "failed" and "adapter 'pinned' changed" in again["error"]
    assert again["progress"]["done"] == 8 and all_samples(client, exp_id) == committed

    register(client, original)
    assert client.post(f"/experiments/{exp_id}/resume").status_code == 202
    resumed = wait_status(client, exp_id)
    assert resumed["status"] == "done" and resumed["progress"]["done"] == 48, resumed
    other = client.post("/experiments", json=SPEC).json()["id"]  # uninterrupted, original weights
    assert wait_status(client, other)["status"] == "done"
    reference = all_samples(client, other)
    assert all_samples(client, exp_id) == reference and committed == reference[:8]
    assert resumed["summary"] == client.get(f"/experiments/{other}").json()["summary"]


def test_the_pin_covers_adapters_an_amplification_config_applies(setup, monkeypatch, pause_before_chunk):
    client, original, changed = setup
    register(client, original)
    twice = [{"layers": "all", "module_amplifications": [{"modules": "all", "weight": 2.0}]}]
    config = {
        "name": "twice",
        "adapters": [{"organism_name": "custom", "variant": "pinned", "layer_amplifications": twice}],
    }
    body = SPEC | {"conditions": [{"alpha": 1.0, "amplification": config}], "n": 8}
    paused, release = pause_before_chunk(chunk=1)
    exp_id = client.post("/experiments", json=body).json()["id"]
    assert paused.wait(120)
    register(client, changed)
    release.set()
    failed = wait_status(client, exp_id)
    assert failed["status"] == "failed" and failed["progress"]["done"] == 8, failed
    assert "amplification config 'twice' (or an adapter it applies) changed" in failed["error"]
    monkeypatch.undo()
    register(client, original)
    assert client.post(f"/experiments/{exp_id}/resume").status_code == 202
    assert wait_status(client, exp_id)["status"] == "done"
