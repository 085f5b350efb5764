"""Samples to token ids and labels, and right-padded task-major micro-batches.

A sample is plain text (loss on every token after the first) or a chat (loss only on the
assistant turns). Assistant spans come from the tokenizer's own chat template: the characters
between the templated prefix with a generation prompt and the templated prefix through that
turn, mapped to tokens with the fast tokenizer's offsets, so no per-model marker strings are needed.

A sample may also be an object `{"text" | "messages": ..., "loss": "ce" | "kl_base", "weight": w}`:
`loss` picks cross-entropy on the completion tokens (the default) or the forward KL from the frozen
base on the same positions (DIT's stage-1 "answer as the base would" samples), and `weight`
(default 1, finite, >= 0) multiplies the sample's per-token loss (see `weightdiff.train`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100
LOSSES = ("ce", "kl_base")
SAMPLE_FIELDS = {"text", "messages", "loss", "weight"}
Sample = str | list[dict[str, str]] | dict[str, Any]  # text, chat, or a sample object
# torch.Generator.manual_seed takes at most 64 bits; a larger seed would fail the job at start-up.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Task:
    """One diff to train: its samples (plain text, chat messages or sample objects) and its own seed.

    `seed` None takes `TrainConfig.seed + the task's index` (the CLI uses the index in the job
    file, so sharding over processes does not change it).
    """

    samples: Sequence[Sample]
    seed: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.samples, str) or not isinstance(self.samples, Sequence) or not self.samples:
            raise ValueError(f"samples must be a non-empty list, got {self.samples!r:.80}")
        if self.seed is not None:
            check_seed("seed", self.seed)
        for i, sample in enumerate(self.samples):
            check_sample(sample, f"samples[{i}]")
        # All weights 0 means no gradient ever: Adam would never move it and the "diff" is its init.
        if not any(sample_parts(sample)[2] > 0 for sample in self.samples):
            raise ValueError("samples: every sample has weight 0; a task needs one with weight > 0")
        object.__setattr__(self, "samples", tuple(self.samples))


def check_seed(where: str, seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{where} must be an integer in [0, 2**63 - 1], got {seed!r}")


def sample_parts(sample: Sample) -> tuple[str | list[dict[str, str]], str, float]:
    """A checked sample's content (text or messages), loss kind and weight."""
    if not isinstance(sample, dict):
        return sample, "ce", 1.0
    content = sample["text"] if "text" in sample else sample["messages"]
    return content, sample.get("loss", "ce"), float(sample.get("weight", 1.0))


def check_sample(sample: Any, where: str) -> None:
    if isinstance(sample, dict):
        _check_sample_object(sample, where)
        return
    if isinstance(sample, str):
        if not sample.strip():
            raise ValueError(f"{where}: empty text {sample!r}")
        return
    if not isinstance(sample, Sequence) or not sample:
        raise ValueError(f"{where}: expected text or a non-empty list of chat messages, got {sample!r:.80}")
    for j, message in enumerate(sample):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(
                f"{where}[{j}]: expected a message with 'role' and 'content', got {message!r:.80}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}[{j}].content: expected text, got {message.get('content')!r:.80}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in sample):
        raise ValueError(f"{where}: a chat sample needs a non-empty assistant message to learn from")


def _check_sample_object(sample: dict[str, Any], where: str) -> None:
    unknown = sorted(set(sample) - SAMPLE_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} (a sample object has {sorted(SAMPLE_FIELDS)})")
    if ("text" in sample) == ("messages" in sample):
        raise ValueError(
            f"{where}: a sample object needs exactly one of 'text' and 'messages', got {sorted(sample)}"
        )
    loss = sample.get("loss", "ce")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"{where}.loss: expected one of {list(LOSSES)}, got {loss!r}")
    weight = sample.get("weight", 1.0)
    # An int past float's range would overflow in float(); inf and nan fail the comparison.
    finite = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not (finite and 0 <= weight <= sys.float_info.max):
        raise ValueError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
    if "text" in sample:
        if not isinstance(sample["text"], str):
            raise ValueError(f"{where}.text: expected text, got {sample['text']!r:.80}")
        check_sample(sample["text"], f"{where}.text")
    else:
        if isinstance(sample["messages"], str | dict):
            raise ValueError(
                f"{where}.messages: expected a list of chat messages, got {sample['messages']!r:.80}"
            )
        check_sample(sample["messages"], f"{where}.messages")


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]  # IGNORE where a token is not a target; position 0 never is
    loss: str = "ce"  # "kl_base": the targets' positions carry KL to the base instead of CE
    weight: float = 1.0

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def _template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The templated chat and the character spans of its assistant turns (end tokens included)."""
    text = _template(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True)
        through = _template(tokenizer, messages[: i + 1], False)
        # A template that renders earlier turns differently once later ones exist (e.g. one that
        # drops reasoning from past turns) has no prefix structure; refuse instead of guessing.
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(f"chat template does not render message {i} as a prefix of the conversation")
        spans.append((len(before), len(through)))
    return text, spans


def encode_sample(tokenizer: Any, sample: Sample) -> Encoded:
    """Token ids and labels of one sample; raises ValueError when nothing is left to learn."""
    content, loss, weight = sample_parts(sample)
    if isinstance(content, str):
        ids = tokenizer(content, add_special_tokens=True)["input_ids"]
        encoded = Encoded(list(ids), list(ids), loss, weight)
    else:
        text, spans = assistant_spans(tokenizer, list(content))
        # The template already holds any BOS, so no special tokens are added again.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            tok if any(lo <= start < hi for lo, hi in spans) else IGNORE
            for tok, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        encoded = Encoded(ids, labels, loss, weight)
    if encoded.num_targets == 0:
        raise ValueError(f"sample has no tokens to learn after tokenization: {sample!r:.80}")
    return encoded


def micro_batches(
    step_samples: Sequence[Sequence[Encoded]], batch_size: int, max_tokens: int | None
) -> Iterator[list[Encoded | None]]:
    """Split one step's samples into micro-batches of task-major rows (None: a filler row).

    Micro-batch k holds samples `pos .. pos+b-1` of every task; b is `batch_size`, lowered until
    `T * b * padded width` fits `max_tokens`. One sample per task is the floor: the tasks share
    every forward, so a micro-batch cannot be narrower than T rows.
    """
    num_tasks = len(step_samples)
    longest = max(len(samples) for samples in step_samples)
    pos = 0
    while pos < longest:
        b = min(batch_size, longest - pos)
        while max_tokens is not None and b > 1 and num_tasks * b * _width(step_samples, pos, b) > max_tokens:
            b -= 1
        yield [
            samples[pos + j] if pos + j < len(samples) else None for samples in step_samples for j in range(b)
        ]
        pos += b


def _width(step_samples: Sequence[Sequence[Encoded]], pos: int, b: int) -> int:
    return max((len(e.ids) for samples in step_samples for e in samples[pos : pos + b]), default=1)


def collate(
    rows: Sequence[Encoded | None], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels `[N, S]`.

    A filler row is a single attended pad token with no labels: a fully masked row can turn into
    NaNs inside attention, and a NaN times a zero gradient is still NaN.
    """
    width = max((len(r.ids) for r in rows if r is not None), default=1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row is None:
            mask[i, 0] = 1
            continue
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        labels[i, : len(row.labels)] = torch.tensor(row.labels)
        mask[i, : len(row.ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)
