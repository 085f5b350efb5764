"""Logit-diff mining and KL in one streaming pass (the toolkit's `diff_mining` + `kl`).

The toolkit first holds every base logit of every sample in memory ([N, T, V]: ~160 GB at its
defaults) and then reduces. Every statistic it reports is a per-batch reduction, so `Miner.add`
reduces each batch on the device as it comes and keeps only vocabulary-sized sums, bounded
top-lists and (optionally) the NMF triples; per-position KL values go to a file on disk so the
exact percentiles cost no memory.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lda.diffing.inputs import Sample, analysed
from lda.diffing.klstats import KLRecorder
from lda.diffing.stats import TokenStats


@dataclass(frozen=True)
class MiningConfig:
    top_k: int = 100
    temperature: float = 1.0  # KL only; the logit diffs and log-likelihood ratios are raw
    kl_reverse: bool = False
    examples: int = 100  # highest-KL samples kept (by max and by mean per-token KL)
    llr_window: int = 20
    llr_step: int = 5
    llr_top: int = 100


@dataclass(frozen=True)
class PositionBatch:
    """A batch's analysed positions gathered from full-sequence logits."""

    after: torch.Tensor  # [B, P, V] fp32
    before: torch.Tensor  # [B, P, V] fp32
    valid: torch.Tensor  # [B, P] bool: rows may analyse fewer than P positions


def gather_positions(
    samples: Sequence[Sample], after_logits: torch.Tensor, before_logits: torch.Tensor
) -> PositionBatch:
    """Logits at each sample's analysed positions ([B, L, V] -> [B, P, V], P the longest list)."""
    index, valid = analysed(samples, max(len(s.positions) for s in samples))
    index, valid = index.to(after_logits.device), valid.to(after_logits.device)
    take = index.unsqueeze(-1).expand(-1, -1, after_logits.shape[-1])
    return PositionBatch(after_logits.gather(1, take), before_logits.gather(1, take), valid)


def diff_stats(diff: torch.Tensor, valid: torch.Tensor, top_k: int) -> tuple[TokenStats, torch.Tensor, torch.Tensor]:
    """The toolkit's `compute_stats_from_logits` for one batch, plus its top-k positive lists.

    `diff` [B, P, V] is after − before; positions outside `valid` are zeroed first, as the toolkit
    multiplies by its mask, so they add nothing to the sums and are never counted.
    Returns the batch's statistics and the top-k positive (values, indices) for NMF.
    """
    vocab = diff.shape[-1]
    diff = diff * valid.unsqueeze(-1).to(diff.dtype)
    pos_values, pos_indices = torch.topk(diff, k=top_k, dim=-1, largest=True)
    _, neg_indices = torch.topk(diff, k=top_k, dim=-1, largest=False)
    stats = TokenStats(
        vocab_size=vocab,
        total_positions=int(valid.sum()),
        num_samples=diff.shape[0],
        sum_logit_diff=diff.sum(dim=(0, 1), dtype=torch.float32),
        count_positive=(diff > 0).sum(dim=(0, 1)).to(torch.int64),
        topk_pos_counts=torch.bincount(pos_indices[valid].flatten(), minlength=vocab),
        topk_neg_counts=torch.bincount(neg_indices[valid].flatten(), minlength=vocab),
    )
    return stats, pos_values, pos_indices


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P ‖ Q) of the next-token distributions at each position: Σ_v p·(log p − log q)."""
    lp = torch.log_softmax(p_logits / temperature, dim=-1)
    lq = torch.log_softmax(q_logits / temperature, dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[p] | ...) from the logits at the position before it ([B, P, V], [B, P] -> [B, P])."""
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class _TopList:
    """The `size` largest items seen (a min-heap); ties keep the earlier item."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[float, int, dict[str, Any]]] = []
        self._seen = 0

    def offer(self, score: float, item: dict[str, Any]) -> None:
        self._seen += 1
        entry = (score, -self._seen, item)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def best(self) -> list[dict[str, Any]]:
        return [item for _, _, item in sorted(self._heap, key=lambda e: e[:2], reverse=True)]


class Miner:
    """Streaming state of one mining pass; `add` each batch, then read the results."""

    def __init__(self, vocab_size: int, config: MiningConfig, work_dir: Path, device: torch.device | str = "cpu"):
        if not 1 <= config.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary), got {config.top_k}")
        self.config = config
        self.stats = TokenStats.zeros(vocab_size, device)
        self.kl = KLRecorder(work_dir / "kl_forward")
        self.kl_rev = KLRecorder(work_dir / "kl_reverse") if config.kl_reverse else None
        self.by_max = _TopList(config.examples)
        self.by_mean = _TopList(config.examples)
        self.windows = _TopList(config.llr_top)
        self.num_windows = 0
        self.nmf_hook: Any = None  # called with (pos_values, pos_indices, valid) when NMF is on

    @torch.no_grad()
    def add(self, samples: Sequence[Sample], after_logits: torch.Tensor, before_logits: torch.Tensor) -> None:
        """Reduce one batch: `*_logits` [B, L, V] at every position of the right-padded `samples`."""
        batch = gather_positions(samples, after_logits, before_logits)
        stats, pos_values, pos_indices = diff_stats(batch.after - batch.before, batch.valid, self.config.top_k)
        self.stats = self.stats.merge(stats)
        if self.nmf_hook is not None:
            self.nmf_hook(pos_values, pos_indices, batch.valid)
        kl = kl_divergence(batch.after, batch.before, self.config.temperature)
        self.kl.add(kl, batch.valid)
        if self.kl_rev is not None:
            self.kl_rev.add(kl_divergence(batch.before, batch.after, self.config.temperature), batch.valid)
        self._examples(samples, kl.cpu(), batch.valid.cpu())
        self._windows(samples, after_logits, before_logits)

    def _examples(self, samples: Sequence[Sample], kl: torch.Tensor, valid: torch.Tensor) -> None:
        for row, sample in enumerate(samples):
            values = kl[row][valid[row]].tolist()
            if not values:
                continue
            item = {"index": sample.index, "ids": list(sample.ids), "positions": list(sample.positions), "kl": values}
            self.by_max.offer(max(values), item | {"score": max(values)})
            mean = float(np.mean(values))
            self.by_mean.offer(mean, item | {"score": mean})

    def _windows(self, samples: Sequence[Sample], after_logits: torch.Tensor, before_logits: torch.Tensor) -> None:
        """Windowed log-likelihood ratios Σ log p_after − Σ log p_before over the tokens predicted.

        A window covers the tokens it scores: positions p..p+w-1 predict ids[p+1..p+w], and those
        are the ids reported (the toolkit reports ids[p..p+w-1], one token off its own scores).
        """
        w, step = self.config.llr_window, self.config.llr_step
        for row, sample in enumerate(samples):
            scored = [p for p in sample.positions if p + 1 < len(sample.ids)]
            if len(scored) < w:
                continue
            at = torch.tensor(scored, device=after_logits.device)
            target = torch.tensor([sample.ids[p + 1] for p in scored], device=after_logits.device)
            lp_a = token_logprobs(after_logits[row, at].unsqueeze(0), target.unsqueeze(0))[0].double().cpu()
            lp_b = token_logprobs(before_logits[row, at].unsqueeze(0), target.unsqueeze(0))[0].double().cpu()
            for start in range(0, len(scored) - w + 1, step):
                a, b = float(lp_a[start : start + w].sum()), float(lp_b[start : start + w].sum())
                self.num_windows += 1
                predicted = target[start : start + w].tolist()
                self.windows.offer(
                    a - b,
                    {
                        "sample_idx": sample.index,
                        "start_pos": scored[start] + 1,
                        "end_pos": scored[start + w - 1] + 2,
                        "token_ids": predicted,
                        "logprob_base": b,
                        "logprob_ft": a,
                        "logprob_diff": a - b,
                    },
                )

    def token_stats(self) -> TokenStats:
        return self.stats.cpu()
