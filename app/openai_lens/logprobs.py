"""Token strings and OpenAI's two logprobs layouts (completions and chat).

A token's string is what it adds to the text after its predecessors: decoded with the few ids
before it as context (as vLLM's incremental detokenizer does), so SentencePiece tokens keep their
leading space. Special tokens (BOS, EOS) keep their own text here, though the completion text
drops them; `text_offset` counts the token strings one after another, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lda import TokenLogprobs

CONTEXT = 5  # ids of left context: enough for a decoder's spacing rules (lda.decode.PROMPT_CONTEXT)


def piece(tokenizer: Any, context: Sequence[int], token: int) -> str:
    left = list(context[-CONTEXT:])
    before = tokenizer.decode(left, skip_special_tokens=False) if left else ""
    whole = tokenizer.decode([*left, token], skip_special_tokens=False)
    return whole[len(before) :] if whole.startswith(before) else tokenizer.decode([token])


class Pieces:
    """Token strings of one sequence, each in the context of the ids before it."""

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context[-CONTEXT:])

    def push(self, entry: TokenLogprobs) -> tuple[str, list[tuple[str, float]]]:
        """The entry's token string and its top alternatives as (string, logprob)."""
        context = self.ids
        top = [(piece(self.tokenizer, context, t), lp) for t, lp in entry.top]
        text = piece(self.tokenizer, context, entry.token_id)
        self.ids = [*context, entry.token_id][-CONTEXT:]
        return text, top

    def skip(self, token: int) -> None:
        """A token without logprobs (a prompt's first): context only."""
        self.ids = [*self.ids, token][-CONTEXT:]


def completion_logprobs(
    tokenizer: Any,
    entries: Sequence[TokenLogprobs | None],
    context: Sequence[int] = (),
    first_id: int | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """`{tokens, token_logprobs, top_logprobs, text_offset}` of tokens that follow `context`; a
    None entry (an echoed prompt's first token, `first_id`) has null logprobs. The chosen token is
    always among its position's top_logprobs, as OpenAI documents."""
    pieces = Pieces(tokenizer, context)
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        out["text_offset"].append(offset)
        if entry is None:
            assert first_id is not None, "a None entry needs first_id"
            token = piece(tokenizer, pieces.ids, first_id)
            pieces.skip(first_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            token, top = pieces.push(entry)
            out["tokens"].append(token)
            out["token_logprobs"].append(entry.amplified)
            out["top_logprobs"].append({**dict(top), token: entry.amplified})
        offset += len(token)
    return out


def chat_entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    def one(t: str, lp: float) -> dict[str, Any]:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


def chat_logprobs(
    tokenizer: Any, entries: Sequence[TokenLogprobs], context: Sequence[int], top: int
) -> dict[str, Any]:
    """`{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""
    pieces = Pieces(tokenizer, context)
    content = []
    for entry in entries:
        token, alternatives = pieces.push(entry)
        content.append(chat_entry(token, entry.amplified, alternatives[:top]))
    return {"content": content}
