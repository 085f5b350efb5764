"""Sampling on amplified logits: the pure math of one decoding step.

Order of operations follows Hugging Face `generate`: temperature, then top-k, then top-p
(nucleus, keeping the token that crosses the threshold), then a draw from a per-row
seeded generator. Greedy decoding is temperature 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Temperatures below this sample greedily (vLLM's threshold).
GREEDY_BELOW = 1e-5


class NonFiniteLogitsError(ValueError):
    """Sampling met inf/NaN logits (a ValueError: the service answers 422, not 500)."""


NON_FINITE = "the amplified logits are not finite (inf or NaN); use a smaller alpha or amplification weight"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token from a row's logits.

    Args:
        temperature: 0 (or below GREEDY_BELOW, as vLLM) means greedy (argmax); otherwise logits
            are divided by it.
        top_k: keep the k most likely tokens (ties at the k-th value kept, as HF); 0 = off.
        top_p: nucleus mass in (0, 1]; 1.0 = off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        # Dividing by a temperature this small overflows fp32 logits to inf and softmax to NaN;
        # the distribution is a point mass on the argmax by then anyway.
        return self.temperature < GREEDY_BELOW


def logit_diff(after: torch.Tensor, before: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """`after + alpha * (after - before)` in fp32.

    Written as `(1 + alpha) * after - alpha * before`, the same quantity, because it is exact
    at the two points users compare against: alpha = 0 gives `after` bit for bit and
    alpha = -1 gives `before` bit for bit (the textbook form rounds `after - before` first).

    Args:
        after: [B, V] logits of the post-trained model.
        before: [B, V] logits of the base model, or None for single-model decoding.
        alpha: [B] amplification per row.
    """
    after = after.float()
    if before is None:
        return after
    a = alpha.to(device=after.device, dtype=torch.float32).unsqueeze(-1)  # [B, 1]
    return (1.0 + a) * after - a * before.float()


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - top_p)
    remove[..., -1] = False  # always keep the most likely token
    mask = remove.scatter(-1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, softmax. `params.temperature` must be > 0."""
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token id from one row's [V] fp32 logits."""
    if params.greedy:
        # The argmax of a row without a finite maximum (NaN, +inf, all -inf) is no answer either.
        if not bool(torch.isfinite(logits.amax())):
            raise NonFiniteLogitsError(NON_FINITE)
        return int(torch.argmax(logits).item())
    probs = logits_to_probs(logits, params)
    if not bool(torch.isfinite(probs).all()):
        # Logits overflowed: a request's extreme amplification weight or alpha, or a model that
        # produces inf in its dtype. The request is at fault or cannot be served; the server is fine.
        raise NonFiniteLogitsError(NON_FINITE)
    return int(torch.multinomial(probs, 1, generator=generator).item())
