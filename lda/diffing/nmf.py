"""NMF topics over the top-k positive diffs (the toolkit's `NmfOrderingType`), memory-conscious.

Each analysed position is a row, each token ever seen in a top-k positive list a column, and the
entry the token's diff there (or 1). NMF splits that matrix into a few token groups that tend to
rise together. The toolkit keeps the entries as three Python lists (~100 bytes an entry); here a
batch appends three tensors (12 bytes an entry) and no Python loop runs over entries. Column
indices follow the toolkit's first-seen order, so topic files name the same `nmf_col_idx`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torchnmf.nmf import NMF

from lda.diffing.orderings import Ordering, OrderingResult, TokenEntry, avg_logit_diff
from lda.diffing.stats import TokenStats, require_same

MODES = ("logit_diff_magnitude", "binary_occurrence")
MIN_WEIGHT = 1e-6  # the toolkit drops topic tokens lighter than this


class NmfTriples:
    """The sparse (row, column, value) entries of the NMF input, collected batch by batch."""

    def __init__(self, mode: str = "logit_diff_magnitude", excluded_token_ids: Iterable[int] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.num_rows = 0
        self.num_cols = 0
        self._excluded = torch.tensor(sorted(set(excluded_token_ids or ())), dtype=torch.long)
        self._rows: list[torch.Tensor] = []  # int32 each
        self._cols: list[torch.Tensor] = []  # int32 each
        self._values: list[torch.Tensor] = []  # fp32 each; none kept in binary mode (all ones)
        self._col_of = torch.full((0,), -1, dtype=torch.long)  # token id -> column, -1 unseen
        self._tokens: list[torch.Tensor] = []  # column -> token id, in chunks

    @property
    def num_entries(self) -> int:
        return sum(r.numel() for r in self._rows)

    def col_to_token(self) -> torch.Tensor:
        """Token id of each column ([num_cols] int64)."""
        return torch.cat(self._tokens) if self._tokens else torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def add(
        self, top_k_pos_indices: torch.Tensor, top_k_pos_values: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Append one batch: `[B, T, k]` top-k positive ids and diffs, `valid` `[B, T]` positions."""
        if top_k_pos_indices.shape != top_k_pos_values.shape or top_k_pos_indices.shape[:-1] != valid.shape:
            raise ValueError(
                "expected indices and values [B, T, k] and valid [B, T], got "
                f"{tuple(top_k_pos_indices.shape)}, {tuple(top_k_pos_values.shape)} and {tuple(valid.shape)}"
            )
        k = top_k_pos_indices.shape[-1]
        keep_rows = valid.reshape(-1).bool()
        ids = top_k_pos_indices.reshape(-1, k)[keep_rows].cpu().long()  # [N, k]
        n = ids.shape[0]
        if n == 0 or k == 0:
            self.num_rows += n
            return
        # The toolkit scans `for k_idx: for row:`, so flatten k-major to meet tokens in its order.
        ids = ids.T.reshape(-1)
        rows = torch.arange(self.num_rows, self.num_rows + n, dtype=torch.int32).repeat(k)
        self.num_rows += n
        values = None
        if self.mode == "logit_diff_magnitude":
            values = top_k_pos_values.reshape(-1, k)[keep_rows].cpu().float().T.reshape(-1)
        if self._excluded.numel():
            kept = ~torch.isin(ids, self._excluded)
            ids, rows = ids[kept], rows[kept]
            values = values[kept] if values is not None else None
        self._rows.append(rows)
        self._cols.append(self._columns(ids).int())
        if values is not None:
            self._values.append(values)

    def _columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Columns of `ids`, giving unseen tokens the next indices in order of first appearance."""
        if ids.numel() == 0:
            return ids
        top = int(ids.max()) + 1
        if top > self._col_of.numel():
            grown = torch.full((max(top, 2 * self._col_of.numel()),), -1, dtype=torch.long)
            grown[: self._col_of.numel()] = self._col_of
            self._col_of = grown
        unseen = ids[self._col_of[ids] < 0]
        if unseen.numel():
            uniq, inverse = torch.unique(unseen, return_inverse=True)
            place = torch.arange(unseen.numel())
            first = torch.full_like(uniq, unseen.numel()).scatter_reduce(0, inverse, place, "amin")
            new = uniq[first.argsort()]
            self._col_of[new] = torch.arange(self.num_cols, self.num_cols + new.numel())
            self._tokens.append(new)
            self.num_cols += new.numel()
        return self._col_of[ids]

    def partial(self) -> dict[str, Any]:
        """The entries so far, self-contained, for another process's `merge`: rows numbered from 0,
        columns in this collection's first-seen order (`tokens` names each column's token id)."""
        return {
            "mode": self.mode,
            "excluded": self._excluded.tolist(),
            "num_rows": self.num_rows,
            "rows": torch.cat(self._rows) if self._rows else torch.zeros(0, dtype=torch.int32),
            "cols": torch.cat(self._cols) if self._cols else torch.zeros(0, dtype=torch.int32),
            "values": None if self.mode == "binary_occurrence" else _cat_values(self._values),
            "tokens": self.col_to_token(),
        }

    def check(self, partial: dict[str, Any]) -> None:
        """Raise ValueError naming the setting where `partial` was collected differently."""
        require_same({"mode": self.mode, "excluded": self._excluded.tolist()},
                     {"mode": partial["mode"], "excluded": partial["excluded"]})  # fmt: skip

    def merge(self, partial: dict[str, Any]) -> None:
        """Append the `partial()` of the positions after all of ours: the same entries in the same
        order as if this collection had gone on to add them, so NMF fits the same matrix."""
        self.check(partial)
        # Their columns in first-seen order: the tokens new to us take our next columns in that
        # order, which is the order a single collection would have met them in.
        columns = self._columns(partial["tokens"])
        self._rows.append(partial["rows"] + self.num_rows)
        self._cols.append(columns[partial["cols"].long()].int())
        if partial["values"] is not None:
            self._values.append(partial["values"])
        self.num_rows += partial["num_rows"]

    def matrix(self) -> torch.Tensor:
        """V [rows, cols], sparse COO: entries summed, negatives clipped to 0 and zeros dropped."""
        size = (self.num_rows, self.num_cols)
        if not self._rows:
            return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), size)
        index = torch.stack([torch.cat(self._rows).long(), torch.cat(self._cols).long()])
        values = torch.cat(self._values) if self._values else torch.ones(index.shape[1])
        raw = torch.sparse_coo_tensor(index, values, size, check_invariants=False).coalesce()
        kept = torch.relu(raw.values())
        keep = kept > 0
        return torch.sparse_coo_tensor(
            raw.indices()[:, keep], kept[keep], size, check_invariants=False
        ).coalesce()


def _cat_values(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float32)


def fit_topics(
    triples: NmfTriples,
    stats: TokenStats,
    tokenizer: Any,
    num_topics: int = 3,
    beta: float = 2.0,
    max_iter: int = 200,
    seed: int = 42,
    num_tokens: int = 100,
    device: torch.device | str = "cpu",
) -> OrderingResult:
    """One ordering per topic: the topic's tokens by their NMF weight.

    Args:
        triples: the collected entries.
        stats: the same positions' statistics (y axis and counts).
        tokenizer: decodes each id for `token_str`.
        num_topics: NMF rank.
        beta: the beta-divergence (2 Frobenius, 1 KL), as torchnmf takes it.
        max_iter: multiplicative-update iterations.
        seed: seeds the random initial factors (same seed, same topics).
        num_tokens: the most tokens per topic.
        device: where the fit runs (the toolkit fits on CUDA when it can).
    """
    if num_topics < 1 or max_iter < 1 or num_tokens < 0:
        raise ValueError(
            "need num_topics >= 1, max_iter >= 1 and num_tokens >= 0, "
            f"got {num_topics}, {max_iter} and {num_tokens}"
        )
    avg = avg_logit_diff(stats)
    result = OrderingResult("nmf", f"NMF Topics ({num_topics} topics)", "NMF Topic Weight")
    if triples.num_entries == 0:
        result.type_metadata = {"error": "No NMF data collected"}
        return result
    V = triples.matrix()
    if V.values().numel() == 0:
        result.type_metadata = {"error": "NMF fitting failed"}
        return result
    W, H = _fit(V, num_topics, beta, max_iter, seed, device)
    metrics = topic_metrics(W, H)
    token_of = triples.col_to_token().tolist()
    k = min(num_tokens, triples.num_cols)
    for t in range(num_topics):
        weights, cols = torch.topk(W[:, t], k=k, largest=True)
        tokens = [
            _entry(token_of[c], c, w, stats, avg, tokenizer)
            for c, w in zip(cols.tolist(), weights.tolist(), strict=True)
        ]
        tokens = [e for e in tokens if e is not None]
        result.orderings.append(Ordering(f"topic_{t}", f"Topic {t}", tokens, dict(metrics[t])))
    result.type_metadata = {
        "num_topics": num_topics,
        "beta": beta,
        "mode": triples.mode,
        "pairwise": {"cosine_similarity": cosine_similarity(W).tolist()},
        "topic_metrics": metrics,
    }
    return result


def _fit(
    V: torch.Tensor, rank: int, beta: float, max_iter: int, seed: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchnmf's fit: W [cols, rank] (token weights), H [rows, rank] (position loadings)."""
    # torchnmf draws W then H as |randn| from the global RNG; drawing them from a generator seeded
    # alike gives the same factors as `torch.manual_seed(seed)` would, without touching global state
    # that concurrent fits (or the caller) share.
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(V.shape[1], rank, generator=g).abs()
    H0 = torch.randn(V.shape[0], rank, generator=g).abs()
    model = NMF(W=W0, H=H0).to(device)
    with torch.enable_grad():  # torchnmf computes its multiplicative updates through autograd
        model.fit(V.to(device), beta=beta, max_iter=max_iter)
    return model.W.detach().cpu(), model.H.detach().cpu()


def _entry(
    token_id: int, col: int, weight: float, stats: TokenStats, avg: torch.Tensor, tokenizer: Any
) -> TokenEntry | None:
    if weight < MIN_WEIGHT:
        return None
    return TokenEntry(
        token_id=token_id,
        token_str=tokenizer.decode([token_id]),
        ordering_value=weight,
        avg_logit_diff=float(avg[token_id]),
        count_positive=int(stats.topk_pos_counts[token_id]),
        count_negative=int(stats.topk_neg_counts[token_id]),
        extra={"nmf_col_idx": col},
    )


def cosine_similarity(W: torch.Tensor) -> torch.Tensor:
    """[topics, topics] cosine between topics' token-weight vectors (W's columns)."""
    topics = W.T / torch.linalg.norm(W.T, dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
    return topics @ topics.T


def topic_metrics(W: torch.Tensor, H: torch.Tensor) -> list[dict[str, Any]]:
    """The toolkit's per-topic mass, prevalence and concentration.

    mass: ΣH[:, t]·ΣW[:, t], the topic's share of the reconstruction. prevalence: the fraction of
    rows whose largest contribution H[r, t]·ΣW[:, t] is topic t. concentration: 1 − the normalised
    entropy of the topic's token weights (1: one token; 0: spread evenly).
    """
    num_cols, num_topics = W.shape
    # The toolkit asserts every topic has weight; a dead topic here gets 0 mass instead of NaNs.
    colsum = W.sum(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
    mass = H.sum(dim=0) * colsum
    dominant = torch.argmax(H * colsum[None, :], dim=1)
    prevalence = torch.bincount(dominant, minlength=num_topics).float() / H.shape[0]
    if num_cols == 1:
        concentration = torch.ones(num_topics)
    else:
        p = (W / colsum[None, :]).clamp(min=1e-12)
        concentration = 1.0 - (-(p * torch.log(p)).sum(dim=0)) / math.log(num_cols)
    return [
        {
            "nmf_topic_idx": t,
            "nmf_topic_mass": float(mass[t]),
            "nmf_topic_prevalence": float(prevalence[t]),
            "nmf_topic_concentration": float(concentration[t]),
        }
        for t in range(num_topics)
    ]
