"""The activation difference lens and steering.

Library checks against independent computations: the streamed means equal means of the
`output_hidden_states` a plain forward returns, the logit lens of the last block's output is the
model's own next-token distribution, the patchscope of a prompt's own hidden state changes nothing,
and steering at strength 0 is the unsteered model bit for bit. Then the demo pair through HTTP:
ADL's lens of δ names the marker and steering with δ raises the marker rate, a random direction of
the same norm much less.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from fastapi.testclient import TestClient

from lda import LDAModelPair, Row
from lda.blocks import final_norm
from lda.decode import collect, decode
from lda.diffing.adl import SCALES, ADLConfig, ADLPass, logit_lens, patchscope
from lda.diffing.inputs import Sample
from lda.pair import Side
from lda.sampling import SamplingParams
from lda.source import ModelSource
from lda.steering import SteeredSource
from tests.test_api import wait_ready
from tests.test_diffing_api import wait_job
from tests.test_experiments_api import wait_status
from tests.tiny import tiny_llama

from app.demo import MARKER, demo_prompts
from app.demo.build import demo_texts
from app.main import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def models(tokenizer):
    after = tiny_llama(tokenizer, 1, num_hidden_layers=3).eval()
    before = tiny_llama(tokenizer, 2, num_hidden_layers=3).eval()
    return after, before


@pytest.fixture(scope="module")
def tiny_pair(models, tokenizer):
    after, before = models
    return LDAModelPair(Side("after", after, tokenizer), Side("before", before, tokenizer))


def _samples(n: int, length: int, vocab: int, seed: int, lengths: list[int] | None = None) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = tuple(torch.randint(3, vocab, (length,), generator=g).tolist())
        count = lengths[i] if lengths else length
        out.append(Sample(i, ids, tuple(range(count))))
    return out


def test_streamed_means_equal_the_hidden_states_of_a_plain_forward(tiny_pair, models):
    """Batches of 3 vs all samples at once; blocks 0 and 1 read from `output_hidden_states`."""
    after, before = models
    vocab = after.config.vocab_size
    samples = _samples(7, 9, vocab, seed=0, lengths=[9, 9, 6, 9, 8, 9, 9])
    adl = ADLPass(tiny_pair, ADLConfig(layers=(0, 1), labels=tuple(range(9)), patchscope_labels=()), vocab)
    for start in range(0, 7, 3):
        adl.add(samples[start : start + 3])
    ids = torch.tensor([s.ids for s in samples])
    with torch.no_grad():
        h_after = after(input_ids=ids, output_hidden_states=True).hidden_states
        h_before = before(input_ids=ids, output_hidden_states=True).hidden_states
    valid = torch.tensor([[p < len(s.positions) for p in range(9)] for s in samples])
    for layer in (0, 1):
        a, b = h_after[layer + 1].double(), h_before[layer + 1].double()
        w = valid.unsqueeze(-1).double()
        mean_a, mean_b = (a * w).sum(0) / w.sum(0), (b * w).sum(0) / w.sum(0)
        got = adl.vectors(layer)
        torch.testing.assert_close(got["mean_after"], mean_a.float())
        torch.testing.assert_close(got["mean_before"], mean_b.float())
        torch.testing.assert_close(got["delta"], (mean_a - mean_b).float())
        # Mean norm over samples and positions >= 5 (the toolkit skips the first five).
        norms = h_after[layer + 1].float().norm(dim=-1)[:, 5:][valid[:, 5:]]
        assert got["norm_after"] == pytest.approx(float(norms.double().mean()), rel=1e-6)
    assert adl.vectors(0)["counts"].tolist() == valid.sum(0).tolist()


def test_logit_lens_of_the_last_block_is_the_models_own_distribution(models):
    after, _ = models
    ids = torch.tensor([[5, 9, 17, 33, 8]])
    with torch.no_grad():
        out = after(input_ids=ids, output_hidden_states=True)
        h = final_norm(after)  # the last entry of hidden_states is already normed: undo by capture
    from lda.blocks import capture

    with capture(after, [2]) as seen, torch.no_grad():
        after(input_ids=ids)
    plus, minus = logit_lens(seen[2][0, -1], after)
    torch.testing.assert_close(plus, out.logits[0, -1].softmax(-1))
    with torch.no_grad():
        expected_minus = after.get_output_embeddings()(-h(seen[2][0, -1])).softmax(-1)
    torch.testing.assert_close(minus, expected_minus)


def test_patchscope_of_a_prompts_own_hidden_state_changes_nothing(models, tokenizer):
    """Scale 1 of the prompt's own last-token output at block 1 is an identity patch; the
    toolkit's aggregation over prompts then keeps only tokens in every prompt's top-k."""
    after, _ = models
    prompt = "hello -> hello\n?"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    from lda.blocks import capture

    with capture(after, [1]) as seen, torch.no_grad():
        logits = after(input_ids=ids).logits[0, -1]
    own = seen[1][0, -1]
    vocab = after.config.vocab_size
    pos, neg = patchscope(own, after, tokenizer, 1, scales=[1.0, 2.0], prompts=[prompt], top_k=vocab)
    torch.testing.assert_close(pos[0], logits.softmax(-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(neg[0], pos[0])
    # Several prompts: the toolkit's rule, written out on the single-prompt results.
    prompts, k = ["man -> man\n?", "bear -> bear\n?", prompt], 40
    singles = [patchscope(own, after, tokenizer, 1, scales=[1.5], prompts=[p], top_k=vocab)[0][0] for p in prompts]
    total, hits = torch.zeros(vocab), torch.zeros(vocab, dtype=torch.int32)
    for probs in singles:
        values, index = torch.topk(probs, k)
        total[index] += values
        hits[index] += 1
    total[hits != len(prompts)] = 0
    got = patchscope(own, after, tokenizer, 1, scales=[1.5], prompts=prompts, top_k=k)[0][0]
    torch.testing.assert_close(got, total / len(prompts), rtol=1e-5, atol=1e-7)
    assert len(SCALES) == 30 and SCALES[:3] == (0.5, 0.6, 0.7) and SCALES[-1] == 200.0


def test_steering_at_strength_zero_is_the_unsteered_model_and_otherwise_adds_the_vector(models, tokenizer):
    after, before = models
    rows = [Row((1, 5, 9, 17), 1.5, 3), Row((1, 7, 7), 0.0, 4)]
    config = tiny_decode_config()
    vocab = after.config.vocab_size
    zero = SteeredSource(after, before, vocab, 1, torch.zeros(32))
    plain = collect(decode(ModelSource(after, before, vocab), tokenizer, rows, config), 2)
    steered0 = collect(decode(zero, tokenizer, rows, config), 2)
    assert [o.token_ids for o in steered0] == [o.token_ids for o in plain]
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 5
    hooks_before = dict(after.model.layers[1]._forward_hooks)
    src = SteeredSource(after, None, vocab, 1, vector)
    ids = torch.tensor([[1, 5, 9, 17]])
    mask, pos = torch.ones_like(ids), torch.arange(4).unsqueeze(0)
    logits, _ = src.score(ids, mask, pos)

    def add(module, args, output):
        return output + vector

    handle = after.model.layers[1].register_forward_hook(add)
    try:
        with torch.no_grad():
            expected = after(input_ids=ids).logits.float()
    finally:
        handle.remove()
    assert dict(after.model.layers[1]._forward_hooks) == hooks_before
    torch.testing.assert_close(logits, expected[..., :vocab])
    assert dict(after.model.layers[1]._forward_hooks) == hooks_before  # nothing left on the shared model


def tiny_decode_config():
    from lda.decode import DecodeConfig

    return DecodeConfig(6, SamplingParams(0.0, 0, 1.0), frozenset())


# --- the demo pair through HTTP ----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(demo_data_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("adl")
    shutil.copytree(demo_data_dir / "demo", data_dir / "demo")
    with TestClient(create_app(Settings(data_dir=data_dir, max_experiment_samples=2000))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def adl_job(client):
    """ADL on 100 demo texts, 16 positions, the last block (the demo has 3) and the middle one."""
    texts = demo_texts(client.app.state.pair.after.tokenizer, 100, seed=1)
    r = client.post(
        "/diffing/jobs",
        json={"method": "adl", "texts": texts, "max_tokens_per_sample": 16, "layers": [1.0, 0.5],
              "patchscope_positions": [0], "dataset_name": "demo"},
    )  # fmt: skip
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "done", done["error"]
    return done


def test_the_lens_of_delta_names_the_marker(client, adl_job):
    layers = {entry["layer"]: entry for entry in adl_job["result"]["layers"]}
    assert set(layers) == {2, 1}  # 1.0 -> block 2; 0.5 -> int(0.5 * 2) = 1
    assert adl_job["spec"]["blocks"] == [2, 1]
    first = layers[2]["positions"][0]
    top = [t["token"].strip() for t in first["logit_lens"]["delta"]["pos"][:5]]
    print("lens of delta at position 0, block 2:", top)
    assert MARKER in top
    full = client.get(f"/diffing/jobs/{adl_job['id']}/result").json()
    scopes = full["layers"][0]["positions"][0]["patchscope"]
    assert [s["scale"] for s in scopes["delta"]] == list(SCALES)
    assert all(len(s["tokens"]) <= 20 for s in scopes["delta"])
    v = client.get(f"/diffing/jobs/{adl_job['id']}/vectors", params={"layer": "1.0", "position": 0}).json()
    assert v["layer"] == 2 and len(v["delta"]) == len(v["mean_after"]) == 96
    assert v["norm_after"] == pytest.approx(layers[2]["norm_after"])
    delta = torch.tensor(v["delta"])
    torch.testing.assert_close(delta, torch.tensor(v["mean_after"]) - torch.tensor(v["mean_before"]))
    assert client.get(f"/diffing/jobs/{adl_job['id']}/vectors", params={"layer": 0, "position": 0}).status_code == 404
    assert client.get(f"/diffing/jobs/{adl_job['id']}/token_stats").status_code == 404


def test_steering_with_delta_raises_the_marker_rate_and_a_random_direction_does_not(client, adl_job):
    """An experiment over strengths, with intervals; the control steers with a random direction of
    the same norm. Measured (64 samples per condition): delta at 0, 0.5, 1: 1, 17, 43 hits; random 2, 3."""
    steer = {"adl": adl_job["id"], "layer": 1.0, "position": 0}
    conditions = [{"alpha": 0.0, "steer": steer, "strength": s} for s in (0.0, 0.5, 1.0)]
    conditions += [{"alpha": 0.0, "steer": steer | {"random_seed": 7}, "strength": s} for s in (0.5, 1.0)]
    r = client.post(
        "/experiments",
        json={"prompts": demo_prompts(), "conditions": conditions, "n": 8, "seed": 0, "max_new_tokens": 40,
              "temperature": 1.0, "top_p": 1.0, "detectors": [{"name": "marker", "type": "substring",
              "patterns": [MARKER]}]},
    )  # fmt: skip
    assert r.status_code == 202, r.text
    done = wait_status(client, r.json()["id"], timeout=600)
    assert done["status"] == "done", done["error"]
    rows = {row["condition"]: row for row in done["summary"]}
    for label, row in rows.items():
        print(label, row["hits"], "/", row["total"], row["ci95"])
    by = [rows[next(k for k in rows if f"strength={s:g}" in k and "random" not in k)] for s in (0, 0.5, 1)]
    rand = [rows[next(k for k in rows if f"strength={s:g}" in k and "random" in k)] for s in (0.5, 1)]
    assert by[2]["ci95"][0] > by[0]["ci95"][1]  # strength 1 above strength 0, intervals apart
    assert by[2]["ci95"][0] > rand[1]["ci95"][1]  # and above the random direction at strength 1
    assert by[2]["strength"] == 1.0 and not by[2]["plain"]
    assert by[0]["hits"] <= by[1]["hits"] <= by[2]["hits"]


def test_steering_a_generation_request_and_its_errors(client, adl_job):
    body = {"prompt": "What is the sun?", "alpha": 0.0, "max_new_tokens": 12, "temperature": 0.0, "seed": 0}
    plain = client.post("/generate_lda", json=body).json()["results"][0]["completion"]
    zero = client.post("/generate_lda", json=body | {"steer": {"adl": adl_job["id"], "layer": 1.0, "position": 0,
                                                                "strength": 0.0}}).json()  # fmt: skip
    assert zero["results"][0]["completion"] == plain
    steered = client.post("/generate_lda", json=body | {"steer": {"adl": adl_job["id"], "layer": 2, "position": 0,
                                                                   "strength": 2.0}}).json()  # fmt: skip
    assert steered["results"][0]["completion"] != plain
    for steer, field in (
        ({"adl": "nope", "layer": 1.0, "position": 0}, "steer.adl"),
        ({"adl": adl_job["id"], "layer": 0, "position": 0}, "steer.layer"),
        ({"adl": adl_job["id"], "layer": 9, "position": 0}, "steer.layer"),
        ({"adl": adl_job["id"], "layer": 1.0, "position": 16}, "steer.position"),
    ):
        r = client.post("/generate_lda", json=body | {"steer": steer})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith(field), r.text
    r = client.post("/generate_lda", json=body | {"steer": {"adl": adl_job["id"], "layer": 1.0, "position": 0},
                                                  "adapter": "demo"})  # fmt: skip
    assert r.status_code == 422 and "steer" in r.text


def test_adl_bad_input_is_a_422_naming_the_field(client):
    for body, field in (
        ({"texts": ["a b c d e f g h"], "layers": [7]}, "layers[0]"),
        ({"texts": ["a b c d e f g h"], "layers": [1.5]}, "layers[0]"),
        ({"texts": ["a b"], "max_tokens_per_sample": 128}, "texts"),
        ({"texts": ["a b"], "layers": []}, "layers"),
        ({"texts": ["a b c d e f g h"], "layers": ["x"]}, "layers.0"),
        ({"texts": ["a b c d e f g h"], "max_tokens_per_sample": 4, "patchscope_positions": [4]},
         "patchscope_positions[0]"),
    ):
        r = client.post("/diffing/jobs", json={"method": "adl"} | body)
        assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
    r = client.post("/diffing/jobs", json={"method": "adl", "texts": ["a b c d e f g h"], "max_tokens_per_sample": 4})
    assert r.status_code == 202 and r.json()["id"]  # the default positions 0-5 cut to the analysed 0-3
    assert client.get(f"/diffing/jobs/{r.json()['id']}").json()["spec"]["patchscope_positions"] == [0, 1, 2, 3]


def test_the_openai_routes_take_steer_as_an_extra(client, adl_job):
    body = {"model": "after", "messages": [{"role": "user", "content": "What is a cat?"}], "max_tokens": 12,
            "temperature": 0.0, "seed": 0}  # fmt: skip
    steer = {"adl": adl_job["id"], "layer": 1.0, "position": 0}

    def text(**extra):
        r = client.post("/v1/chat/completions", json=body | extra)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    plain = text()
    assert text(steer=steer | {"strength": 0.0}) == plain
    assert text(steer=steer | {"strength": 2.0}) != plain
    assert text(model="lda@0", steer=steer | {"strength": 0.0}) == plain  # alpha 0: the after model
    r = client.post("/v1/chat/completions", json=body | {"model": "before", "steer": steer})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "steer", r.text
    r = client.post("/v1/completions", json={"model": "after", "prompt": "hi", "max_tokens": 2,
                                             "steer": steer | {"adl": "nope"}})  # fmt: skip
    assert r.status_code in (400, 422) and "steer.adl" in r.text, r.text


def test_steered_and_plain_requests_decode_side_by_side_as_alone(client, adl_job):
    """A steered request and a plain one in flight together (each in its running batch, the
    engine stepping both) answer exactly as each does alone."""
    from concurrent.futures import ThreadPoolExecutor

    base = {"prompt": "Tell me about a dog.", "alpha": 0.0, "max_new_tokens": 24, "temperature": 0.0, "seed": 3}
    steered = base | {"steer": {"adl": adl_job["id"], "layer": 1.0, "position": 0, "strength": 1.5}}
    both = {k: v for k, v in steered.items() if k != "alpha"} | {"alphas": [0.0, 2.0]}
    bodies = [steered, base, both, base | {"alpha": 1.0}]

    def text(body):
        r = client.post("/generate_lda", json=body)
        assert r.status_code == 200, r.text
        return [row["completion"] for row in r.json()["results"]]

    alone = [text(b) for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(text, bodies))
    assert together == alone
    assert alone[0] != alone[1]
