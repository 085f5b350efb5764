"""The diffing toolkit's shared token statistics, under its names (`SharedTokenStats`).

Everything `diff_mining`'s orderings need is four vocabulary-sized vectors and two counts; they
are sums over positions, so batches (and workers) merge by adding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenStats:
    """Per-token sums over every analysed position (all tensors `[vocab_size]`, on the CPU).

    sum_logit_diff: Σ (after − before) raw logits, fp32.
    count_positive: positions where after − before > 0.
    topk_pos_counts / topk_neg_counts: positions where the token is among the `top_k` largest /
        smallest diffs.
    """

    vocab_size: int
    total_positions: int
    num_samples: int
    sum_logit_diff: torch.Tensor
    count_positive: torch.Tensor
    topk_pos_counts: torch.Tensor
    topk_neg_counts: torch.Tensor

    @classmethod
    def zeros(cls, vocab_size: int, device: torch.device | str = "cpu") -> TokenStats:
        def counts() -> torch.Tensor:
            return torch.zeros(vocab_size, dtype=torch.int64, device=device)

        return cls(
            vocab_size, 0, 0, torch.zeros(vocab_size, dtype=torch.float32, device=device), counts(), counts(), counts()
        )

    def merge(self, other: TokenStats) -> TokenStats:
        """The statistics of both sets of samples (sums and counts add)."""
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge statistics over {other.vocab_size} tokens into {self.vocab_size}")
        return TokenStats(
            self.vocab_size,
            self.total_positions + other.total_positions,
            self.num_samples + other.num_samples,
            self.sum_logit_diff + other.sum_logit_diff.to(self.sum_logit_diff.device),
            self.count_positive + other.count_positive.to(self.count_positive.device),
            self.topk_pos_counts + other.topk_pos_counts.to(self.topk_pos_counts.device),
            self.topk_neg_counts + other.topk_neg_counts.to(self.topk_neg_counts.device),
        )

    def to(self, device: torch.device | str) -> TokenStats:
        return TokenStats(
            self.vocab_size,
            self.total_positions,
            self.num_samples,
            self.sum_logit_diff.to(device),
            self.count_positive.to(device),
            self.topk_pos_counts.to(device),
            self.topk_neg_counts.to(device),
        )

    def cpu(self) -> TokenStats:
        return self.to("cpu")

    def to_json(self) -> dict[str, Any]:
        """The arrays as lists, under the toolkit's names (`GET /diffing/jobs/{id}/token_stats`)."""
        return {
            "vocab_size": self.vocab_size,
            "total_positions": self.total_positions,
            "num_samples": self.num_samples,
            "sum_logit_diff": self.sum_logit_diff.tolist(),
            "count_positive": self.count_positive.tolist(),
            "topk_pos_counts": self.topk_pos_counts.tolist(),
            "topk_neg_counts": self.topk_neg_counts.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenStats:
        return cls(
            int(data["vocab_size"]),
            int(data["total_positions"]),
            int(data["num_samples"]),
            torch.tensor(data["sum_logit_diff"], dtype=torch.float32),
            torch.tensor(data["count_positive"], dtype=torch.int64),
            torch.tensor(data["topk_pos_counts"], dtype=torch.int64),
            torch.tensor(data["topk_neg_counts"], dtype=torch.int64),
        )


def require_same(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Refuse to merge a partial reduced under other settings: its sums, lists and KL values would
    count something else than ours, and the merged result would silently mix the two."""
    names = list(ours) + [k for k in theirs if k not in ours]
    diff = [f"{k}={theirs.get(k)!r} (this pass: {ours.get(k)!r})" for k in names if theirs.get(k) != ours.get(k)]
    if diff:
        raise ValueError("cannot merge a partial from a differently configured pass: " + "; ".join(diff))
