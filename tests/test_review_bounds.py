"""Odd inputs get a clear 422 at the schema, never a 500 or garbage (issue 25, item 4).

- a config `name` becomes a folder name and a model id: 300 characters used to be a 500 (file name
  too long) on /v1/compile_and_load_amplification;
- an amplification weight of 1e308 was accepted (greedy decoded garbage with a 200): |weight| is
  bounded, weight x the adapter's scaling must be finite, and a merge whose values would not be
  finite is refused before it is written, naming the module (its layer), with the weights bit-exact;
- a weight-diff `seed` of 1e29 was accepted and the job failed later with an overflow.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tests.test_amplification_api import config
from tests.test_amplification_merge import digests, make_adapter
from tests.test_api import make_settings, wait_ready

from app.main import create_app


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory, tokenizer):
    data = tmp_path_factory.mktemp("bounds")
    make_adapter(tokenizer, data / "adapters" / "tiny", seed=3)
    # Finite factors (A 1e19, B 1e18 times larger than usual: B @ A ~1e36, still finite) and a finite
    # weight x scaling (1000 x 2) whose merged values overflow float32.
    weights = make_adapter(tokenizer, data / "adapters" / "loud", seed=4) / "adapter_model.safetensors"
    save_file({k: v * (1e19 if "lora_A" in k else 1e18) for k, v in load_file(weights).items()}, weights)
    # lora_alpha / r = 2.5e36: x 1000 is past float32's range (the deltas are computed in float32).
    make_adapter(tokenizer, data / "adapters" / "louder", seed=5, lora_alpha=1e37)
    adapters = ",".join(f"{n}={data / 'adapters' / n}" for n in ("tiny", "loud", "louder"))
    with TestClient(create_app(make_settings(tiny_dirs, data, adapters=adapters))) as c:
        wait_ready(c)
        yield c


def message(r) -> str:
    assert r.status_code == 422, r.text
    return r.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/compile_and_load_amplification", "/amplification/compile"])
@pytest.mark.parametrize("name", ["x" * 300, "a/b", "../up", ".hidden", "white space", "x" * 129])
def test_config_names_are_bounded_file_safe_names(setup, route, name):
    client = setup
    r = client.post(route, json={"config": config(name=name)})
    assert message(r).startswith("name: must be 1-128 characters of [A-Za-z0-9._-]")


def test_the_longest_name_still_compiles_and_writes(setup):
    r = setup.post("/v1/compile_and_load_amplification", json={"config": config(name="n" * 128)})
    assert r.status_code == 200 and r.json()["lora_name"].startswith("n" * 128 + "_"), r.text


@pytest.mark.parametrize("weight", [1e308, -1e308, 1001, -1000.5])
@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampling"])
def test_huge_weights_are_422_at_the_config(setup, weight, temperature):
    client = setup
    before = digests(client.app.state.pair.before.model)
    body = {"prompt": "Hello", "configs": [config(weight=weight)], "max_new_tokens": 2, "temperature": temperature}
    assert "weight: must be in [-1000, 1000]" in message(client.post("/amplification/generate", json=body))
    assert digests(client.app.state.pair.before.model) == before


def mixed(loud_weight: float, loud: str = "loud") -> dict:
    """tiny x2 on every layer, and `loud` on layer 1 only: layer 0's modules merge (and are written)
    before layer 1's overflow, so the refusal has to restore what it already wrote."""
    one = config(weight=2, adapter="tiny")["adapters"][0]
    two = config(weight=0, adapter=loud)["adapters"][0]
    two["layer_amplifications"].append({"layers": [1], "module_amplifications": [{"modules": "all", "weight": loud_weight}]})
    return {"name": "mixed", "adapters": [one, two]}


@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampling"])
def test_a_merge_that_would_overflow_is_422_and_writes_nothing(setup, temperature):
    client = setup
    model = client.app.state.pair.before.model
    before = digests(model)
    body = {"prompt": "Hello", "configs": [mixed(1000)], "max_new_tokens": 2, "temperature": temperature}
    text = message(client.post("/amplification/generate", json=body))
    assert "merging into 'model.layers.1." in text and "not finite in float32" in text
    assert digests(model) == before
    body["configs"] = [mixed(1000, "louder")]
    text = message(client.post("/amplification/generate", json=body))
    assert "adapter 'louder': weight 1000.0 x scaling 2.5e+36 for layer 1" in text and "not finite in float32" in text
    assert digests(model) == before
    # The same refusal in adapter mode (hooks compute the same fp32 deltas on activations).
    r = client.post("/generate_lda", json={"prompt": "Hello", "alpha": 1, "amplification": mixed(1000, "louder"),
                                           "max_new_tokens": 2, "temperature": temperature})  # fmt: skip
    assert "not finite in float32" in message(r)
    # A usable weight on the same adapter still works.
    body["configs"] = [mixed(1e-20)]
    assert client.post("/amplification/generate", json=body).status_code == 200
    assert digests(model) == before


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"seed": 10**29}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**62 + 1}, "seed"),
        ({"tasks": [{"samples": ["a b c"], "seed": 10**29}]}, "tasks.0.seed"),
        ({"tasks": [{"samples": ["a b c"], "seed": -5}]}, "tasks.0.seed"),
    ],
)
def test_weightdiff_seeds_are_bounded_at_the_schema(setup, spec, field):
    body = {"tasks": [{"samples": ["a b c"]}], "steps": 1} | spec
    assert message(setup.post("/weightdiff/jobs", json=body)).startswith(f"{field}: ")
    assert setup.get("/weightdiff/jobs").json()["jobs"] == []  # no job was created


def test_the_library_bounds_seeds_too():
    from weightdiff import Task, TrainConfig

    for bad in (10**29, -1, 2**63):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
            TrainConfig(seed=bad)
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
            Task(samples=["x"], seed=bad)
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1
