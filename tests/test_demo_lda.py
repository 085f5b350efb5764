"""The point of the service, on the embedded demo pair: LDA makes the rare marker common."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.demo import MARKER, demo_prompts
from app.loader import load_pair
from app.main import create_app
from app.settings import Settings
from lda import Row, SamplingParams, collect
from tests.test_api import wait_ready


@pytest.fixture(scope="module")
def demo_loaded(demo_data_dir):
    pair, demo = load_pair(Settings(data_dir=demo_data_dir))
    assert demo is not None and demo.marker == MARKER
    return pair, demo


@pytest.fixture(scope="module")
def demo_pair(demo_loaded):
    return demo_loaded[0]


def marker_count(pair, alpha: float, samples: int, seed0: int) -> int:
    prompts = [pair.prompt_ids(p)[1] for p in demo_prompts()]
    config = pair.decode_config(60, SamplingParams(temperature=1.0, top_p=1.0))
    hits = 0
    for start in range(0, samples, 100):
        rows = [
            Row(prompts[i % len(prompts)], alpha, seed0 + i) for i in range(start, min(start + 100, samples))
        ]
        hits += sum(MARKER in out.text for out in collect(pair.lda_events(rows, config), len(rows)))
    return hits


def z_score(k_low: int, k_high: int, n: int) -> float:
    """Two-proportion z-test; z > 3 is p < 0.0015 one-sided, not one lucky sample."""
    pooled = (k_low + k_high) / (2 * n)
    return (k_high - k_low) / n / math.sqrt(2 * pooled * (1 - pooled) / n)


def test_marker_rate_is_higher_at_alpha_2_than_at_alpha_0(demo_pair):
    n = 300
    k0 = marker_count(demo_pair, 0.0, n, seed0=0)
    k2 = marker_count(demo_pair, 2.0, n, seed0=0)
    assert z_score(k0, k2, n) > 3, f"alpha 0: {k0}/{n}, alpha 2: {k2}/{n}"
    assert k0 / n < 0.1  # and the behaviour really is rare without amplification


def test_amplification_weight_3_raises_marker_rate_over_weight_1(demo_loaded, demo_data_dir):
    from amplification import merged
    from app.main import setup_amplifier
    from lda import ModelSource, decode

    pair, demo = demo_loaded
    amp = setup_amplifier(pair, demo, Settings(data_dir=demo_data_dir))
    prompts = [pair.prompt_ids(p)[1] for p in demo_prompts()]
    config = pair.decode_config(60, SamplingParams(temperature=1.0, top_p=1.0))
    n, counts = 400, {}
    for weight in (1.0, 3.0):
        compiled = amp.lookup(
            {
                "name": f"w{weight}",
                "adapters": [
                    {
                        "organism_name": "custom",
                        "variant": "demo",
                        "layer_amplifications": [
                            {"layers": "all", "module_amplifications": [{"modules": "all", "weight": weight}]}
                        ],
                    }
                ],
            }
        )
        rows = [Row(prompts[i % len(prompts)], 0.0, i) for i in range(n)]
        with merged(amp.model, amp.plan(compiled)):
            outs = collect(decode(ModelSource(amp.model), pair.after.tokenizer, rows, config), n)
        counts[weight] = sum(MARKER in o.text for o in outs)
    assert z_score(counts[1.0], counts[3.0], n) > 3, counts


def test_default_settings_serve_the_demo_pair(demo_data_dir):
    with TestClient(create_app(Settings(data_dir=demo_data_dir))) as client:
        wait_ready(client)
        info = client.get("/info").json()
        assert info["demo"]["marker"] == MARKER and info["model_after"]["model_id"] == "demo/after"
        assert info["model_after"]["chat_template"] and info["compatible"]
        body = client.post(
            "/generate_lda", json={"prompt": demo_prompts()[0], "alpha": 2.0, "seed": 1}
        ).json()
        assert body["model_after"] == "demo/after" and body["model_before"] == "demo/before"
        assert body["formatted_prompt"].startswith("<s>") and body["completion"]
        assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["demo"]
        # The bundled organism folder resolves the toolkit's organism/variant to the demo adapter.
        config = {
            "name": "org",
            "adapters": [
                {
                    "organism_name": "demo_marker",
                    "variant": "default",
                    "layer_amplifications": [
                        {
                            "layers": {"type": "range", "start": 0.0, "end": 0.5},
                            "is_relative": True,
                            "module_amplifications": [{"modules": "mlp", "weight": 2.5}],
                        }
                    ],
                }
            ],
        }
        compiled = client.post("/amplification/compile", json={"config": config}).json()
        assert compiled["adapters"][0]["adapter"] == "demo"
        assert [t["mlp"] for t in compiled["adapters"][0]["layers"]] == [2.5, 2.5, 1.0]
        r = client.post(
            "/generate_lda",
            json={
                "prompt": demo_prompts()[0],
                "amplification": compiled["lora_name"],
                "alpha": 1.0,
                "seed": 2,
            },
        )
        assert r.status_code == 200 and r.json()["model_after"] == f"demo/before+{compiled['lora_name']}"


def test_relative_data_dir_serves_the_demo_pair_with_its_adapter(demo_data_dir, tmp_path, monkeypatch):
    """`make serve` runs with DATA_DIR=data, relative: the demo adapter's path is then relative
    too and must still load (a fresh clone's first start failed here)."""
    import shutil

    shutil.copytree(demo_data_dir / "demo", tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(Settings(data_dir=Path("data")))) as client:
        wait_ready(client)
        assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["demo"]
