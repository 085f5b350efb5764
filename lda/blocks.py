"""Decoder blocks of a causal LM, and hooks on their outputs (the residual stream).

"Block L's output" is what the diffing toolkit calls layer L (nnterp's `layers_output[L]`). Two
hooks are all the activation methods need: read a block's output (capture), and add a vector to
it (steering). Hooks are attached for one forward and removed in `finally`, so a model shared with
every other request never keeps one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` for Llama, Qwen, Mistral, Gemma, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder block list (model.get_decoder().layers)")
    return layers


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None:
        raise ValueError(f"{type(model).__name__} has no final norm (model.get_decoder().norm)")
    return norm


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def block_hook(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call `fn(hidden [B, T, d])` on block `layer`'s output during the block; a tensor it returns
    replaces the output."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        new = fn(_hidden(output))
        return None if new is None else _replace(output, new)

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(model: nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The outputs of `layers` of the next forward, as {layer: [B, T, d]} (filled during it)."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def hook(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
            seen[layer] = _hidden(output).detach()

        handles.append(decoder_blocks(model)[layer].register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
