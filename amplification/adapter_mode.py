"""Adapter-mode LDA: one base model in memory, the adapter off and on as two halves of one batch.

`AdapterSource` is a `lda.LogitsSource`. Each forward runs the rows twice in one batch,
`[after rows; before rows]`, with one KV cache; forward hooks on the adapter's Linears add the
(amplified) LoRA update `coefficient * (x @ A^T) @ B^T` to the first half only. Hooks live only
for the duration of a forward, so the model is plain whenever the engine is not inside one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from amplification.merge import Plan
from lda.cache_ops import can_repad, crop_right, install, joined_layers, selected_layers, trim_left
from lda.source import input_device, logits_width

Terms = list[tuple[torch.Tensor, torch.Tensor, float]]


class AdapterSource:
    """Logits of base+adapter (after) and base (before) from one model and one forward."""

    def __init__(self, model: nn.Module, plan: Plan, width: int | None = None) -> None:
        self.model = model
        self.device = input_device(model)
        self.width = width or logits_width(model)
        modules = dict(model.named_modules())
        self.terms: dict[nn.Module, Terms] = {}
        for name, terms in plan.items():
            weight = modules[name].weight
            self.terms[modules[name]] = [
                (t.A.to(weight.device, weight.dtype), t.B.to(weight.device, weight.dtype), t.coefficient)
                for t in terms
            ]
        self.rows = 0  # rows in the "after" half of the current batch
        self.cache = DynamicCache()

    def _hook(self, terms: Terms) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0][: self.rows]
            for a, b, coefficient in terms:
                output[: self.rows].add_((x @ a.T) @ b.T, alpha=coefficient)
            return output

        return hook

    @torch.no_grad()
    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        every_position: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = input_ids.shape[0]
        if not every_position:
            self.rows = rows
        # The hooks read `self.rows`; scoring must not change the decode's, so it swaps its own in.
        kept, self.rows = self.rows, rows
        handles = [m.register_forward_hook(self._hook(t)) for m, t in self.terms.items()]
        try:
            out = self.model(
                input_ids=torch.cat([input_ids, input_ids]),
                attention_mask=torch.cat([attention_mask, attention_mask]),
                position_ids=torch.cat([position_ids, position_ids]),
                past_key_values=None if every_position else self.cache,
                use_cache=not every_position,
                logits_to_keep=0 if every_position else 1,
            )
        finally:
            for h in handles:
                h.remove()
            if every_position:
                self.rows = kept
        if every_position:
            logits = out.logits[..., : self.width].float()  # [2B, T, V]
        else:
            logits = out.logits[:, -1, : self.width].float()  # [2B, V]
        return logits[:rows], logits[rows:]

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at every position, [B, T, V] each, without touching the cache."""
        return self._forward(input_ids, attention_mask, position_ids, every_position=True)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache = DynamicCache()
        return self._forward(input_ids, attention_mask, position_ids)

    def decode_one_token(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(tokens, attention_mask, position_ids)

    @property
    def repaddable(self) -> bool:
        return can_repad(self.cache)

    def join(self, other: AdapterSource) -> None:
        """Append `other`'s rows: the cache becomes [mine after; theirs after; mine before; theirs before]."""
        a, b = self.rows, other.rows
        first = torch.arange(2 * (a + b), device=self.device)
        order = torch.cat([first[:a], first[2 * a : 2 * a + b], first[a : 2 * a], first[2 * a + b :]])
        install([self.cache], [joined_layers(self.cache, other.cache, order)])  # all or nothing
        self.rows = a + b

    def trim_left(self, columns: int) -> None:
        trim_left(self.cache, columns)

    def crop(self, length: int) -> None:
        crop_right(self.cache, length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        # The cache holds [after rows; before rows]: select the same rows from both halves (an
        # index may repeat: a shared prefill expanded). See `ModelSource.keep_rows`.
        install([self.cache], [selected_layers(self.cache, torch.cat([rows, rows + self.rows]))])
        self.rows = rows.shape[0]
