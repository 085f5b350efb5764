"""Steering: a vector added to block L's output at every position and every decode step.

`SteeredSource` is a `ModelSource` whose `after` model runs with `vector` added to one block's
output (the toolkit's `model.steer(L, α·v)` on the fine-tuned model); `before` runs unchanged. Rows
with one steering vector share a running batch, so the vector is the source's, not the row's.
"""

from __future__ import annotations

from typing import Any

import torch

from lda.blocks import block_hook
from lda.source import ModelSource


class SteeredSource(ModelSource):
    """`after` (+ `vector` at block `layer`) and optionally `before`, with their own caches."""

    def __init__(
        self, after: Any, before: Any | None, width: int | None, layer: int, vector: torch.Tensor
    ) -> None:
        if before is after:
            raise ValueError("steering needs the after model and the before model to be distinct")
        super().__init__(after, before, width)
        self.layer = layer
        self.vector = vector

    def _forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        after = self.models[0]

        def add(hidden: torch.Tensor) -> torch.Tensor:
            return hidden + self.vector.to(device=hidden.device, dtype=hidden.dtype)

        with block_hook(after, self.layer, add):
            return super()._forward(*args, **kwargs)
