"""Logits sources for the decode loop: one or two Hugging Face causal LMs with KV caches."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from lda.cache_ops import can_repad, crop_right, install, joined_layers, selected_layers, trim_left


def input_device(model: Any) -> torch.device:
    """The device a model's input ids must be on (the embedding's, also under device_map)."""
    return model.get_input_embeddings().weight.device


def context_window(models: Any) -> int | None:
    """The shortest context window (`max_position_embeddings`) of `models`; None if none says."""
    windows = [w for m in models if (w := getattr(m.config, "max_position_embeddings", None))]
    return min(windows) if windows else None


def logits_width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


class ModelSource:
    """`after` and optionally `before`, each with its own cache on the same token sequence.

    With `before=None` it decodes one model alone (the `/generate` route and baselines).
    """

    def __init__(self, after: Any, before: Any | None = None, width: int | None = None) -> None:
        self.models = [after] if before is None else [after, before]
        self.device = input_device(after)
        self.width = width or min(logits_width(m) for m in self.models)
        self.caches = [DynamicCache() for _ in self.models]

    @torch.no_grad()
    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        every_position: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = []
        for model, cache in zip(self.models, self.caches):
            dev = input_device(model)
            out = model(
                input_ids=input_ids.to(dev),
                attention_mask=attention_mask.to(dev),
                position_ids=position_ids.to(dev),
                past_key_values=None if every_position else cache,
                use_cache=not every_position,
                logits_to_keep=0 if every_position else 1,
            )
            if every_position:
                logits.append(out.logits[..., : self.width].float().to(self.device))  # [B, T, V]
            else:
                logits.append(out.logits[:, -1, : self.width].float().to(self.device))  # [B, V]
        return logits[0], (logits[1] if len(logits) > 1 else None)

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at every position, [B, T, V], without touching the caches (a prompt's own logprobs)."""
        return self._forward(input_ids, attention_mask, position_ids, every_position=True)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.caches = [DynamicCache() for _ in self.models]
        return self._forward(input_ids, attention_mask, position_ids)

    def decode_one_token(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._forward(tokens, attention_mask, position_ids)

    @property
    def repaddable(self) -> bool:
        """Whether other rows can join this batch (full-attention caches only)."""
        return all(can_repad(c) for c in self.caches)

    def join(self, other: ModelSource) -> None:
        """Append `other`'s rows (prefilled on the same models) to this batch, left re-padded;
        all or nothing: both models' caches change only once both joins exist."""
        install(self.caches, [joined_layers(mine, theirs) for mine, theirs in zip(self.caches, other.caches)])

    def trim_left(self, columns: int) -> None:
        for cache in self.caches:
            trim_left(cache, columns)

    def crop(self, length: int) -> None:
        for cache in self.caches:
            crop_right(cache, length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        # All or nothing, as `join`: a copy per row for every model first, then the swap.
        install(self.caches, [selected_layers(cache, rows) for cache in self.caches])
