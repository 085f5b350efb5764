"""Can two tokenizers share one decoding loop? LDA needs the same token ids in both models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class IncompatibleTokenizersError(ValueError):
    """The pair's vocabularies differ, so per-token logits cannot be compared."""


@dataclass(frozen=True)
class TokenizerCompatibility:
    compatible: bool
    vocab_size_after: int
    vocab_size_before: int
    vocabs_match: bool
    special_tokens_match: bool
    logits_width_after: int
    logits_width_before: int
    shared_width: int
    warning: str | None = None


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    return {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "unk": tokenizer.unk_token,
    }


def check_compatibility(
    tok_after: Any, tok_before: Any, width_after: int, width_before: int
) -> TokenizerCompatibility:
    """Compare vocab dicts, special tokens and logits widths.

    Same vocab but different logits widths happens with padded embedding matrices; the
    extra rows are never real tokens, so decoding uses the shared (smaller) width.
    """
    vocab_a, vocab_b = tok_after.get_vocab(), tok_before.get_vocab()
    vocabs_match = vocab_a == vocab_b
    specials_match = _special_tokens(tok_after) == _special_tokens(tok_before)
    shared = min(width_after, width_before)
    warnings: list[str] = []
    if not vocabs_match:
        warnings.append(
            f"tokenizers have different vocabularies (after: {len(vocab_a)} tokens, "
            f"before: {len(vocab_b)} tokens); LDA needs identical token ids"
        )
    elif max(vocab_a.values(), default=-1) >= shared:
        vocabs_match = False
        warnings.append(
            f"vocabulary has ids up to {max(vocab_a.values())} but a model's logits are only {shared} wide"
        )
    if not specials_match:
        warnings.append(
            f"special tokens differ (after: {_special_tokens(tok_after)}, "
            f"before: {_special_tokens(tok_before)}); the after tokenizer's are used"
        )
    if vocabs_match and width_after != width_before:
        warnings.append(
            f"logits widths differ ({width_after} vs {width_before}); using the shared width {shared}"
        )
    return TokenizerCompatibility(
        compatible=vocabs_match,
        vocab_size_after=len(vocab_a),
        vocab_size_before=len(vocab_b),
        vocabs_match=vocabs_match,
        special_tokens_match=specials_match,
        logits_width_after=width_after,
        logits_width_before=width_before,
        shared_width=shared,
        warning="; ".join(warnings) or None,
    )
