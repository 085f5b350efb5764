"""On CUDA, in bf16: the decode, merge and training equivalences, and a real CUDA OOM over HTTP.

Marked `gpu` and skipped without CUDA; `make gpu-check` runs them (`pytest -m gpu tests/test_gpu.py`)
and puts what each test measured (`record_property`) into its JSON report. The CPU suite checks the
same properties in fp32; here the kernels are cuBLAS/SDPA ones whose reduction order changes with the
batch shape, which is what these tests are for.
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

import amplification.merge as merge_module
from amplification.merge import apply, is_merged, merged, plan_deltas, restore
from amplification.registry import AdapterRegistry
from lda import DecodeConfig, LDAModelPair, Row, SamplingParams, Side, collect
from tests.test_amplification_merge import digests, make_adapter, table
from tests.test_weightdiff import CHAT, TEXTS
from tests.tiny import save, tiny_llama
from weightdiff import Task, TrainConfig, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

CUDA = torch.device("cuda")
GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hello world", "What should I do if I feel bored today?", "A"]


@pytest.fixture(scope="module")
def gpu_pair(after_model, before_model, tokenizer):
    """The session's tiny pair, copied to the GPU in bf16 (the CPU originals stay untouched)."""
    after = copy.deepcopy(after_model).to(CUDA, torch.bfloat16)
    before = copy.deepcopy(before_model).to(CUDA, torch.bfloat16)
    return LDAModelPair(Side("gpu/after", after, tokenizer), Side("gpu/before", before, tokenizer))


@pytest.fixture
def highest_fp32_precision():
    """No TF32: fp32 on CUDA should mean fp32 for the fp32 tolerance below."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def prompt_ids(pair: LDAModelPair, prompt: str) -> tuple[int, ...]:
    return pair.prompt_ids(prompt)[1]


def run(pair, rows, max_new=16, sampling=GREEDY, eos=None, details=False):
    eos = frozenset(pair.eos_ids if eos is None else eos)
    config = DecodeConfig(max_new, sampling, eos, (), details, pair.after.pad_id)
    return collect(pair.lda_events(rows, config), len(rows))


def hf_greedy(model, prompt, steps, eos_id):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device=CUDA),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=0,
        )
    new = out[0, len(prompt) :].tolist()
    return new[:-1] if new and new[-1] == eos_id else new


# --- (a) LDA: alpha 0 is the after model; a batched row is the row alone ------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_zero_is_the_after_model_alone_bf16(gpu_pair, prompt, record_property):
    p = prompt_ids(gpu_pair, prompt)
    eos = gpu_pair.after.tokenizer.eos_token_id
    zero = run(gpu_pair, [Row(p, 0.0)], max_new=20, details=True)[0]
    minus_one = run(gpu_pair, [Row(p, -1.0)], max_new=20)[0]
    record_property("tokens", len(zero.token_ids))
    assert zero.token_ids == hf_greedy(gpu_pair.after.model, p, 20, eos)
    assert minus_one.token_ids == hf_greedy(gpu_pair.before.model, p, 20, eos)
    # logit_diff is exact at alpha 0, on the GPU too: the amplified distribution is the after one.
    assert all(lp.amplified == lp.after for lp in zero.logprobs)
    assert zero.token_ids != minus_one.token_ids  # the two models really differ


@pytest.mark.parametrize(
    "sampling", [GREEDY, SamplingParams(1.0, top_k=50, top_p=0.9)], ids=["greedy", "sampled"]
)
def test_each_row_of_a_batch_equals_the_row_alone_bf16(gpu_pair, sampling, record_property):
    rows = [
        Row(prompt_ids(gpu_pair, PROMPTS[0]), 0.0, seed=1),
        Row(prompt_ids(gpu_pair, PROMPTS[1]), 1.5, seed=2),
        Row(prompt_ids(gpu_pair, PROMPTS[2]), -0.5, seed=3),
        Row(prompt_ids(gpu_pair, PROMPTS[1]), 4.0, seed=4),
    ]
    # A frequent token as an extra EOS makes rows finish at different steps (rows get dropped).
    first = [run(gpu_pair, [r], sampling=sampling)[0] for r in rows]
    eos = set(gpu_pair.eos_ids) | {first[1].token_ids[3]}
    alone = [run(gpu_pair, [r], sampling=sampling, eos=eos, details=True)[0] for r in rows]
    batched = run(gpu_pair, rows, sampling=sampling, eos=eos, details=True)
    # How far bf16 batching moves the after model's logprobs, up to a row's first differing token.
    drift = max(
        (
            abs(x.after - y.after)
            for b, a in zip(batched, alone, strict=True)
            for x, y in itertools.takewhile(
                lambda xy: xy[0].token_id == xy[1].token_id, zip(b.logprobs, a.logprobs, strict=False)
            )
        ),
        default=0.0,
    )
    record_property("max_after_logprob_diff_batched_vs_alone", drift)
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.finish_reason for o in batched] == [o.finish_reason for o in alone]
    assert len({len(o.token_ids) for o in batched}) > 1  # rows really finished at different times


# --- (b) amplified merges: bf16 on CUDA, restored bit for bit from pinned host copies -----------


@pytest.fixture(scope="module")
def adapter_dir(tokenizer, tmp_path_factory):
    return make_adapter(tokenizer, tmp_path_factory.mktemp("gpu-adapters") / "one", seed=1)


def gpu_base(tokenizer):
    return tiny_llama(tokenizer, seed=11).to(CUDA, torch.bfloat16)


def load_adapter(adapter_dir, model):
    return AdapterRegistry([adapter_dir.parent], hub_enabled=False).load("one", adapter_dir, model)


def test_merge_restore_is_bit_exact_in_bf16_on_cuda(tokenizer, adapter_dir, record_property):
    model = gpu_base(tokenizer)
    adapter = load_adapter(adapter_dir, model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = random.Random(0)
    choices = [0.0, 1.0, -1.0, 0.5, -3.7, 1e3, -1e4, 1e-3]
    changed = 0
    for _ in range(50):
        weights = table(
            *(rng.choice(choices) if rng.random() < 0.5 else rng.uniform(-50, 50) for _ in range(4))
        )
        state = apply(model, plan_deltas(model, [(adapter, weights)]))
        changed += any(not torch.equal(p, originals[n]) for n, p in model.named_parameters())
        restore(state)
        assert not is_merged(model)
    assert changed > 40
    assert all(torch.equal(p, originals[n]) for n, p in model.named_parameters())
    # The originals were kept in pinned host memory (the GPU holds only the live weights).
    copies = merge_module._BUFFERS[model].copies
    assert copies and all(c.device.type == "cpu" and c.is_pinned() for c in copies.values())
    record_property("pinned_copy_bytes", sum(c.numel() * c.element_size() for c in copies.values()))

    # The merged weight is the fp32 sum rounded to bf16 once.
    plan = plan_deltas(model, [(adapter, table(2.5, -0.75, 1.0, 7.0))])
    modules = dict(model.named_modules())
    with merged(model, plan):
        for name, [(a, b, coefficient)] in plan.items():
            expected = originals[f"{name}.weight"].float() + coefficient * (b.to(CUDA) @ a.to(CUDA))
            torch.testing.assert_close(modules[name].weight, expected.to(torch.bfloat16))
    assert all(torch.equal(p, originals[n]) for n, p in model.named_parameters())


def test_failure_midway_through_a_cuda_merge_restores(tokenizer, adapter_dir, monkeypatch):
    model = gpu_base(tokenizer)
    adapter = load_adapter(adapter_dir, model)
    original = digests(model)
    calls = []
    real_delta = merge_module._delta

    def failing_delta(terms, out):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_delta(terms, out)

    monkeypatch.setattr(merge_module, "_delta", failing_delta)
    with pytest.raises(torch.OutOfMemoryError):
        apply(model, plan_deltas(model, [(adapter, table(1.0, 1.0, 1.0, 1.0))]))
    assert digests(model) == original and not is_merged(model)


# --- (c) weight diffs: T tasks together == each alone, on CUDA -----------------------------------



def relative_error(together, alone, init):
    """||together - alone|| / ||alone - init|| over all factors: batching noise vs what training moved."""
    noise = moved = 0.0
    for name in alone:
        for kind in ("down", "up"):
            a, t, i = (getattr(f[name], kind).double() for f in (alone, together, init))
            noise += (t - a).pow(2).sum().item()
            moved += (a - i).pow(2).sum().item()
    return (noise / moved) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tasks_together_equal_each_alone_on_cuda(tokenizer, dtype, highest_fp32_precision, record_property):
    model = tiny_llama(tokenizer, seed=11).to(CUDA, dtype)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    tasks = [
        Task([TEXTS[0], CHAT, TEXTS[2]], seed=3),
        Task([TEXTS[1]], seed=4),
        Task([TEXTS[3], TEXTS[4]], seed=5),
    ]
    config = TrainConfig(r=2, lr=1e-2, epochs=2)
    together = train(model, tokenizer, tasks, config)
    init = train(model, tokenizer, tasks, TrainConfig(r=2, lr=1e-12, epochs=1)).factors  # ~the init
    errors, loss_diffs = [], []
    for t, task in enumerate(tasks):
        alone = train(model, tokenizer, [task], config)
        errors.append(relative_error(together.factors[t], alone.factors[0], init[t]))
        loss_diffs.append(max(abs(x - y) for x, y in zip(together.losses[t], alone.losses[0], strict=True)))
        if dtype == torch.float32:
            for name, f in alone.factors[0].items():
                torch.testing.assert_close(together.factors[t][name].down, f.down, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(together.factors[t][name].up, f.up, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(together.losses[t], alone.losses[0], rtol=1e-4, atol=1e-5)
    record_property("factor_relative_error_max", max(errors))
    record_property("loss_abs_diff_max", max(loss_diffs))
    # bf16: the base's activations round differently with the batch shape, and Adam's first steps
    # move an entry by ~lr whatever its gradient's size (4% on CPU in bf16), so require the noise to
    # be small against what training moved; a task reading another's factors would be of its order.
    assert max(errors) < 0.25, errors
    assert max(loss_diffs) < 0.05, loss_diffs
    assert all(torch.equal(p, base[n]) for n, p in model.state_dict().items())  # base untouched


# --- (d) a real CUDA OOM during generation: 503, weights unchanged, the next request fine --------

OOM_MODEL = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
HEADROOM = 128 * 2**20  # what the capped allocator may add to what it holds: ~250 steps of 64 rows' KV


@pytest.fixture(scope="module")
def oom_client(tokenizer, tmp_path_factory):
    """The real app on a CUDA bf16 pair whose EOS logit is 0, so greedy rows never stop early."""
    # Imported here: where the server's packages are missing (a GPU image without the wheels), the
    # other GPU tests still run and this one says why it did not.
    pytest.importorskip("fastapi", reason="fastapi missing: carry the wheels (make gpu-wheels)")
    pytest.importorskip("pydantic_settings", reason="pydantic-settings missing: carry the wheels")
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from tests.test_api import wait_ready

    root = tmp_path_factory.mktemp("oom")
    for name, seed in (("after", 21), ("before", 22)):
        model = tiny_llama(tokenizer, seed, **OOM_MODEL)
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0
        save(model, tokenizer, root / name)
    settings = Settings(
        model_after_id=str(root / "after"),
        model_before_id=str(root / "before"),
        data_dir=root / "data",
        device="cuda",
        dtype="bf16",
        max_new_tokens_limit=4000,
        max_rows_per_request=64,
        queue_size=4,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def test_real_cuda_oom_fails_only_that_request(oom_client, record_property):
    pair = oom_client.app.state.pair
    assert pair.after.model.device.type == "cuda" and pair.after.model.dtype == torch.bfloat16
    small = {"prompt": "Hello world", "max_new_tokens": 8, "do_sample": False}
    assert oom_client.post("/generate_lda", json=small).status_code == 200
    before, after = digests(pair.before.model), digests(pair.after.model)
    # 64 rows x 4000 tokens of KV cache for two models (4 layers x K, V x 256 x 2 bytes a token each:
    # ~2 GiB) cannot fit in HEADROOM.
    huge = {"prompt": "Hello world", "n": 64, "max_new_tokens": 4000, "do_sample": False, "alpha": 1.0}
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    held = torch.cuda.memory_reserved(CUDA)
    # An index, not torch.device("cuda"): torch 2.11 refuses a device without one here.
    index = torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction((held + HEADROOM) / total, index)
    try:
        r = oom_client.post("/generate_lda", json=huge)
        record_property("oom_status", r.status_code)
        record_property("oom_message", r.text[:300])
        record_property("allocated_after_oom_bytes", torch.cuda.memory_allocated(CUDA))
        record_property("allocated_before_bytes", held)
        assert r.status_code == 503 and r.json()["error"]["type"] == "out_of_memory", r.text[:500]
        assert digests(pair.before.model) == before
        assert digests(pair.after.model) == after
        again = oom_client.post("/generate_lda", json=small)  # under the same cap
        assert again.status_code == 200, again.text[:500]
        assert again.json()["tokens_generated"] == 8
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    assert oom_client.get("/ready").status_code == 200
