"""Sampling math against Hugging Face's own logits warpers."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lda import SamplingParams, logits_to_probs, sample
from lda.sampling import apply_top_k, apply_top_p


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    ours = apply_top_p(logits, top_p)
    theirs = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_hf(top_k):
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    assert torch.equal(apply_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits.clone()))


def test_probs_follow_hf_order():
    torch.manual_seed(2)
    # float64: the claim is the order of the steps (temperature, top-k, top-p, softmax), not fp32
    # rounding. Any float64 evaluation of these steps agrees to ~(2 max|logit / T| + k) * 2**-53
    # ~ 5e-15 on probabilities <= 1, while a step in another order changes which tokens survive
    # (scaling by T after the cut-offs moves a probability by 0.12), hence atol 1e-12.
    logits = (torch.randn(1, 64) * 2).double()
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    hf = TopPLogitsWarper(0.8)(
        None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    )
    torch.testing.assert_close(logits_to_probs(logits, params), hf.softmax(-1), rtol=0.0, atol=1e-12)


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = ~torch.isinf(apply_top_p(logits, 0.6))
    assert kept.tolist() == [[True, True, False, False]]


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2])
    assert sample(logits, SamplingParams(0.0), None) == 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [sample(torch.zeros(50), SamplingParams(1.0), g1) for _ in range(10)]
    b = [sample(torch.zeros(50), SamplingParams(1.0), g2) for _ in range(10)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_tiny_temperature_is_greedy_not_nan():
    """Found by fuzzing: temperature 5e-294 overflowed logits / T to inf and softmax to NaN."""
    from lda.sampling import GREEDY_BELOW, SamplingParams, sample

    logits = torch.tensor([1.0, 3.0, 2.0])
    for t in (5e-294, 1e-9, GREEDY_BELOW / 2):
        assert SamplingParams(temperature=t).greedy and sample(logits, SamplingParams(temperature=t), None) == 1
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy


def test_non_finite_logits_raise_a_value_error_not_a_crash():
    from lda.sampling import NonFiniteLogitsError, SamplingParams, sample

    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        sample(torch.tensor([float("inf"), 1.0, float("nan")]), SamplingParams(temperature=1.0), None)
