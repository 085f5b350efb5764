"""One name rule for adapters, whichever way they are registered (issue 25, item 3).

`POST /adapters` once accepted `ref_f7c1f2c5090b` (after which a config naming an adapter by path
compiled against that registered adapter, another source), `after` (which /v1/models then hid) and
compiled lora_names (which win in look-ups). Every way in now refuses them with a 4xx naming the
clash: POST /adapters, /v1/load_lora_adapter, the ADAPTERS setting at start, a weight-diff job's
`register`, and a compiled config whose lora_name would take an adapter's or a model's name.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from amplification import AdapterError, AmplificationConfig
from lda import LDAModelPair, Side
from tests.test_amplification_api import config
from tests.test_amplification_merge import make_adapter
from tests.test_api import make_settings, wait_ready

from app.amplification_lens.amplifier import Amplifier, reference_name
from app.main import create_app


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory, tokenizer):
    data = tmp_path_factory.mktemp("names")
    make_adapter(tokenizer, data / "adapters" / "tiny", seed=3)
    make_adapter(tokenizer, data / "adapters" / "other", seed=4)
    settings = make_settings(tiny_dirs, data, adapters=f"tiny={data / 'adapters' / 'tiny'}")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c, data


def names(client) -> list[str]:
    return [a["name"] for a in client.get("/adapters").json()["adapters"]]


def model_ids(client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def post_adapter(client, name: str, source: str):
    return client.post("/adapters", json={"name": name, "source": source})


def vllm_load(client, name: str, source: str):
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": source})


def test_a_config_naming_an_adapter_by_path_gets_that_adapter(setup):
    """The issue's scenario: `ref_<hash of a path>` registered with another source hijacked the path."""
    client, data = setup
    path = str(data / "adapters" / "other")
    hijack = reference_name(path)
    r = post_adapter(client, hijack, str(data / "adapters" / "tiny"))
    assert r.status_code == 422, r.text
    assert "'ref_' are reserved" in r.json()["error"]["message"]
    assert hijack not in names(client)
    r = client.post("/amplification/compile", json={"config": config(adapter=path)})
    assert r.status_code == 200, r.text
    adapter = client.app.state.amplifier.registry.get(r.json()["adapters"][0]["adapter"])
    assert adapter.source == path  # the adapter at that path, not one a request put in its place


@pytest.mark.parametrize("name", ["after", "before", "lda"])
def test_model_ids_are_refused_on_every_route(setup, name):
    client, data = setup
    shown = model_ids(client)
    r = post_adapter(client, name, str(data / "adapters" / "other"))
    assert r.status_code == 422 and "is a model id of this server" in r.json()["error"]["message"], r.text
    r = vllm_load(client, name, str(data / "adapters" / "other"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    assert name not in names(client) and model_ids(client) == shown


def test_the_models_own_ids_are_reserved_too(pair, tmp_path, tokenizer):
    """A model loaded as `gpt2` (a hub id without an org) makes `gpt2` a model id: no adapter takes it."""
    named = LDAModelPair(Side("gpt2", pair.after.model, tokenizer), Side("base7", pair.before.model, tokenizer))
    amp = Amplifier(named, make_settings(("x", "y"), tmp_path))
    make_adapter(tokenizer, tmp_path / "lora", seed=3)
    for name in ("gpt2", "base7"):
        with pytest.raises(AdapterError, match=f"{name!r} is a model id"):
            amp.load_adapter(name, str(tmp_path / "lora"))
    assert amp.load_adapter("fine", str(tmp_path / "lora")).name == "fine"


def test_compiled_lora_names_are_refused_in_memory_and_on_disk(setup):
    client, data = setup
    compiled = client.post("/amplification/compile", json={"config": config(name="mem")}).json()["lora_name"]
    written = client.post("/v1/compile_and_load_amplification", json={"config": config(name="disk")})
    written = written.json()["lora_name"]
    for name in (compiled, written):
        r = post_adapter(client, name, str(data / "adapters" / "other"))
        assert r.status_code == 422 and "compiled amplification's lora_name" in r.json()["error"]["message"]
        r = vllm_load(client, name, str(data / "adapters" / "other"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
        assert name not in names(client)
        # The name still selects the compiled config, as /v1/models lists it.
        assert name in model_ids(client)


def test_a_config_cannot_take_an_adapters_name(setup):
    """The other direction: an adapter registered first under what a config's lora_name will be."""
    client, data = setup
    body = config(name="taken", weight=1.5)
    lora_name = AmplificationConfig.from_dict(body).lora_name
    assert post_adapter(client, lora_name, str(data / "adapters" / "other")).status_code == 201
    try:
        for route in ("/amplification/compile", "/v1/compile_and_load_amplification"):
            r = client.post(route, json={"config": body})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["message"].startswith(f"name: the config's lora_name {lora_name!r}")
        # The adapter is still what the name selects.
        assert client.get(f"/adapters/{lora_name}").json()["source"] == str(data / "adapters" / "other")
    finally:
        client.delete(f"/adapters/{lora_name}")


def test_duplicates_need_replace_on_both_routes(setup):
    client, data = setup
    r = post_adapter(client, "tiny", str(data / "adapters" / "other"))
    assert r.status_code == 422 and "'tiny' has already been loaded (delete it or pass replace)" in r.text
    r = vllm_load(client, "tiny", str(data / "adapters" / "other"))
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]


@pytest.mark.parametrize("entry", ["ref_0123456789ab", "after", "lda"])
def test_the_adapters_setting_follows_the_rule(tiny_dirs, tmp_path, tokenizer, entry):
    make_adapter(tokenizer, tmp_path / "lora", seed=3)
    settings = make_settings(tiny_dirs, tmp_path, adapters=f"{entry}={tmp_path / 'lora'}")
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 120
        while c.app.state.load_error is None and c.app.state.pair is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/ready").status_code == 503  # the start fails, naming the entry
        assert c.app.state.load_error.startswith("AdapterNameError: ") and repr(entry) in c.app.state.load_error


def test_weightdiff_registration_goes_through_the_rule(setup, monkeypatch):
    """A job's `register` names its adapters wd-<job>-<task> through the same Amplifier.load_adapter."""
    client, _ = setup
    amp = client.app.state.amplifier
    seen = []
    original = Amplifier.check_name

    def check_name(self, name, *args, **kwargs):
        seen.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(Amplifier, "check_name", check_name)
    r = client.post("/weightdiff/jobs", json={"tasks": [{"samples": ["a b c d e"]}], "steps": 1, "register": True})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/weightdiff/jobs/{job_id}").json()["status"] != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == [f"wd-{job_id}-task0"] and f"wd-{job_id}-task0" in amp.registry
