"""What the diffing toolkit's methods read: tokenized samples and a layer, as it builds them.

Text rows follow its `load_and_tokenize_dataset`: the text cut to 10·n characters, encoded with
special tokens, exactly the first n tokens kept, shorter texts dropped. Chat rows follow
`load_and_tokenize_chat_dataset`: a user turn and an assistant turn, the conversation kept up to
n tokens past the assistant's start, and the positions analysed counted from the assistant's
start (-k..-1 are the template tokens just before it). Matching its rules keeps our statistics
comparable with its published runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The toolkit skips chat rows whose user turn alone is longer than this (in tokens).
MAX_USER_TOKENS = 512


@dataclass(frozen=True)
class Sample:
    """One row fed to both models: `ids`, and the indices into them that are analysed."""

    index: int  # the row's place in the source (before rows were dropped)
    ids: tuple[int, ...]
    positions: tuple[int, ...]


def tokenize_texts(tokenizer: Any, texts: Iterable[str], n: int, max_samples: int) -> list[Sample]:
    """Samples of exactly `n` tokens (BOS included when the tokenizer adds one); positions 0..n-1."""
    samples: list[Sample] = []
    for index, text in enumerate(texts):
        if len(samples) >= max_samples:
            break
        if not text:
            continue
        ids = tokenizer.encode(text[: 10 * n], add_special_tokens=True)
        if len(ids) < n:
            continue
        samples.append(Sample(index, tuple(ids[:n]), tuple(range(n))))
    return samples


def chat_positions(assistant_start: int, n: int, pre_assistant_k: int) -> tuple[int, ...]:
    """Positions -k..n-1 around the assistant's start, as indices into the ids."""
    return tuple(assistant_start + p for p in range(-pre_assistant_k, n))


def tokenize_chats(
    tokenizer: Any,
    rows: Iterable[Sequence[dict[str, Any]]],
    n: int,
    max_samples: int,
    pre_assistant_k: int = 3,
    positions: int | None = None,
) -> list[Sample]:
    """Samples from [user, assistant] conversations.

    The ids run to `assistant_start + n`; rows whose assistant turn is shorter than n tokens, whose
    user turn exceeds 512 tokens, or that do not start user-then-assistant are dropped. The analysed
    positions are -k..n-1 around the assistant start, cut to the first `positions` of them when
    given (mining keeps the first n, as the toolkit slices its diff: the last k fall off).
    """
    samples: list[Sample] = []
    for index, messages in enumerate(rows):
        if len(samples) >= max_samples:
            break
        if len(messages) < 2 or messages[0].get("role") != "user" or messages[1].get("role") != "assistant":
            continue
        user = {"role": "user", "content": messages[0].get("content", "")}
        assistant = {"role": "assistant", "content": str(messages[1].get("content", ""))[: 10 * n]}
        user_ids = _template_ids(tokenizer, [user], add_generation_prompt=True)
        if len(user_ids) > MAX_USER_TOKENS:
            continue
        full = _template_ids(tokenizer, [user, assistant], add_generation_prompt=False)
        start = len(user_ids)
        if len(full) - start < n or start < pre_assistant_k:
            continue
        picked = chat_positions(start, n, pre_assistant_k)
        samples.append(Sample(index, tuple(full[: start + n]), picked[:positions] if positions else picked))
    return samples


def _template_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def resolve_layer(layer: int | float, num_layers: int, where: str = "layer") -> int:
    """A decoder block: an int is absolute, a float in [0, 1] relative, `int(x * (num_layers - 1))`.

    Rounded down, as the toolkit's `get_layer_indices` does (its agent prompt says "nearest").
    """
    if isinstance(layer, bool):
        raise ValueError(f"{where}: must be an integer block or a fraction in [0, 1], got {layer!r}")
    if isinstance(layer, int):
        if not 0 <= layer < num_layers:
            raise ValueError(f"{where}: block {layer} is out of range (the model has blocks 0..{num_layers - 1})")
        return layer
    if isinstance(layer, float):
        if not 0.0 <= layer <= 1.0:
            raise ValueError(f"{where}: a relative layer must be in [0, 1], got {layer}")
        return int(layer * (num_layers - 1))
    raise ValueError(f"{where}: must be an integer block or a fraction in [0, 1], got {layer!r}")


def analysed(samples: Sequence[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, width] of each sample's analysed positions, valid [B, width]): rows analysing
    fewer positions are padded with index 0, marked invalid."""
    index = [list(s.positions) + [0] * (width - len(s.positions)) for s in samples]
    valid = [[True] * len(s.positions) + [False] * (width - len(s.positions)) for s in samples]
    return torch.tensor(index, dtype=torch.long), torch.tensor(valid, dtype=torch.bool)
