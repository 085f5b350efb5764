"""The synchronized-KV decode loop.

Reads like gpt-fast: prefill both models once, then loop sample -> yield -> stop check ->
decode_one_token. Each model keeps its own KV cache on the same token sequence. Rows
(prompts x alphas x samples) decode together, left-padded; rows that share a prompt share its
one prefill (the caches are then expanded to one row each), and a finished row is dropped from
the batch and from both caches so it stops costing work.

The loop talks to the models through `LogitsSource`, so adapter mode (one model, adapter
off/on as two rows of one forward) plugs in as another source without touching the loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lda.cache_ops import join_masks, padding_columns
from lda.sampling import NON_FINITE, NonFiniteLogitsError, SamplingParams, logit_diff, sample


class LogitsSource(Protocol):
    """Where per-step logits come from. Returns (after, before) as [B, V]; before may be None."""

    device: torch.device

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def decode_one_token(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def keep_rows(self, rows: torch.Tensor) -> None:
        """The batch becomes rows `rows` of the current one, in that order; an index may repeat."""
        ...

    def crop(self, length: int) -> None:
        """Drop cached positions past `length` (a forward that failed part-way wrote some)."""
        ...


@dataclass(frozen=True)
class Row:
    """One decoded sequence: its prompt ids, amplification and seed."""

    prompt_ids: tuple[int, ...]
    alpha: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int
    sampling: SamplingParams
    eos_ids: frozenset[int]
    stop: tuple[str, ...] = ()
    details: bool = False
    pad_id: int = 0
    top_logprobs: int = 0  # with details: also the k most likely tokens of the amplified distribution

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under each distribution (before temperature, top-k and top-p, as
    OpenAI's and vLLM's logprobs are) and, when asked, the most likely tokens of the amplified one."""

    token_id: int
    after: float
    before: float | None
    amplified: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, amplified logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    """A sampled token and the text it made safe to show (may be empty)."""

    row: int
    token_id: int
    text: str
    logprobs: TokenLogprobs | None = None  # with `details`


@dataclass
class RowOutput:
    row: int
    token_ids: list[int]
    text: str
    tokens_generated: int
    finish_reason: str  # "eos" | "stop" | "length"
    logprobs: list[TokenLogprobs] | None = None
    tail: str = ""  # text held back from the token events (a stop-string prefix); stream it last

    @property
    def stopped_early(self) -> bool:
        return self.finish_reason != "length"


# Prompt tokens decoded ahead of a completion (as vLLM does), so that its first token gets the
# spacing it has after the prompt: SentencePiece decoders drop the leading space of a decode's
# first token only.
PROMPT_CONTEXT = 5
# A UTF-8 character has at most 4 bytes, so of this many new ids whose text still ends in U+FFFD
# at most 3 can be waiting for the rest of a character; the others are invalid bytes. Emit them
# then: waiting longer would make every push decode a longer window.
MAX_PENDING = 8


class TextTracker:
    """Incremental detokenization with stop strings.

    Like vLLM's `detokenize_incrementally`, each push decodes only a short window of ids: the
    window's already-read ids (which give the new ones their spacing) and the new ids. What the
    new ids add is appended to `text` and never re-decoded, so the streamed pieces and the final
    text are the same string by construction, for every tokenizer. New ids that end in half a
    UTF-8 character stay in the window until the character is complete; text that might still
    become a stop string is held back from streaming until the next token decides it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        # A stop string completed by new text starts at most this many characters before it.
        self.lookback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._window = list(prompt_ids[-PROMPT_CONTEXT:])
        self._read = len(self._window)  # _window[:_read] is already text (or prompt)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (newly safe text, whether a stop string was hit)."""
        self.ids.append(token_id)
        self._window.append(token_id)
        new = self._new_text()
        pending = len(self._window) - self._read
        if not new or (new.endswith("\ufffd") and pending < MAX_PENDING):
            return "", False  # nothing yet, or half a character: wait for the next token
        self._advance()
        return self._append(new)

    def finish(self) -> str:
        """End of the row: return all text not streamed yet, a trailing half character as U+FFFD."""
        delta = "" if self.stopped else self._append(self._new_text())[0]
        return delta + self._flush()

    def _flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of tokenization spaces: it rewrites text across token boundaries
        # (" ," -> ","), so pieces decoded apart would not add up to the text decoded whole.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self) -> str:
        """The text the window's unread ids add after its read ones."""
        read = self._decode(self._window[: self._read])
        whole = self._decode(self._window)
        return whole[len(read) :] if len(whole) > len(read) else ""

    def _advance(self) -> None:
        """The unread ids become the read context of the next window; older ids are dropped."""
        del self._window[: self._read]
        self._read = len(self._window)

    def _append(self, new: str) -> tuple[str, bool]:
        """Add decoded text; look for stop strings only where `new` can complete one."""
        start = max(len(self.text) - self.lookback, 0)
        self.text += new
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._flush(), True
        safe = len(self.text) - self._held_back()
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def _held_back(self) -> int:
        """Length of the longest stop-string prefix the text ends with."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts; positions count real tokens only so padding never shifts RoPE."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def distinct_prompts(rows: Sequence[Row]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The distinct prompts in first-seen order, and for each row the index of its prompt."""
    where: dict[tuple[int, ...], int] = {}
    index = [where.setdefault(r.prompt_ids, len(where)) for r in rows]
    return list(where), index


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass
class _RowState:
    row: int
    tracker: TextTracker
    generated: int = 0
    logprobs: list[TokenLogprobs] | None = field(default=None)

    def output(self, reason: str) -> RowOutput:
        tail = self.tracker.finish()
        return RowOutput(
            row=self.row,
            token_ids=list(self.tracker.ids),
            text=self.tracker.text,
            tokens_generated=self.generated,
            finish_reason=reason,
            logprobs=self.logprobs,
            tail=tail,
        )


def token_logprobs(
    token: int, after: torch.Tensor, before: torch.Tensor | None, amplified: torch.Tensor, top: int = 0
) -> TokenLogprobs:
    """Logprobs of `token` from one position's [V] logits of each distribution."""
    amp = amplified.float().log_softmax(-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(amp, min(top, amp.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist()))
    before_lp = None if before is None else float(before.float().log_softmax(-1)[token])
    return TokenLogprobs(token, float(after.float().log_softmax(-1)[token]), before_lp, float(amp[token]), best)


def prefill_rows(
    source: LogitsSource, rows: Sequence[Row], pad_id: int, share: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prefill each distinct prompt once and give every row its prompt's logits, mask and positions.

    Returns (after, before, attention mask, position ids) with one row per row, and the cache
    row of each row: None when every row has its own. The caches are expanded later, by the
    first `keep_rows` (a copy per row: a row's keys and values are its prompt's, bit for bit),
    so nothing is copied when no decode step follows. The padded width is the longest prompt's,
    as when every row is prefilled.
    """
    if share:
        prompts, index = distinct_prompts(rows)
    else:
        prompts, index = [r.prompt_ids for r in rows], list(range(len(rows)))
    ids, mask, positions = left_pad(prompts, pad_id, source.device)
    after, before = source.prefill(ids, mask, positions)
    if len(prompts) == len(rows):
        return after, before, mask, positions, None
    cache_rows = torch.tensor(index, device=source.device)
    before = None if before is None else before[cache_rows]
    return after[cache_rows], before, mask[cache_rows], positions[cache_rows], cache_rows


def greedy_tokens(amplified: torch.Tensor) -> list[int]:
    """Each row's argmax, or -1 where the row has no finite maximum (a NaN, +inf, or nothing but
    -inf: where sampling's softmax would not be finite either). One device sync for the batch."""
    finite = torch.isfinite(amplified.amax(-1))
    return torch.where(finite, amplified.argmax(-1), -1).tolist()


@dataclass(frozen=True)
class RowFailed:
    """A batched request's rows could not be decoded (non-finite logits, or a step out of memory)."""

    row: int
    error: Exception


@dataclass
class _Live:
    """One row in the running batch: whose it is, its text and its sampling."""

    ticket: Any  # the request it belongs to (None for a plain `decode`)
    state: _RowState
    generator: torch.Generator
    config: DecodeConfig


class RunningBatch:
    """A decode batch that rows join at step boundaries and leave as they finish (continuous
    batching). Each row keeps its own seed, sampling, stopping and stop strings, so its tokens do
    not depend on its neighbours: only the padding its caches carry differs, which the attention
    mask removes.

    `make_source()` gives a logits source on the same models with empty caches; every `admit`
    after the first prefills into a fresh one and joins it to the running source (left re-padding,
    `lda.cache_ops`). `step()` samples one token for every row and advances the batch.
    """

    def __init__(self, make_source: Any, tokenizer: Any) -> None:
        self.make_source = make_source
        self.tokenizer = tokenizer
        self.source: Any = None
        self.live: list[_Live] = []
        self.cancelled: set[Any] = set()
        self.cache_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.live)

    @property
    def can_join(self) -> bool:
        return not self.live or bool(getattr(self.source, "repaddable", False))

    def admit(
        self, rows: Sequence[Row], config: DecodeConfig, ticket: Any = None, share_prefill: bool = True
    ) -> None:
        """Prefill `rows` (each distinct prompt once) and add them to the batch; their events carry
        `ticket` and their index in `rows`."""
        self.admit_all([(rows, config, ticket)], share_prefill)

    def admit_all(
        self, works: Sequence[tuple[Sequence[Row], DecodeConfig, Any]], share_prefill: bool = True
    ) -> None:
        """Admit several requests (rows, config, ticket) with one prefill forward: each distinct
        prompt once across them, then one join to the running batch."""
        for rows, _, _ in works:
            if not rows:
                raise ValueError("decode needs at least one row")
            if any(len(r.prompt_ids) == 0 for r in rows):
                raise ValueError("every row needs at least one prompt token")
        if not self.can_join:
            raise ValueError("this model's caches cannot be re-padded: its rows cannot join a running batch")
        source = self.make_source()
        device = source.device
        lives = [
            _Live(ticket, _RowState(i, TextTracker(self.tokenizer, config.stop, r.prompt_ids)),
                  _generator(r.seed, device), config)
            for rows, config, ticket in works
            for i, r in enumerate(rows)
        ]  # fmt: skip
        for live in lives:
            live.state.logprobs = [] if live.config.details else None
        rows = [r for work_rows, _, _ in works for r in work_rows]
        # Padding is masked out, so any of the configs' pad ids gives the same logits.
        after, before, mask, positions, cache_rows = prefill_rows(source, rows, works[0][1].pad_id, share_prefill)
        alphas = torch.tensor([r.alpha for r in rows], dtype=torch.float32, device=device)
        if not self.live:
            self.source, self.live, self.cache_rows = source, lives, cache_rows
            self.after, self.before, self.mask, self.alphas = after, before, mask, alphas
            self.last_pos = positions[:, -1:]
            return
        # Joining: both batches' caches become one row per row first (a shared prefill expanded;
        # this changes no row's values). Everything else the join allocates comes before the one
        # call that changes the running caches, itself all or nothing: out of memory anywhere, the
        # running rows go on as they were and only the joiners fail.
        self._expand()
        if cache_rows is not None:
            source.keep_rows(cache_rows)
        joined_mask = join_masks(self.mask, mask)
        last_pos = torch.cat([self.last_pos, positions[:, -1:]])
        joined_alphas = torch.cat([self.alphas, alphas])
        joined_after = torch.cat([self.after, after])
        joined_before = None if before is None else torch.cat([self.before, before])
        self.source.join(source)
        self.mask, self.last_pos, self.alphas = joined_mask, last_pos, joined_alphas
        self.after, self.before = joined_after, joined_before
        self.live += lives

    def cancel(self, ticket: Any) -> None:
        """Drop a request's rows at the next step (no more events for them)."""
        self.cancelled.add(ticket)

    def _expand(self) -> None:
        if self.cache_rows is not None:
            self.source.keep_rows(self.cache_rows)
            self.cache_rows = None

    def step(self) -> Iterator[tuple[Any, TokenEvent | RowOutput]]:
        """Sample one token per row, yield (ticket, event)s, drop finished rows, advance the rest."""
        if not self.live:
            return
        device = self.source.device
        amplified = logit_diff(self.after, self.before, self.alphas)  # [B, V] fp32
        greedy = greedy_tokens(amplified) if any(lv.config.sampling.greedy for lv in self.live) else []
        keep: list[int] = []
        next_tokens: list[int] = []
        for i, live in enumerate(self.live):
            if live.ticket is not None and live.ticket in self.cancelled:
                continue
            state, config = live.state, live.config
            try:
                token = greedy[i] if config.sampling.greedy else sample(amplified[i], config.sampling, live.generator)
                if token < 0:
                    raise NonFiniteLogitsError(NON_FINITE)
            except NonFiniteLogitsError as exc:
                if live.ticket is None:
                    raise  # a plain decode: the caller's request fails
                self.cancelled.add(live.ticket)  # only this request fails; its other rows leave
                yield live.ticket, RowFailed(state.row, exc)
                continue
            state.generated += 1
            if state.logprobs is not None:
                before = None if self.before is None else self.before[i]
                state.logprobs.append(
                    token_logprobs(token, self.after[i], before, amplified[i], config.top_logprobs)
                )
            if token in config.eos_ids:
                yield live.ticket, state.output("eos")
                continue
            text, hit_stop = state.tracker.push(token)
            yield live.ticket, TokenEvent(state.row, token, text, state.logprobs[-1] if state.logprobs else None)
            if hit_stop:
                yield live.ticket, state.output("stop")
            elif state.generated >= config.max_new_tokens:
                yield live.ticket, state.output("length")
            else:
                keep.append(i)
                next_tokens.append(token)
        if self.cancelled:
            # A request that failed in this step leaves now with all its rows, including those kept
            # before its failing one: none may stay to be stepped under its ticket.
            kept = [(i, t) for i, t in zip(keep, next_tokens) if self.live[i].ticket not in self.cancelled]
            keep, next_tokens = [i for i, _ in kept], [t for _, t in kept]
        if not keep:
            self.live, self.source, self.cache_rows = [], None, None
            self.cancelled.clear()
            return
        if len(keep) < len(self.live):
            self.cancelled &= {self.live[i].ticket for i in keep}  # forget requests that left
            index = torch.tensor(keep, device=device)
            self.cache_rows = index if self.cache_rows is None else self.cache_rows[index]
            self.mask, self.last_pos, self.alphas = self.mask[index], self.last_pos[index], self.alphas[index]
            self.live = [self.live[i] for i in keep]
            self._trim()
        if self.cache_rows is not None:
            # One selection drops the finished rows and expands a shared prefill to its rows.
            self._expand()
        tokens = torch.tensor(next_tokens, dtype=torch.long, device=device).unsqueeze(-1)  # [B, 1]
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=-1)
        self.last_pos = self.last_pos + 1
        yield from self._advance(tokens)

    def _advance(self, tokens: torch.Tensor) -> Iterator[tuple[Any, RowFailed]]:
        """The step's forward for every row. Out of memory, the request admitted last leaves (it
        fails alone), the caches lose what the failed forward wrote, and the rest try again."""
        while True:
            try:
                self.after, self.before = self.source.decode_one_token(tokens, self.mask, self.last_pos)
                return
            except torch.OutOfMemoryError as exc:
                victim = self.live[-1].ticket
                if victim is None:
                    raise  # a plain decode: the caller's request fails
                # A fresh error: the caught one's traceback holds the failed forward's tensors.
                error = torch.OutOfMemoryError(f"out of memory in a decode step of {len(self.live)} rows: {exc}")
            self.source.crop(self.mask.shape[-1] - 1)  # the caches' length before this step
            keep = [i for i, live in enumerate(self.live) if live.ticket != victim]
            yield victim, RowFailed(self.live[-1].state.row, error)
            if not keep:
                self.live, self.source, self.cache_rows = [], None, None
                self.cancelled.clear()
                return
            index = torch.tensor(keep, device=tokens.device)
            self.source.keep_rows(index)
            self.mask, self.last_pos, self.alphas = self.mask[index], self.last_pos[index], self.alphas[index]
            tokens = tokens[index]
            self.live = [self.live[i] for i in keep]
            self._trim()  # the victim may have been the only row reaching back that far

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (rows that left may leave some), so
        the caches stay within the width `padded_tokens` bounds."""
        columns = padding_columns(self.mask)
        if columns:
            self._expand()
            self.source.trim_left(columns)
            self.mask = self.mask[:, columns:]


def decode(
    source: LogitsSource,
    tokenizer: Any,
    rows: Sequence[Row],
    config: DecodeConfig,
    share_prefill: bool = True,
) -> Iterator[TokenEvent | RowOutput]:
    """Decode all rows together; yields each token as it is sampled and each row as it ends.

    The consumer may stop iterating at any point (cancellation); nothing is left held.

    Args:
        source: the models' logits and caches.
        tokenizer: detokenizes the sampled ids.
        rows: prompt, alpha and seed of each decoded sequence.
        config: stopping, sampling and padding.
        share_prefill: prefill each distinct prompt once (False: once per row, the old way,
            kept as the benchmark's baseline).
    """
    batch = RunningBatch(lambda: source, tokenizer)  # admits once: the given source is the batch's
    batch.admit(rows, config, share_prefill=share_prefill)
    while batch:
        for _, event in batch.step():
            yield event


def collect(events: Iterator[TokenEvent | RowOutput], n_rows: int) -> list[RowOutput]:
    """Run a decode to the end and return its rows in order."""
    outputs: list[RowOutput | None] = [None] * n_rows
    for event in events:
        if isinstance(event, RowOutput):
            outputs[event.row] = event
    assert all(o is not None for o in outputs), "decode ended with unfinished rows"
    return outputs  # type: ignore[return-value]
