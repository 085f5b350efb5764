"""The diffing toolkit's token orderings (`diff_mining/token_ordering.py`), from `TokenStats`.

An ordering is a ranked token list with an x value (the ranking metric) and a y value (the
average logit diff) per token; an ordering type yields one or more of them (NMF one per topic).
The formulas, labels and ids are the toolkit's so that its viewer and agents read our results.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lda.diffing.stats import TokenStats


@dataclass
class TokenEntry:
    """One ranked token: `ordering_value` is the x axis, `avg_logit_diff` the y axis."""

    token_id: int
    token_str: str
    ordering_value: float
    avg_logit_diff: float
    count_positive: int = 0
    count_negative: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ordering:
    ordering_id: str
    display_label: str
    tokens: list[TokenEntry]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class OrderingResult:
    """What one ordering type produced for one dataset (the toolkit's `OrderingTypeResult`)."""

    ordering_type_id: str
    display_name: str
    x_axis_label: str
    y_axis_label: str = "Avg Logit Diff"
    orderings: list[Ordering] = field(default_factory=list)
    type_metadata: dict[str, Any] = field(default_factory=dict)


def avg_logit_diff(stats: TokenStats) -> torch.Tensor:
    """Σ diff / positions per token ([V]); every ordering's y axis."""
    if stats.total_positions <= 0:
        raise ValueError(
            f"no positions were analysed (total_positions={stats.total_positions}): nothing to order"
        )
    return stats.sum_logit_diff / stats.total_positions


def excluded_ids(stats: TokenStats, excluded_token_ids: Iterable[int] | None) -> list[int]:
    """Sorted unique ids, checked against the vocabulary (a duplicate or stray id would make k wrong)."""
    ids = sorted(set(excluded_token_ids or ()))
    bad = [i for i in ids if not 0 <= i < stats.vocab_size]
    if bad:
        raise ValueError(f"excluded_token_ids must be in [0, {stats.vocab_size}), got {bad[:5]}")
    return ids


def _top(
    values: torch.Tensor, stats: TokenStats, num_tokens: int, excluded_token_ids: Iterable[int] | None
) -> tuple[list[float], list[int]]:
    """The toolkit's selection: excluded ids to -inf, then topk with k shrunk by their number."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    excluded = excluded_ids(stats, excluded_token_ids)
    if excluded:
        values[torch.tensor(excluded, dtype=torch.long)] = float("-inf")
    k = max(min(num_tokens, stats.vocab_size - len(excluded)), 0)
    top_values, top_indices = torch.topk(values, k=k, largest=True)
    return top_values.tolist(), top_indices.tolist()


def _global(
    stats: TokenStats,
    tokenizer: Any,
    values: torch.Tensor,
    counts: tuple[torch.Tensor, torch.Tensor],
    num_tokens: int,
    excluded_token_ids: Iterable[int] | None,
) -> list[TokenEntry]:
    """The top tokens by `values`, each with its average diff and its (positive, negative) counts."""
    avg = avg_logit_diff(stats)
    top, ids = _top(values, stats, num_tokens, excluded_token_ids)
    return [
        TokenEntry(
            token_id=i,
            token_str=tokenizer.decode([i]),
            ordering_value=v,
            avg_logit_diff=float(avg[i]),
            count_positive=int(counts[0][i]),
            count_negative=int(counts[1][i]),
        )
        for i, v in zip(ids, top, strict=True)
    ]


def top_k_occurring(
    stats: TokenStats, tokenizer: Any, num_tokens: int, excluded_token_ids: Iterable[int] | None = None
) -> OrderingResult:
    """Tokens by how often (% of positions) they are among the top-k positive diffs.

    Args:
        stats: the dataset's streaming statistics.
        tokenizer: decodes each id for `token_str`.
        num_tokens: the most tokens kept.
        excluded_token_ids: ids that never appear (the toolkit's punctuation filter).
    """
    rates = stats.topk_pos_counts.float() / stats.total_positions * 100
    counts = (stats.topk_pos_counts, stats.topk_neg_counts)
    tokens = _global(stats, tokenizer, rates, counts, num_tokens, excluded_token_ids)
    return OrderingResult(
        ordering_type_id="top_k_occurring",
        display_name="Top-K Occurring",
        x_axis_label="Occurrence Rate in Top-K (%)",
        orderings=[Ordering("global", "Global (by occurrence rate)", tokens)],
    )


def fraction_positive_diff(
    stats: TokenStats, tokenizer: Any, num_tokens: int, excluded_token_ids: Iterable[int] | None = None
) -> OrderingResult:
    """Tokens by the fraction of positions where the fine-tune raised their logit.

    Args:
        stats: the dataset's streaming statistics.
        tokenizer: decodes each id for `token_str`.
        num_tokens: the most tokens kept.
        excluded_token_ids: ids that never appear (the toolkit's punctuation filter).
    """
    fraction = stats.count_positive.float() / stats.total_positions
    counts = (stats.count_positive, stats.total_positions - stats.count_positive)
    tokens = _global(stats, tokenizer, fraction, counts, num_tokens, excluded_token_ids)
    return OrderingResult(
        ordering_type_id="fraction_positive_diff",
        display_name="Fraction Positive Diff",
        x_axis_label="Fraction of Positive Shifts",
        orderings=[Ordering("global", "Global (by fraction positive)", tokens)],
    )
