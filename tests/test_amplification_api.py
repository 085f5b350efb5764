"""The amplification lens over HTTP on tiny local models: registry, compile, generate, exactness."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.test_amplification_merge import digests, make_adapter
from tests.test_api import make_settings, parse_sse, wait_ready

from app.main import create_app


def config(weight=2.0, adapter="tiny", layers="all", modules="all", name="amp", **entry):
    la = {"layers": layers, "module_amplifications": [{"modules": modules, "weight": weight}], **entry}
    return {
        "name": name,
        "adapters": [{"organism_name": "custom", "variant": adapter, "layer_amplifications": [la]}],
    }


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory, tokenizer):
    data = tmp_path_factory.mktemp("ampdata")
    make_adapter(tokenizer, data / "adapters" / "tiny", seed=3)
    make_adapter(tokenizer, data / "adapters" / "other", seed=4)
    outside = tmp_path_factory.mktemp("outside")
    make_adapter(tokenizer, outside / "evil", seed=5)
    (data / "adapters" / "link").symlink_to(outside / "evil")
    settings = make_settings(
        tiny_dirs, data, adapters=f"tiny={data / 'adapters' / 'tiny'}", max_rows_per_request=16
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c, data, outside


@pytest.fixture
def client(setup):
    return setup[0]


def base_digests(client):
    return digests(client.app.state.pair.before.model)


def test_registry_routes(setup):
    client, data, outside = setup
    listed = client.get("/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == ["tiny"] and listed[0]["r"] == 4 and listed[0]["layers"] == [0, 1]
    r = client.post("/adapters", json={"name": "other", "source": str(data / "adapters" / "other")})
    assert r.status_code == 201 and r.json()["scaling"] == 2.0
    assert (
        client.post(
            "/adapters", json={"name": "other", "source": str(data / "adapters" / "other")}
        ).status_code
        == 422
    )
    assert client.get("/adapters/other").json()["name"] == "other"
    assert client.delete("/adapters/other").json() == {"deleted": "other"}
    r = client.get("/adapters/other")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert client.delete("/adapters/nope").status_code == 404


@pytest.mark.parametrize(
    "source",
    ["OUTSIDE/evil", "DATA/adapters/../../outside/evil", "DATA/adapters/link", "/etc", "adapters/../../x"],
)
def test_adapter_paths_are_confined(setup, source):
    client, data, outside = setup
    source = source.replace("OUTSIDE", str(outside)).replace("DATA", str(data))
    r = client.post("/adapters", json={"name": "bad", "source": source})
    assert r.status_code == 422, r.text
    assert "bad" not in [a["name"] for a in client.get("/adapters").json()["adapters"]]


def test_compile_resolves_and_hashes(client):
    body = config(weight=2, layers=[1], modules="mlp")
    r = client.post("/amplification/compile", json={"config": body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["lora_name"] == f"amp_{out['hash'][:8]}"
    assert out["adapters"][0]["layers"] == [{"attention": 1.0, "mlp": 1.0}, {"attention": 1.0, "mlp": 2.0}]
    body["adapters"][0]["layer_amplifications"][0]["module_amplifications"][0]["weight"] = 2.0
    assert client.post("/amplification/compile", json={"config": body}).json()["hash"] == out["hash"]


@pytest.mark.parametrize(
    "body, field",
    [
        (config(layers=5), "layers"),
        (config(layers={"type": "range", "start": 1, "end": 0}), "end"),
        (config(layers={"type": "range", "start": 0.2, "end": 1.5}, is_relative=True), "end"),
        (config(layers=[0.5]), "layers"),
        (config(modules="embeddings"), "modules"),
        (config(adapter="nobody"), "variant"),
        (config(weight="x"), "weight"),
        ({"name": "x", "adapters": []}, "adapters"),
        (
            {"name": "x", "adapters": [{"organism_name": "unknown_org", "layer_amplifications": []}]},
            "organism_name",
        ),
    ],
)
def test_bad_configs_are_422_naming_the_field(client, body, field):
    r = client.post("/amplification/compile", json={"config": body})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_oversized_configs_are_422_inline_and_on_disk(setup):
    """MAX_CONFIG_BYTES (256 KiB by default) caps what a request can make the server parse."""
    client, data, _ = setup
    big = {**config(), "description": "x" * 300_000}
    r = client.post("/amplification/compile", json={"config": big})
    assert r.status_code == 422 and "MAX_CONFIG_BYTES" in r.json()["error"]["message"], r.text
    r = client.post("/generate_lda", json={"prompt": "a", "max_new_tokens": 1, "amplification": big})
    assert r.status_code == 422 and "MAX_CONFIG_BYTES" in r.json()["error"]["message"], r.text
    path = data / "big.yaml"
    path.write_text("# padding\n" * 40_000 + json.dumps(config()))
    r = client.post("/amplification/compile", json={"config_path": str(path)})
    assert r.status_code == 422 and "config_path" in r.json()["error"]["message"], r.text
    # Under the limit the same config compiles.
    assert client.post("/amplification/compile", json={"config": config()}).status_code == 200


def test_adapter_for_another_base_is_422(setup, tokenizer):
    client, data, _ = setup
    make_adapter(
        tokenizer,
        data / "adapters" / "wide",
        seed=6,
        base_overrides={"hidden_size": 48, "num_attention_heads": 4},
    )
    r = client.post("/adapters", json={"name": "wide", "source": str(data / "adapters" / "wide")})
    assert r.status_code == 422 and "another base" in r.json()["error"]["message"]


def test_compile_and_load_then_use_the_name(setup):
    client, data, outside = setup
    (data / "cfg.yaml").write_text(json.dumps(config(weight=3, name="triple")))
    r = client.post("/v1/compile_and_load_amplification", json={"config_path": str(data / "cfg.yaml")})
    assert r.status_code == 200, r.text
    lora_name, path = r.json()["lora_name"], r.json()["lora_path"]
    assert lora_name.startswith("triple_")
    from pathlib import Path

    compiled = Path(path)
    assert (compiled / "amplification_config.yaml").exists() and (
        compiled / "adapter_model.safetensors"
    ).is_symlink()
    (outside / "cfg.yaml").write_text(json.dumps(config()))
    r = client.post("/v1/compile_and_load_amplification", json={"config_path": str(outside / "cfg.yaml")})
    assert r.status_code == 422 and "config_path" in r.json()["error"]["message"]
    # The toolkit's placeholder substitution: a preset with `variant: null` filled by the request.
    from amplification import PRESETS_DIR

    r = client.post(
        "/v1/compile_and_load_amplification",
        json={"config_path": str(PRESETS_DIR / "default_3x.yaml"), "variant": "tiny"},
    )
    assert r.status_code == 200 and r.json()["lora_name"].startswith("default_3x_"), r.text
    assert (
        client.post(
            "/v1/compile_and_load_amplification", json={"config_path": str(PRESETS_DIR / "default_3x.yaml")}
        ).status_code
        == 422
    )
    gen = client.post(
        "/amplification/generate",
        json={"prompt": "Hello world", "configs": [lora_name], "temperature": 0, "max_new_tokens": 6},
    )
    assert gen.status_code == 200 and gen.json()["columns"][0]["lora_name"] == lora_name
    lda = client.post(
        "/generate_lda",
        json={
            "prompt": "Hello world",
            "amplification": lora_name,
            "alpha": 0,
            "temperature": 0,
            "max_new_tokens": 6,
        },
    )
    assert lda.status_code == 200 and lda.json()["model_after"].endswith("+" + lora_name)
    assert lda.json()["completion"] == gen.json()["columns"][0]["results"][0]["completion"]


def test_generate_columns_and_equivalences(client):
    before = base_digests(client)
    body = {
        "prompts": ["Hello world", "A model"],
        "configs": [
            config(weight=1.0, name="one"),
            config(weight=0.0, name="zero"),
            config(weight=3.0, name="three"),
        ],
        "include_base": True,
        "include_adapters": True,
        "temperature": 0,
        "max_new_tokens": 8,
    }
    r = client.post("/amplification/generate", json=body)
    assert r.status_code == 200, r.text
    cols = {c["name"]: [x["completion"] for x in c["results"]] for c in r.json()["columns"]}
    assert list(cols) == ["base", "tiny", "one", "zero", "three"]
    assert cols["one"] == cols["tiny"] and cols["zero"] == cols["base"] and cols["three"] != cols["tiny"]
    plain = client.post(
        "/generate", json={"prompt": "Hello world", "do_sample": False, "max_new_tokens": 8}
    ).json()
    assert plain["model_2"]["completion"] == cols["base"][0]
    adapter_lda = client.post(
        "/generate_lda",
        json={
            "prompts": ["Hello world", "A model"],
            "adapter": "tiny",
            "alphas": [-1, 0],
            "temperature": 0,
            "max_new_tokens": 8,
        },
    ).json()
    assert [x["completion"] for x in adapter_lda["results"]] == [
        cols["base"][0],
        cols["tiny"][0],
        cols["base"][1],
        cols["tiny"][1],
    ]
    assert base_digests(client) == before


def test_streamed_amplification(client):
    with client.stream(
        "POST",
        "/amplification/generate",
        json={
            "prompt": "Hello world",
            "configs": ["tiny"],
            "include_base": True,
            "stream": True,
            "seed": 1,
            "max_new_tokens": 6,
        },
    ) as r:
        events = parse_sse(r.read().decode())
    result = events[-1][1]
    streamed = {}
    for _, data in events[:-1]:
        streamed[(data["column"], data["row"])] = (
            streamed.get((data["column"], data["row"]), "") + data["text"]
        )
    for c, col in enumerate(result["columns"]):
        assert streamed.get((c, 0), "") == col["results"][0]["completion"]


def test_failure_mid_generation_restores_weights(client, monkeypatch):
    import app.amplification_lens.jobs as jobs

    before = base_digests(client)
    real = jobs.run_events

    def failing(job, events, n, usage, on_event):
        next(events)
        assert client.app.state.amplifier.model is not None
        raise RuntimeError("injected failure mid-generation")

    monkeypatch.setattr(jobs, "run_events", failing)
    with pytest.raises(RuntimeError, match="injected"):  # TestClient re-raises what became a 500
        client.post(
            "/amplification/generate",
            json={"prompt": "Hello world", "configs": [config(weight=5.0)], "max_new_tokens": 6},
        )
    monkeypatch.setattr(jobs, "run_events", real)
    assert base_digests(client) == before
    assert (
        client.post(
            "/amplification/generate",
            json={"prompt": "Hello world", "configs": ["tiny"], "max_new_tokens": 3},
        ).status_code
        == 200
    )


def test_cancelled_stream_restores_weights(client):
    before = base_digests(client)
    body = {
        "prompts": ["Hello world"] * 4,
        "configs": [config(weight=4.0)],
        "stream": True,
        "max_new_tokens": 60,
        "stop": [],
    }
    with client.stream("POST", "/amplification/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data"):
                break  # leave after the first token: the client goes away
    engine = client.app.state.engine
    deadline = time.monotonic() + 30
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert base_digests(client) == before


def test_concurrent_amplification_does_not_leak_into_generate(client):
    body = {"prompt": "What should I do?", "do_sample": False, "max_new_tokens": 10}
    alone = [client.post("/generate", json=body).json() for _ in range(3)]
    stop = threading.Event()
    errors = []

    def hammer():
        while not stop.is_set():
            r = client.post(
                "/amplification/generate",
                json={"prompt": "Hello", "configs": [config(weight=8.0)], "max_new_tokens": 4},
            )
            if r.status_code not in (200, 429):
                errors.append(r.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        during = [client.post("/generate", json=body) for _ in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    ok = [r.json() for r in during if r.status_code == 200]
    assert ok and all(x == alone[0] for x in ok + alone)


def test_overflowing_amplification_is_422_and_weights_restored(client):
    """A huge (finite) weight is refused at the config (|weight| <= 1000), never a 500, and the base
    weights stay bit-exact. Merges that overflow anyway: test_review_bounds.py."""
    before = base_digests(client)
    body = {"prompt": "Hello", "configs": [config(weight=1e38)], "max_new_tokens": 2, "temperature": 1.0}
    r = client.post("/amplification/generate", json=body)
    assert r.status_code == 422 and "weight: must be in [-1000, 1000]" in r.json()["error"]["message"], r.text
    assert base_digests(client) == before
    r = client.post("/generate_lda", json={"prompt": "Hello", "alpha": 1001, "max_new_tokens": 2})
    assert r.status_code == 422 and "alpha" in r.json()["error"]["message"], r.text


# --- one table per adapter, toolkit number spellings ----------------------------------------------


def two_entries(adapter="tiny", name="twice"):
    """`adapter` in two entries: layer 0 at 2 everywhere, layer 1 with mlp at 3."""
    first, second = (
        config(adapter=adapter, layers=0),
        config(adapter=adapter, layers=1, modules="mlp", weight=3),
    )
    return {"name": name, "adapters": first["adapters"] + second["adapters"]}


def test_same_adapter_in_several_entries_is_applied_once(setup):
    """The toolkit merges the entries of one adapter into one table; the compiled yaml shows that table."""
    client, data, _ = setup
    r = client.post("/amplification/compile", json={"config": two_entries()})
    assert r.status_code == 200, r.text
    (adapter,) = r.json()["adapters"]
    expected = [{"attention": 2.0, "mlp": 2.0}, {"attention": 1.0, "mlp": 3.0}]
    assert adapter["adapter"] == "tiny" and adapter["layers"] == expected and adapter["entries"] == [0, 1]
    r = client.post("/v1/compile_and_load_amplification", json={"config": two_entries()})
    assert r.status_code == 200, r.text
    from pathlib import Path

    import yaml

    written = yaml.safe_load((Path(r.json()["lora_path"]) / "amplification_config.yaml").read_text())
    assert written["resolved_config"] == {"tiny": expected}
    assert len(written["adapters"]) == 2  # the config as given: its hash is the lora_name's
    # Applied once: the same completions as one entry listing both layer settings.
    one = config(layers=0, name="once")
    one["adapters"][0]["layer_amplifications"].append(
        {"layers": 1, "module_amplifications": [{"modules": "mlp", "weight": 3}]}
    )
    body = {"prompt": "Hello world", "configs": [two_entries(), one], "temperature": 0, "max_new_tokens": 8}
    cols = client.post("/amplification/generate", json=body).json()["columns"]
    assert cols[0]["results"][0]["completion"] == cols[1]["results"][0]["completion"]
    amp = client.app.state.amplifier
    plan = amp.plan(amp.lookup(r.json()["lora_name"]))
    assert plan and all(len(terms) == 1 for terms in plan.values())


def test_entries_are_grouped_by_the_adapter_they_resolve_to(setup):
    """The same path twice is one adapter (one `ref_` registration, one table); two adapters add up."""
    client, data, _ = setup
    path = str(data / "adapters" / "other")
    body = two_entries(adapter=path)
    r = client.post("/amplification/compile", json={"config": body})
    assert r.status_code == 200 and len(r.json()["adapters"]) == 1, r.text
    # Two different adapters still add up: one table each.
    body["adapters"][1]["variant"] = "tiny"
    assert len(client.post("/amplification/compile", json={"config": body}).json()["adapters"]) == 2


@pytest.mark.parametrize(
    "layers, status",
    [
        ({"type": "range", "start": 0.0, "end": 1.0}, 200),
        ([0.0, 1.0], 200),
        (1.0, 200),
        ({"type": "range", "start": 0.0, "end": 1.5}, 422),
        ({"type": "range", "start": -1.0, "end": 1.0}, 422),
        ({"type": "range", "start": 1.0, "end": 0.0}, 422),
        (-1.0, 422),
    ],
)
def test_absolute_whole_number_floats_are_layers(client, layers, status):
    r = client.post("/amplification/compile", json={"config": config(layers=layers)})
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["adapters"][0]["layers"][1]["mlp"] == 2.0


# --- state that outlives requests -----------------------------------------------------------------


def test_deleting_an_adapter_drops_what_uses_it(setup):
    import gc
    import weakref
    from pathlib import Path

    client, data, _ = setup
    r = client.post("/adapters", json={"name": "doomed", "source": str(data / "adapters" / "other")})
    assert r.status_code == 201, r.text
    written = client.post(
        "/v1/compile_and_load_amplification", json={"config": config(adapter="doomed", name="w")}
    )
    cached = client.post(
        "/amplification/compile", json={"config": config(adapter="doomed", name="c", weight=3)}
    )
    assert written.status_code == 200 and cached.status_code == 200
    names = [written.json()["lora_name"], cached.json()["lora_name"]]
    gen = {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}
    assert client.post("/amplification/generate", json={**gen, "configs": names}).status_code == 200
    alive = weakref.ref(client.app.state.amplifier.registry.get("doomed"))

    assert client.delete("/adapters/doomed").json() == {"deleted": "doomed"}
    for name in names:
        r = client.post("/amplification/generate", json={**gen, "configs": [name]})
        assert r.status_code == 422 and f"{name!r} is neither" in r.json()["error"]["message"], r.text
        r = client.post("/generate_lda", json={**gen, "amplification": name})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("amplification: "), r.text
    assert not Path(written.json()["lora_path"]).exists()
    r = client.post("/amplification/compile", json={"config": config(adapter="doomed")})
    assert r.status_code == 422 and "adapters[0].variant" in r.json()["error"]["message"]
    gc.collect()
    assert alive() is None  # its tensors are freed


def test_cache_limits_are_in_info(client):
    limits = client.get("/info").json()["limits"]
    assert limits["max_compiled_configs"] == 256 and limits["max_reference_adapters"] == 8
    assert limits["max_adapters"] == 64 and limits["max_adapter_bytes"] == 2 * 1024**3
    assert limits["allow_hub_adapters"] is False and limits["max_weightdiff_jobs"] == 256


def amplifier(pair, tiny_dirs, tmp_path, tokenizer, **limits):
    from tests.test_api import make_settings

    from app.amplification_lens.amplifier import Amplifier

    make_adapter(tokenizer, tmp_path / "adapters" / "tiny", seed=3)
    make_adapter(tokenizer, tmp_path / "adapters" / "other", seed=4)
    amp = Amplifier(pair, make_settings(tiny_dirs, tmp_path, **limits))
    amp.load_adapter("tiny", str(tmp_path / "adapters" / "tiny"))
    return amp


def test_a_thousand_inline_configs_keep_the_caches_bounded(pair, tiny_dirs, tmp_path, tokenizer):
    """Every inline config is compiled and cached, and a config naming an adapter by path registers a
    `ref_` adapter: both are LRU caches (MAX_COMPILED_CONFIGS, MAX_REFERENCE_ADAPTERS)."""
    import gc
    import tracemalloc

    from amplification import LoadedAdapter

    amp = amplifier(pair, tiny_dirs, tmp_path, tokenizer, max_compiled_configs=32, max_reference_adapters=4)
    folder = str(tmp_path / "adapters")

    def body(i):  # all distinct; every 10th names the adapter by a new path spelling (a new ref_ adapter)
        ref = "tiny" if i % 10 else folder + "/." * (i // 10 + 1) + "/tiny"
        return config(weight=1 + i / 1000, adapter=ref, name=f"c{i}")

    def heap():  # Python heap in use, less safetensors' own ~0.5 KB per load_file call (its leak, not ours)
        gc.collect()
        traces = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, "*/safetensors/*")])
        return sum(stat.size for stat in traces.statistics("filename"))

    tracemalloc.start()
    for i in range(1000):
        amp.lookup(body(i))
        if i == 299:
            mid = heap()
    end = heap()
    tracemalloc.stop()
    gc.collect()
    refs = [a for a in amp.registry.list() if a.name.startswith("ref_")]
    alive = sum(isinstance(o, LoadedAdapter) and o.source.startswith(folder) for o in gc.get_objects())
    print(
        f"\ncompiled={len(amp.compiled)} registry={len(amp.registry.list())} ref_adapters={len(refs)} "
        f"adapters_alive={alive} heap_growth_300_to_1000={end - mid} "
        f"adapter_bytes={sum(a.nbytes for a in amp.registry.list())}"
    )
    assert len(amp.compiled) == 32 and len(refs) == 4 and len(amp.registry.list()) == 5
    assert alive == 5  # evicted adapters are freed, not just unregistered
    assert end - mid < 50_000  # 700 more configs, 70 more adapters loaded: flat once the caches are full
    assert all(a in amp.registry.list() for c in amp.compiled.values() for a in c.adapters)


def test_evicted_lora_names_recompile_from_their_folder(pair, tiny_dirs, tmp_path, tokenizer):
    amp = amplifier(pair, tiny_dirs, tmp_path, tokenizer, max_compiled_configs=2)
    written = amp.compile(amp.config_from_dict(config(weight=3, name="kept")))
    amp.write_compiled(written)
    cached = amp.compile(amp.config_from_dict(config(weight=4, name="lost")))
    for w in (5, 6):
        amp.compile(amp.config_from_dict(config(weight=w)))
    assert written.lora_name not in amp.compiled and cached.lora_name not in amp.compiled
    again = amp.lookup(written.lora_name)  # the toolkit's name still works: recompiled from the yaml
    assert again.lora_name == written.lora_name and again.tables == written.tables
    with pytest.raises(ValueError, match="MAX_COMPILED_CONFIGS") as e:
        amp.lookup(cached.lora_name)
    assert e.value.path == ""
    for bad in ("../adapters/tiny", "..", "/etc"):
        with pytest.raises(ValueError, match="neither a compiled lora_name"):
            amp.lookup(bad)
    # Replacing an adapter drops the compiled configs that used the old one; the name follows the new one.
    amp.load_adapter("tiny", str(tmp_path / "adapters" / "other"), replace=True)
    assert amp.lookup(written.lora_name).adapters == (amp.registry.get("tiny"),)


def test_too_many_adapters_by_path_in_one_config_is_422(pair, tiny_dirs, tmp_path, tokenizer):
    amp = amplifier(pair, tiny_dirs, tmp_path, tokenizer, max_reference_adapters=1)
    body = two_entries(adapter=str(tmp_path / "adapters" / "tiny"))
    assert len(amp.lookup(body).adapters) == 1  # one adapter, twice: fits
    body["adapters"][1]["variant"] = str(tmp_path / "adapters" / "other")
    with pytest.raises(ValueError, match=r"^adapters: .*MAX_REFERENCE_ADAPTERS"):
        amp.lookup(body)
