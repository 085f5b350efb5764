"""Incremental detokenization: the streamed pieces add up to the completion, for every tokenizer kind.

SentencePiece-like tokenizers are the hard case: a decode drops the leading space of its first token
only, and byte-fallback tokens make a character only once all its bytes have arrived.
"""

from __future__ import annotations

import functools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lda import LDAModelPair, Row, RowOutput, SamplingParams, Side, TokenEvent
from lda.decode import TextTracker
from tests.tiny import CORPUS, tiny_llama, tiny_tokenizer

NON_ASCII = "Un café coûte 2 € → naïve señor, 日本 ok."
PROMPTS = ["Hello world", "The quick brown fox", NON_ASCII, "a"]
KINDS = ["byte_level", "metaspace", "llama"]


@functools.cache
def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    return tiny_tokenizer() if kind == "byte_level" else sentencepiece_tokenizer(kind)


def sentencepiece_tokenizer(decoder: str) -> PreTrainedTokenizerFast:
    """A Unigram over the corpus words with '▁' for spaces; other characters fall back to UTF-8 bytes.

    `decoder` is "metaspace" (decoders.Metaspace) or "llama" (Llama 2's Replace, ByteFallback, Fuse,
    Strip sequence); both drop the leading space of the first token of a decode.
    """
    words = sorted({w for text in CORPUS for w in text.split()} | {"café", "ok."})
    chars = sorted({c for w in words for c in w})
    pieces = [(t, 0.0) for t in ("<pad>", "<s>", "</s>", "<unk>")]
    # Byte tokens for ASCII and for the test's non-ASCII characters only (Llama has all 256), so
    # that a random model samples valid UTF-8 often enough to compare with a whole decode.
    pieces += [(f"<0x{b:02X}>", -20.0) for b in sorted(set(range(128)) | set(NON_ASCII.encode()))]
    pieces += [("▁", -4.0)] + [(c, -5.0) for c in chars] + [("▁" + w, -1.0) for w in words]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    if decoder == "metaspace":
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    else:
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module", params=KINDS)
def kind_pair(request):
    tok = make_tokenizer(request.param)
    return LDAModelPair(Side("a", tiny_llama(tok, seed=5), tok), Side("b", tiny_llama(tok, seed=6), tok))


def decode_text(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream_rows(
    pair: LDAModelPair, rows: list[Row], max_new: int, stop=()
) -> tuple[list[str], list[RowOutput]]:
    """Run a decode; return each row's streamed text (token pieces, then the tail) and its output."""
    config = pair.decode_config(max_new, SamplingParams(1.0), stop)
    streamed, outputs = [""] * len(rows), [None] * len(rows)
    for event in pair.lda_events(rows, config):
        if isinstance(event, TokenEvent):
            streamed[event.row] += event.text
        else:
            streamed[event.row] += event.tail
            outputs[event.row] = event
    return streamed, outputs


def test_the_tokenizer_is_sentencepiece_like():
    tok = sentencepiece_tokenizer("metaspace")
    ids = tok(NON_ASCII, add_special_tokens=False)["input_ids"]
    assert decode_text(tok, ids) == NON_ASCII
    pieces = tok.convert_ids_to_tokens(ids)
    assert "<0xE2>" in pieces and "▁café" in pieces
    world = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert decode_text(tok, world[1:]) == "world"  # alone, the leading space is dropped


def test_stream_adds_up_to_the_completion_for_every_row(kind_pair):
    tok = kind_pair.after.tokenizer
    rows = [
        Row(tuple(tok(p, add_special_tokens=False)["input_ids"]), alpha, seed)
        for p in PROMPTS
        for alpha, seed in ((0.0, 1), (-1.0, 2), (1.0, 3), (4.0, 4))
    ]
    streamed, outputs = stream_rows(kind_pair, rows, max_new=16)
    checked = spaced = 0
    for row, got, out in zip(rows, streamed, outputs):
        assert got == out.text, (tok.convert_ids_to_tokens(out.token_ids), got, out.text)
        # After a prompt, a first token that starts a word keeps its space ("Hello" + " world").
        first = tok.convert_ids_to_tokens(out.token_ids[0]) if out.token_ids else ""
        if first[:1] in ("▁", "Ġ"):
            assert out.text.startswith(" "), out.text
            spaced += 1
        # The prompt's text plus the completion is the whole sequence's text (the response's `text`),
        # wherever the completion is valid UTF-8 (invalid byte runs decode differently in context).
        whole = decode_text(tok, row.prompt_ids + tuple(out.token_ids))
        if "\ufffd" not in whole:
            assert decode_text(tok, row.prompt_ids) + out.text == whole
            checked += 1
    assert checked >= 4 and spaced >= 2


@pytest.mark.parametrize("kind", KINDS[1:])
def test_completion_after_a_prompt_keeps_its_leading_space_and_multibyte_characters(kind):
    tok = sentencepiece_tokenizer(kind)
    prompt = tok("Hello world", add_special_tokens=False)["input_ids"]
    completion = tok(NON_ASCII, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tok, [], prompt)
    pieces = [tracker.push(t)[0] for t in completion]
    tail = tracker.finish()
    assert "".join(pieces) + tail == tracker.text == " " + NON_ASCII
    assert all("\ufffd" not in p for p in pieces)  # half characters wait for their last byte
    # At the very start of a text (no prompt context) the first leading space is dropped, as in decode.
    alone = TextTracker(tok, [])
    assert "".join(alone.push(t)[0] for t in completion) + alone.finish() == NON_ASCII


def test_half_a_character_at_the_end_is_released_by_finish():
    tok = sentencepiece_tokenizer("metaspace")
    tracker = TextTracker(tok, [], tok("ok", add_special_tokens=False)["input_ids"])
    euro = tok.convert_tokens_to_ids(["<0xE2>", "<0x82>"])  # the first two bytes of "€"
    assert [tracker.push(t) for t in euro] == [("", False), ("", False)]
    assert tracker.finish() == tracker.text == decode_text(tok, euro)


def push_all(tracker: TextTracker, ids) -> tuple[str, int | None]:
    """Push ids until a stop string hits; return the streamed text and the index of the hitting id."""
    streamed = ""
    for i, t in enumerate(ids):
        delta, hit = tracker.push(t)
        streamed += delta
        if hit:
            return streamed + tracker.finish(), i
    return streamed + tracker.finish(), None


@pytest.mark.parametrize("kind", KINDS)
def test_stop_string_split_across_two_tokens_is_found(kind):
    tok = make_tokenizer(kind)
    ids = tok("Hello world, this is a small test", add_special_tokens=False)["input_ids"]
    text = decode_text(tok, ids)
    first, second = decode_text(tok, ids[:1]), decode_text(tok, ids[:2])
    stop = second[len(first) - 2 : len(first) + 3]  # "lo wo": two characters of one token, three of the next
    assert stop == "lo wo"
    streamed, at = push_all(TextTracker(tok, [stop]), ids)
    assert at == 1 and streamed == text[: text.find(stop)] == "Hel"


@pytest.mark.parametrize("kind", KINDS)
def test_each_stop_string_is_found_once_at_its_first_occurrence(kind):
    tok = make_tokenizer(kind)
    ids = tok("the dog and the fox and the dog", add_special_tokens=False)["input_ids"]
    text = decode_text(tok, ids)
    for stop in ["the", "dog", "and the", "e d", "x", "og", "the fox", "nope"]:
        streamed, at = push_all(TextTracker(tok, [stop]), ids)
        cut = text.find(stop)
        assert streamed == (text[:cut] if cut >= 0 else text), stop
        # The hit comes on the first token whose text completes the stop string, not later.
        expected = next((i for i in range(len(ids)) if stop in decode_text(tok, ids[: i + 1])), None)
        assert at == expected, stop
    # Several stop strings: the earliest occurrence of any of them wins.
    streamed, _ = push_all(TextTracker(tok, ["fox", "and"]), ids)
    assert streamed == "the dog "


def test_stop_strings_through_the_decode_loop(kind_pair):
    tok = kind_pair.after.tokenizer
    rows = [
        Row(tuple(tok(p, add_special_tokens=False)["input_ids"]), 1.0, seed)
        for p in PROMPTS
        for seed in (7, 8)
    ]
    _, free = stream_rows(kind_pair, rows, max_new=30)
    for row, out in zip(rows, free):
        stop = out.text[4:6]
        if not stop:
            continue
        (streamed,), (got,) = stream_rows(kind_pair, [row], max_new=30, stop=[stop])
        assert got.finish_reason == "stop" and streamed == got.text == out.text[: out.text.find(stop)]


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids handed to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_push_decodes_a_short_window_not_the_whole_completion(kind):
    tok = make_tokenizer(kind)
    ids = tok(" ".join(CORPUS) + " " + NON_ASCII, add_special_tokens=False)["input_ids"]
    assert len(ids) > 250
    counting = CountingTokenizer(tok)
    tracker = TextTracker(counting, ["never appears"], ids[:8])
    streamed = "".join(tracker.push(t)[0] for t in ids) + tracker.finish()
    assert counting.decoded <= 12 * len(ids), counting.decoded / len(ids)
    assert streamed == tracker.text


def test_a_run_of_invalid_bytes_does_not_grow_the_window():
    tok = make_tokenizer("metaspace")
    counting = CountingTokenizer(tok)
    tracker = TextTracker(counting, [], tok("ok", add_special_tokens=False)["input_ids"])
    continuation = tok.convert_tokens_to_ids("<0x82>")  # never valid on its own
    streamed = "".join(tracker.push(continuation)[0] for _ in range(200)) + tracker.finish()
    assert streamed == tracker.text == "\ufffd" * 200
    assert counting.decoded <= 32 * 200
