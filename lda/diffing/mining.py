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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lda.diffing.inputs import Sample, analysed
from lda.diffing.klstats import KLRecorder
from lda.diffing.stats import TokenStats, require_same


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
    if index.shape[1] == after_logits.shape[1] and all(s.positions == tuple(range(len(s.ids))) for s in samples):
        return PositionBatch(after_logits, before_logits, valid)  # texts: every position, no copy
    take = index.unsqueeze(-1).expand(-1, -1, after_logits.shape[-1])
    return PositionBatch(after_logits.gather(1, take), before_logits.gather(1, take), valid)


def diff_stats(diff: torch.Tensor, valid: torch.Tensor, top_k: int) -> tuple[TokenStats, torch.Tensor, torch.Tensor]:
    """The toolkit's `compute_stats_from_logits` for one batch, plus its top-k positive lists.

    `diff` [B, P, V] is after − before; positions outside `valid` are zeroed first, as the toolkit
    multiplies by its mask, so they add nothing to the sums and are never counted.
    Returns the batch's statistics and the top-k positive (values, indices) for NMF.
    """
    vocab = diff.shape[-1]
    if not bool(valid.all()):
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


class _TopList:
    """The `size` largest items seen (a min-heap); ties keep the earlier item."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[float, int, dict[str, Any]]] = []
        self._seen = 0

    def admits(self, score: float) -> bool:
        """Whether `score` would enter the list (so an item is only built when it will be kept)."""
        return len(self._heap) < self.size or score > self._heap[0][0]

    def offer(self, score: float, item: dict[str, Any]) -> None:
        self._seen += 1
        entry = (score, -self._seen, item)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def best(self) -> list[dict[str, Any]]:
        return [item for _, _, item in sorted(self._heap, key=lambda e: e[:2], reverse=True)]

    def merge(self, heap: list[tuple[float, int, dict[str, Any]]], seen: int) -> None:
        """Fold in the entries of a list that was offered later items.

        Their offer numbers continue ours, so a tie between one of ours and one of theirs keeps
        ours, as a single list offered both would; the `size` best of both lists are the `size`
        best of every item, since an item either list dropped had `size` better ones before it.
        """
        later = [(score, order - self._seen, item) for score, order, item in heap]
        kept = heapq.nlargest(self.size, self._heap + later, key=lambda e: e[:2])
        heapq.heapify(kept)
        # A new list, not an in-place change: a `state()` taken earlier holds the old one.
        self._heap, self._seen = kept, self._seen + seen


def next_tokens(samples: Sequence[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each analysed position predicts, [B, width], and whether it exists (the last
    token of a sample predicts past its end)."""
    target = [[0] * width for _ in samples]
    scored = [[False] * width for _ in samples]
    for row, sample in enumerate(samples):
        for j, p in enumerate(sample.positions):
            if p + 1 < len(sample.ids):
                target[row][j], scored[row][j] = sample.ids[p + 1], True
    return torch.tensor(target, dtype=torch.long), torch.tensor(scored, dtype=torch.bool)


class Miner:
    """Streaming state of one mining pass; `add` each batch, then read the results."""

    def __init__(
        self, vocab_size: int, config: MiningConfig, work_dir: Path, device: torch.device | str = "cpu",
        resume: bool = False,
    ) -> None:  # fmt: skip
        if not 1 <= config.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary), got {config.top_k}")
        self.config = config
        self.stats = TokenStats.zeros(vocab_size, device)
        self.kl = KLRecorder(work_dir / "kl_forward", fresh=not resume)
        self.kl_rev = KLRecorder(work_dir / "kl_reverse", fresh=not resume) if config.kl_reverse else None
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
        # One log-softmax per model serves KL (at temperature 1) and the likelihood ratios.
        lp_a, lp_b = torch.log_softmax(batch.after, dim=-1), torch.log_softmax(batch.before, dim=-1)
        tau = self.config.temperature
        if tau == 1.0:
            kl = (lp_a.exp() * (lp_a - lp_b)).sum(dim=-1)
        else:
            kl = kl_divergence(batch.after, batch.before, tau)
        self.kl.add(kl, batch.valid)
        if self.kl_rev is not None:
            reverse = (lp_b.exp() * (lp_b - lp_a)).sum(dim=-1) if tau == 1.0 else kl_divergence(batch.before, batch.after, tau)
            self.kl_rev.add(reverse, batch.valid)
        self._examples(samples, kl, batch.valid)
        target, scored = next_tokens(samples, kl.shape[1])
        target, scored = target.to(lp_a.device), scored.to(lp_a.device) & batch.valid
        token_a = lp_a.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
        token_b = lp_b.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
        self._windows(samples, token_a, token_b, target, scored)

    def _examples(self, samples: Sequence[Sample], kl: torch.Tensor, valid: torch.Tensor) -> None:
        count = valid.sum(dim=1)
        peak = kl.masked_fill(~valid, float("-inf")).amax(dim=1)
        mean = (kl * valid).sum(dim=1) / count.clamp(min=1)
        kl, valid = kl.cpu(), valid.cpu()
        for row, (top, avg, n) in enumerate(zip(peak.tolist(), mean.tolist(), count.tolist())):
            if n == 0 or not (self.by_max.admits(top) or self.by_mean.admits(avg)):
                continue
            sample = samples[row]
            item = {"index": sample.index, "ids": list(sample.ids), "positions": list(sample.positions),
                    "kl": kl[row][valid[row]].tolist()}  # fmt: skip
            self.by_max.offer(top, item | {"score": top})
            self.by_mean.offer(avg, item | {"score": avg})

    def _windows(
        self, samples: Sequence[Sample], lp_a: torch.Tensor, lp_b: torch.Tensor, target: torch.Tensor,
        scored: torch.Tensor,
    ) -> None:  # fmt: skip
        """Windowed log-likelihood ratios Σ log p_after − Σ log p_before over the tokens predicted.

        A window covers the tokens it scores: positions p..p+w-1 predict ids[p+1..p+w], and those
        are the ids reported (the toolkit reports ids[p..p+w-1], one token off its own scores).
        Windows start every `step` scored positions of a sample, as the toolkit's do.
        """
        w, step = self.config.llr_window, self.config.llr_step
        # Scored positions come first in each row (they are the analysed ones but the last), so a
        # prefix sum over each row gives every window's sum.
        zero = torch.zeros(lp_a.shape[0], 1, dtype=torch.float64, device=lp_a.device)
        sums = {k: torch.cat([zero, torch.cumsum(v * scored, dim=1)], dim=1) for k, v in (("a", lp_a), ("b", lp_b))}
        counts = scored.sum(dim=1).tolist()
        sums_a, sums_b = sums["a"].cpu(), sums["b"].cpu()
        for row, n in enumerate(counts):
            starts = list(range(0, n - w + 1, step))
            if not starts:
                continue
            self.num_windows += len(starts)
            s = torch.tensor(starts)
            a = (sums_a[row, s + w] - sums_a[row, s]).tolist()
            b = (sums_b[row, s + w] - sums_b[row, s]).tolist()
            sample = samples[row]
            for start, la, lb in zip(starts, a, b):
                if not self.windows.admits(la - lb):
                    continue
                first = sample.positions[start]
                self.windows.offer(
                    la - lb,
                    {
                        "sample_idx": sample.index,
                        "start_pos": first + 1,
                        "end_pos": first + w + 1,
                        "token_ids": list(sample.ids[first + 1 : first + w + 1]),
                        "logprob_base": lb,
                        "logprob_ft": la,
                        "logprob_diff": la - lb,
                    },
                )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the KL files are marked by their sizes, not copied)."""
        return {
            "stats": self.token_stats(),
            "lists": {name: (t._heap, t._seen) for name, t in self._lists().items()},
            "num_windows": self.num_windows,
            "kl": self.kl.sizes(),
            "kl_reverse": self.kl_rev.sizes() if self.kl_rev is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint taken by `state()` (the Miner built with `resume=True`)."""
        self.stats = state["stats"].to(self.stats.sum_logit_diff.device)
        for name, top in self._lists().items():
            top._heap, top._seen = state["lists"][name]
        self.num_windows = state["num_windows"]
        self.kl.restore(state["kl"])
        if self.kl_rev is not None:
            self.kl_rev.restore(state["kl_reverse"])

    def partial(self) -> dict[str, Any]:
        """Everything `add` accumulated, self-contained (the KL values themselves, CPU tensors and
        plain Python), for another process's `merge`."""
        return {
            "settings": self._settings(),
            "stats": self.token_stats(),
            "lists": {name: (list(t._heap), t._seen) for name, t in self._lists().items()},
            "num_windows": self.num_windows,
            "kl": self.kl.values(),
            "kl_reverse": self.kl_rev.values() if self.kl_rev is not None else None,
        }

    def check(self, partial: dict[str, Any]) -> None:
        """Raise ValueError naming each setting where `partial` came from another config."""
        require_same(self._settings(), partial["settings"])

    def merge(self, partial: dict[str, Any]) -> None:
        """Fold in the `partial()` of a miner over the samples after all of ours, as if this one
        had gone on to add them: sums and counts add, top lists keep ours on ties, KL values append."""
        self.check(partial)
        self.stats = self.stats.merge(partial["stats"])
        for name, top in self._lists().items():
            top.merge(*partial["lists"][name])
        self.num_windows += partial["num_windows"]
        self.kl.append(*partial["kl"])
        if self.kl_rev is not None:
            self.kl_rev.append(*partial["kl_reverse"])

    def _settings(self) -> dict[str, Any]:
        return {"vocab_size": self.stats.vocab_size, **asdict(self.config)}

    def _lists(self) -> dict[str, _TopList]:
        return {"by_max": self.by_max, "by_mean": self.by_mean, "windows": self.windows}

    def token_stats(self) -> TokenStats:
        return self.stats.cpu()
