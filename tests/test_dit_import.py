"""DIT's own files registered through POST /adapters: a stage-1 weight diff (DIT's `.pt` list or this
service's `export_dit` safetensors) and a stage-2 interpreter (`dit-adapter.pt`), each equal to the
same factors uploaded as a PEFT directory; refusals name the module, the index or the file."""

from __future__ import annotations

import pickle

import pytest
import torch
from fastapi.testclient import TestClient

from tests.test_amplification_merge import digests
from tests.test_api import make_settings, wait_ready
from weightdiff.export import export_dit, export_peft, to_dit
from weightdiff.lora import LoRAFactors, decoder_linears

from app.main import create_app


def random_factors(model, r: int, seed: int) -> dict[str, LoRAFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: LoRAFactors(
            torch.randn(lin.in_features, r, generator=gen) * 0.1, torch.randn(r, lin.out_features, generator=gen)
        )
        for name, lin in decoder_linears(model).items()
    }


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("ditdata")
    with TestClient(create_app(make_settings(tiny_dirs, data))) as c:
        wait_ready(c)
        yield c, data


def register(client, name, source, **extra):
    return client.post("/adapters", json={"name": name, "source": str(source), **extra})


def same_adapter(client, a: str, b: str) -> None:
    """Identical factors and scaling in the registry, and the same adapter-mode text."""
    registry = client.app.state.amplifier.registry
    x, y = registry.get(a), registry.get(b)
    assert x.scaling == y.scaling and x.r == y.r and sorted(x.factors) == sorted(y.factors)
    for module in x.factors:
        assert all(torch.equal(p, q) for p, q in zip(x.factors[module], y.factors[module], strict=True)), module
    body = {"prompt": "Hello world", "max_new_tokens": 8, "temperature": 1.0, "seed": 3}
    texts = [client.post("/generate_lda", json=body | {"adapter": n}).json()["completion"] for n in (a, b)]
    assert texts[0] == texts[1]


def test_weight_diffs_import_as_the_adapter_their_peft_export_is(setup):
    client, data = setup
    model = client.app.state.amplifier.model
    weights = digests(model)
    diffs = [random_factors(model, 2, seed) for seed in (1, 2)]
    for i, factors in enumerate(diffs):
        export_peft(factors, model, data / f"peft{i}")
        assert register(client, f"peft{i}", data / f"peft{i}").status_code == 201
    # DIT's torch.save list, its module names as PEFT prefixes them (mapped back onto the model)
    entries = [{"topic": f"t{i}", "trigger": i, "weight_diff": to_dit(f)} for i, f in enumerate(diffs)]
    entries[1]["weight_diff"] = {f"base_model.model.{k}": v for k, v in entries[1]["weight_diff"].items()}
    torch.save(entries, data / "weight_diff_0.pt")
    for i in range(2):
        r = register(client, f"dit{i}", "weight_diff_0.pt", format="dit_weight_diff", index=i)  # relative
        assert r.status_code == 201, r.text
        assert r.json()["scaling"] == 0.5  # DIT's 1/r
        same_adapter(client, f"peft{i}", f"dit{i}")
    export_dit(diffs[0], data / "ours.safetensors")  # the stage-1 file this service writes
    assert register(client, "ours", data / "ours.safetensors", format="dit_weight_diff").status_code == 201
    same_adapter(client, "peft0", "ours")
    assert digests(model) == weights


def test_an_interpreter_file_imports_with_its_transposed_layout(setup):
    client, data = setup
    model = client.app.state.amplifier.model
    factors = random_factors(model, 4, seed=7)
    export_peft(factors, model, data / "interp-peft")
    # dit-adapter.pt: {module: (A [out, r], B [r, in])}, the update x @ B^T @ A^T / r
    torch.save({k: (f.up.T.clone(), f.down.T.clone()) for k, f in factors.items()}, data / "dit-adapter.pt")
    assert register(client, "interp-peft", data / "interp-peft").status_code == 201
    r = register(client, "interp", data / "dit-adapter.pt", format="dit_adapter")
    assert r.status_code == 201, r.text
    same_adapter(client, "interp-peft", "interp")
    copy = data / "imported" / "interp"
    assert (copy / "adapter_model.safetensors").exists()
    assert client.delete("/adapters/interp").status_code == 200 and not copy.exists()


def error(r, status: int = 422) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def test_refusals_name_what_does_not_fit(setup, tmp_path_factory):
    client, data = setup
    model = client.app.state.amplifier.model
    weights = digests(model)
    factors = random_factors(model, 2, seed=3)
    first = sorted(factors)[0]
    entry = {"topic": "x", "trigger": 1, "weight_diff": to_dit(factors)}
    torch.save([entry], data / "one.pt")
    assert "give the index" in error(register(client, "a", data / "one.pt", format="dit_weight_diff"))
    assert "index 3" in error(register(client, "a", data / "one.pt", format="dit_weight_diff", index=3))
    assert "index" in error(register(client, "a", data / "one.pt", format="dit_adapter", index=0))
    foreign = dict(to_dit(factors), **{"model.vision.proj": to_dit(factors)[first]})
    torch.save([{"weight_diff": foreign}], data / "foreign.pt")
    assert "'model.vision.proj'" in error(register(client, "a", data / "foreign.pt", format="dit_weight_diff", index=0))
    wrong = dict(to_dit(factors))
    wrong[first] = (wrong[first][0][:, :-1], wrong[first][1])  # one output feature short
    torch.save([{"weight_diff": wrong}], data / "wrong.pt")
    assert repr(first) in error(register(client, "a", data / "wrong.pt", format="dit_weight_diff", index=0))

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (data / "evil.pt").write_bytes(pickle.dumps([Evil()]))
    assert "not a DIT" in error(register(client, "a", data / "evil.pt", format="dit_weight_diff", index=0))
    outside = tmp_path_factory.mktemp("outside") / "x.pt"
    torch.save([entry], outside)
    missing = data / "missing.pt"
    assert error(register(client, "a", outside, format="dit_weight_diff", index=0)) == (
        f"no file at {str(outside)!r} under the allowed folders"
    )
    assert error(register(client, "a", missing, format="dit_weight_diff", index=0)) == (
        f"no file at {str(missing)!r} under the allowed folders"
    )
    assert "reserved" in error(register(client, "ref_x", data / "one.pt", format="dit_weight_diff", index=0))
    assert "index" in error(register(client, "a", data / "one.pt", index=0))  # the peft format takes none
    assert "a" not in client.app.state.amplifier.registry and not (data / "imported" / "a").exists()
    assert digests(model) == weights
