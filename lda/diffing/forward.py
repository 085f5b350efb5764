"""Teacher-forced forwards of both models over a batch of samples (no cache, every position)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lda.diffing.inputs import Sample
from lda.source import ModelSource


def pad_right(samples: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) [B, L], right-padded: a causal model's logits at a
    row's real positions never see the padding after them."""
    length = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.ids)] = torch.tensor(sample.ids)
        mask[row, : len(sample.ids)] = 1
    positions = torch.arange(length).unsqueeze(0).expand(len(samples), -1)
    return ids, mask, positions


def pair_logits(
    after: torch.nn.Module, before: torch.nn.Module, width: int, samples: Sequence[Sample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [B, L, width] of both models at every position (vocabularies cut to `width`)."""
    ids, mask, positions = pad_right(samples, pad_id)
    logits_after, logits_before = ModelSource(after, before, width).score(ids, mask, positions)
    assert logits_before is not None
    return logits_after, logits_before
