"""Adapter-mode LDA (one model, adapter off/on in one batch) against two-model LDA."""

from __future__ import annotations

import copy

import pytest

from amplification.adapter_mode import AdapterSource
from amplification.merge import merged, plan_deltas
from amplification.registry import AdapterRegistry
from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.source import ModelSource
from tests.test_amplification_merge import digests, fresh_base, make_adapter, table

PROMPTS = ["Hello world", "What should I do if I feel bored today?", "A model pair"]


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tokenizer, root / "lora", seed=5)
    base = fresh_base(tokenizer)
    adapter = AdapterRegistry([root], hub_enabled=False).load("lora", str(root / "lora"), base)
    return base, adapter


def rows(tokenizer, alphas, seed=None):
    out = []
    for i, p in enumerate(PROMPTS):
        ids = tuple(tokenizer(p)["input_ids"])
        for j, a in enumerate(alphas):
            out.append(Row(ids, a, None if seed is None else seed + 10 * i + j))
    return out


@pytest.mark.parametrize("weights", [table(1, 1, 1, 1), table(3.0, 0.5, -1.0, 2.0)])
@pytest.mark.parametrize("sampling", [SamplingParams(0.0), SamplingParams(1.0, top_k=20)])
def test_adapter_mode_equals_two_model_lda_with_the_merged_adapter(setup, tokenizer, weights, sampling):
    base, adapter = setup
    before = digests(base)
    plan = plan_deltas(base, [(adapter, weights)])
    config = DecodeConfig(12, sampling, frozenset({tokenizer.eos_token_id}), pad_id=tokenizer.pad_token_id)
    batch = rows(tokenizer, [0.0, 1.0, 4.0], seed=3)
    one_model = collect(decode(AdapterSource(base, plan), tokenizer, batch, config), len(batch))
    assert digests(base) == before  # hooks never touch the weights
    after_model = copy.deepcopy(base)
    with merged(after_model, plan):
        two_models = collect(decode(ModelSource(after_model, base), tokenizer, batch, config), len(batch))
    assert [o.token_ids for o in one_model] == [o.token_ids for o in two_models]
    assert len({tuple(o.token_ids) for o in one_model}) > 1


def test_alpha_minus_one_is_the_base_and_zero_the_adapter(setup, tokenizer):
    base, adapter = setup
    plan = plan_deltas(base, [(adapter, table(1, 1, 1, 1))])
    config = DecodeConfig(10, SamplingParams(0.0), frozenset(), pad_id=tokenizer.pad_token_id)
    batch = rows(tokenizer, [-1.0, 0.0])
    got = collect(decode(AdapterSource(base, plan), tokenizer, batch, config), len(batch))
    plain = collect(
        decode(ModelSource(base), tokenizer, [r for r in batch if r.alpha == -1.0], config), len(PROMPTS)
    )
    assert [o.token_ids for o in got[0::2]] == [o.token_ids for o in plain]
    assert [o.token_ids for o in got[1::2]] != [o.token_ids for o in plain]
