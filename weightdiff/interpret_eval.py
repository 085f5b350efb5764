"""Ask M + W_i (+ L) the interpreter's question: answers, candidate log-probabilities, metrics.

All diffs of a call run as one batch (row i through its own W_i, L shared). Every row holds the
same prompt, so nothing is padded while decoding: prefill once, then one token per step from the
model's own KV cache. A candidate's log-probability is the sum of `log p` over
`tokenizer(candidate, add_special_tokens=False)` after the prompt's ids (the chat template with
the generation prompt, end-of-turn tokens not included), so any client can recompute it.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weightdiff.interpret_train import DEFAULT_QUESTION, _takes_logits_to_keep, batch_loss, encode_pair, prompt_ids
from weightdiff.interpreter import Diff, check_diff, clear_diffs, interpreting, linear_shapes, set_diffs

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as on the generation routes


@dataclass(frozen=True)
class Description:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # one per candidate, in the order given


def describe(
    model: nn.Module,
    tokenizer: Any,
    diffs: Sequence[Diff | None],
    interpreter: Diff | None = None,
    *,
    question: str = DEFAULT_QUESTION,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int | None = None,
    candidates: Sequence[str] = (),
    template_kwargs: Mapping[str, Any] | None = None,
    max_rows: int = 256,
) -> list[Description]:
    """Each diff's answer to `question` and the log-probabilities of `candidates` (model left as it was).

    Args:
        diffs: one row each; None is no diff (with `interpreter`, the M + L baseline).
        interpreter: L; None asks M + W alone (DIT's "base question" baseline).
        temperature: 0 decodes greedily; above, row i samples with seed `seed + i`.
        max_rows: rows per forward; more diffs (or diffs x candidates) run in several batches.
    """
    if not diffs:
        raise ValueError("diffs: need at least one diff (or None for no diff)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    shapes = linear_shapes(model)
    for i, diff in enumerate(diffs):
        if diff is not None:
            check_diff(shapes, diff, f"diffs[{i}]")
    prompt = prompt_ids(tokenizer, question, template_kwargs)
    candidate_ids = [_candidate_ids(tokenizer, c, f"candidates[{k}]") for k, c in enumerate(candidates)]
    _check_context(model, len(prompt) + max(max_new_tokens, *map(len, candidate_ids), 0))
    generators = _generators(len(diffs), temperature, seed)
    was_training = model.training
    model.eval()
    try:
        with interpreting(model, interpreter), torch.inference_mode():
            tokens = []
            for lo in range(0, len(diffs), max_rows):
                rows = generators[lo : lo + max_rows] if generators is not None else None
                chunk = diffs[lo : lo + max_rows]
                stop = _stop_ids(model, tokenizer)
                tokens += _generate(model, prompt, chunk, max_new_tokens, temperature, rows, stop)
            logprobs = _score(model, tokenizer, prompt, candidate_ids, diffs, max_rows)
    finally:
        model.train(was_training)
    return [
        Description(tokenizer.decode(t, skip_special_tokens=True), tuple(t), tuple(lp))
        for t, lp in zip(tokens, logprobs, strict=True)
    ]


def _candidate_ids(tokenizer: Any, candidate: str, where: str) -> list[int]:
    ids = []
    if isinstance(candidate, str):
        ids = list(tokenizer(candidate, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"{where}: {candidate!r} has no tokens")
    return ids


def _check_context(model: nn.Module, length: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise ValueError(
            f"the prompt plus the answer or a candidate is {length} tokens, the model's context is {limit}"
        )


def _generators(rows: int, temperature: float, seed: int | None) -> list[torch.Generator] | None:
    if temperature < GREEDY_BELOW:
        return None
    base = random.SystemRandom().randrange(2**62) if seed is None else seed
    return [torch.Generator().manual_seed(base + i) for i in range(rows)]


def _stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Every EOS id the tokenizer and the generation config name (e.g. Qwen's <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list | tuple) else {configured}
    return {i for i in ids if i is not None}


def _generate(
    model: nn.Module,
    prompt: list[int],
    diffs: Sequence[Diff | None],
    max_new_tokens: int,
    temperature: float,
    generators: list[torch.Generator] | None,
    stop_ids: set[int],
) -> list[list[int]]:
    """Decode every row from the same prompt; a row stops at its first stop id (not kept)."""
    tokens: list[list[int]] = [[] for _ in diffs]
    if max_new_tokens == 0:
        return tokens
    device = model.get_input_embeddings().weight.device
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    done = [False] * len(diffs)
    set_diffs(model, diffs)
    try:
        out = model(input_ids=torch.tensor([prompt] * len(diffs), device=device), use_cache=True, **keep)
        for step in range(max_new_tokens):
            chosen = _choose(out.logits[:, -1], temperature, generators)
            for i, token in enumerate(chosen):
                if not done[i]:
                    done[i] = token in stop_ids
                    if not done[i]:
                        tokens[i].append(token)
            if all(done) or step + 1 == max_new_tokens:
                break
            ids = torch.tensor(chosen, device=device)[:, None]
            out = model(input_ids=ids, past_key_values=out.past_key_values, use_cache=True, **keep)
    finally:
        clear_diffs(model)
    return tokens


def _choose(logits: torch.Tensor, temperature: float, generators: list[torch.Generator] | None) -> list[int]:
    """Greedy (first maximum), or one draw per row from its own generator."""
    logits = logits.float()
    if generators is None:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, -1).cpu()
    return [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in enumerate(generators)]


def _score(
    model: nn.Module,
    tokenizer: Any,
    prompt: list[int],
    candidate_ids: list[list[int]],
    diffs: Sequence[Diff | None],
    max_rows: int,
) -> list[list[float]]:
    """`[diff][candidate]` summed log-probabilities, teacher-forced.

    The prompt runs once per diff; its KV cache is then repeated for the diff's K candidates, so a
    candidate costs its own tokens only (the prompt is most of a row: DIT's question is ~15 tokens,
    a topic 1-3). Candidates are right-padded: a pad comes after every real token of its row, so
    the causal mask keeps it out of what they see, and its prediction is dropped.
    """
    if not candidate_ids:
        return [[] for _ in diffs]
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    device = model.get_input_embeddings().weight.device
    k, width = len(candidate_ids), max(map(len, candidate_ids))
    cand = torch.tensor([c + [pad_id] * (width - len(c)) for c in candidate_ids], device=device)
    real = torch.tensor([[j < len(c) for j in range(width)] for c in candidate_ids], device=device)
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    per_chunk = max(1, max_rows // k)
    out: list[list[float]] = []
    for lo in range(0, len(diffs), per_chunk):
        chunk = diffs[lo : lo + per_chunk]
        set_diffs(model, chunk)  # rows are diff-major: diff d's candidates are rows d*K .. d*K+K-1
        try:
            first = model(input_ids=torch.tensor([prompt] * len(chunk), device=device), use_cache=True, **keep)
            cache = first.past_key_values
            cache.batch_repeat_interleave(k)
            # the first candidate token is predicted by the prompt's last position
            logits = first.logits[:, -1:].repeat_interleave(k, 0)
            if width > 1:
                rest = model(input_ids=cand[:, :-1].repeat(len(chunk), 1), past_key_values=cache, use_cache=True)
                logits = torch.cat([logits, rest.logits], 1)
        finally:
            clear_diffs(model)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = cand.repeat(len(chunk), 1)
        picked = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
        sums = torch.where(real.repeat(len(chunk), 1), picked, 0.0).sum(1).view(len(chunk), -1)
        out += sums.double().cpu().tolist()
    return out


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, strip, and drop trailing punctuation ("Cats." == "cats")."""
    text = " ".join(text.lower().split())
    while text and (unicodedata.category(text[-1]).startswith("P") or text[-1].isspace()):
        text = text[:-1]
    return text


@dataclass(frozen=True)
class Evaluated:
    description: str
    text: str
    exact: bool  # normalise(text) == normalise(description)
    candidate: str | None  # the most likely candidate (None without candidates)
    correct: bool | None  # that candidate is the description


@dataclass(frozen=True)
class Evaluation:
    items: list[Evaluated]
    chance: float | None  # 1 / number of candidates

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def exact_hits(self) -> int:
        return sum(item.exact for item in self.items)

    @property
    def candidate_hits(self) -> int | None:
        return None if self.chance is None else sum(bool(item.correct) for item in self.items)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[Diff | None, str]],
    interpreter: Diff | None,
    *,
    candidates: Sequence[str] | None = None,
    question: str = DEFAULT_QUESTION,
    max_new_tokens: int = 20,
    template_kwargs: Mapping[str, Any] | None = None,
    max_rows: int = 256,
) -> Evaluation:
    """Greedy answers and candidate choices for `(diff, description)` pairs, one batch.

    A diff that appears in several pairs (by identity; None included) is asked once: with greedy
    decoding its answer is the same, so the M + L baseline (every diff None) costs one row.
    """
    if not pairs:
        raise ValueError("pairs: need at least one pair")
    keys = [normalise(c) for c in candidates or ()]
    for i, (_, description) in enumerate(pairs):
        if candidates and normalise(description) not in keys:
            raise ValueError(f"pairs[{i}].description: {description!r} is not among the candidates")
    distinct: dict[int | None, Diff | None] = {}
    for diff, _ in pairs:
        distinct.setdefault(None if diff is None else id(diff), diff)
    answers = describe(
        model,
        tokenizer,
        list(distinct.values()),
        interpreter,
        question=question,
        max_new_tokens=max_new_tokens,
        candidates=list(candidates or ()),
        template_kwargs=template_kwargs,
        max_rows=max_rows,
    )
    by_key = dict(zip(distinct, answers, strict=True))
    items = []
    for diff, description in pairs:
        answer = by_key[None if diff is None else id(diff)]
        best = None if not candidates else candidates[max(range(len(keys)), key=answer.logprobs.__getitem__)]
        items.append(
            Evaluated(
                description,
                answer.text,
                normalise(answer.text) == normalise(description),
                best,
                None if best is None else normalise(best) == normalise(description),
            )
        )
    return Evaluation(items, 1 / len(candidates) if candidates else None)


def pairs_loss(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[Diff | None, str]],
    interpreter: Diff | None,
    *,
    question: str = DEFAULT_QUESTION,
    template_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 8,
) -> float:
    """The training loss (mean target-token cross-entropy) of `pairs` under L, without gradients."""
    if not pairs:
        raise ValueError("pairs: need at least one pair")
    encoded = [encode_pair(tokenizer, question, d, template_kwargs) for _, d in pairs]
    prompt_len = len(prompt_ids(tokenizer, question, template_kwargs))
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with interpreting(model, interpreter), torch.inference_mode():
            for lo in range(0, len(pairs), batch_size):
                diffs = [diff for diff, _ in pairs[lo : lo + batch_size]]
                loss, n = batch_loss(model, encoded[lo : lo + batch_size], diffs, prompt_len, pad_id)
                total, count = total + loss.item(), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)
