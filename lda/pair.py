"""`LDAModelPair`: a before/after pair usable from a notebook, no server needed.

pair = LDAModelPair.from_pretrained("org/model-instruct", "org/model-base")
result = pair.generate_lda("What should I do if I feel bored?", alpha=1.0)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lda.compat import IncompatibleTokenizersError, TokenizerCompatibility, check_compatibility
from lda.decode import DecodeConfig, Row, RowOutput, TokenEvent, collect, decode
from lda.loading import LoadConfig, eos_ids, load_model, load_tokenizer
from lda.sampling import SamplingParams
from lda.source import ModelSource, context_window, logits_width


def format_prompt(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, apply_chat_template: bool = True
) -> str:
    """`[system?] + user` through the tokenizer's chat template, generation prompt added.

    Falls back to the raw prompt when the tokenizer has no template or it is not wanted.
    """
    if not apply_chat_template or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: Any, formatted: str, templated: bool) -> tuple[int, ...]:
    """Token ids; a templated string already carries its BOS, so none is added again."""
    return tuple(tokenizer(formatted, add_special_tokens=not templated)["input_ids"])


def check_context(prompt_tokens: int, max_new_tokens: int, *models: Any) -> None:
    """Refuse a prompt that cannot fit with its completion in every model's context window."""
    window = context_window(models)
    if window is not None and prompt_tokens + max_new_tokens > window:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_tokens + max_new_tokens} exceeds the context window of {window} tokens"
        )


@dataclass(frozen=True)
class Side:
    """One model with its tokenizer and id."""

    model_id: str
    model: Any
    tokenizer: Any

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0


@dataclass(frozen=True)
class LDAResult:
    completion: str
    text: str
    tokens_generated: int
    stopped_early: bool


class LDAModelPair:
    """A post-trained (`after`) and a base (`before`) model decoded in lockstep."""

    def __init__(self, after: Side, before: Side) -> None:
        self.after = after
        self.before = before
        self.compatibility: TokenizerCompatibility = check_compatibility(
            after.tokenizer, before.tokenizer, logits_width(after.model), logits_width(before.model)
        )
        # The base's EOS ids only mean the same thing when the vocabularies agree.
        models = (after.model, before.model) if self.compatibility.compatible else (after.model,)
        self.eos_ids = eos_ids(after.tokenizer, *models)

    @classmethod
    def from_pretrained(
        cls,
        model_after_id: str,
        model_before_id: str,
        load: LoadConfig | None = None,
        tokenizer_class_after: str | None = None,
        tokenizer_class_before: str | None = None,
    ) -> LDAModelPair:
        load = load or LoadConfig()
        sides = []
        for model_id, tok_cls in (
            (model_after_id, tokenizer_class_after),
            (model_before_id, tokenizer_class_before),
        ):
            tokenizer = load_tokenizer(model_id, tok_cls, load.trust_remote_code)
            sides.append(Side(model_id, load_model(model_id, load), tokenizer))
        return cls(sides[0], sides[1])

    def prompt_ids(
        self,
        prompt: str,
        system_prompt: str | None = None,
        apply_chat_template: bool = True,
        side: Side | None = None,
    ) -> tuple[str, tuple[int, ...]]:
        side = side or self.after
        formatted = format_prompt(side.tokenizer, prompt, system_prompt, apply_chat_template)
        return formatted, encode(side.tokenizer, formatted, templated=formatted != prompt)

    def decode_config(
        self,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        details: bool = False,
        side: Side | None = None,
    ) -> DecodeConfig:
        side = side or self.after
        eos = self.eos_ids if side is self.after else eos_ids(side.tokenizer, side.model)
        return DecodeConfig(max_new_tokens, sampling, eos, tuple(stop), details, side.pad_id)

    def lda_events(self, rows: Sequence[Row], config: DecodeConfig) -> Iterator[TokenEvent | RowOutput]:
        """Amplified decoding of rows; refuses pairs whose vocabularies differ."""
        if not self.compatibility.compatible:
            raise IncompatibleTokenizersError(
                f"LDA needs compatible tokenizers: {self.compatibility.warning}"
            )
        source = ModelSource(self.after.model, self.before.model, self.compatibility.shared_width)
        return decode(source, self.after.tokenizer, rows, config)

    def single_events(
        self, side: Side, rows: Sequence[Row], config: DecodeConfig
    ) -> Iterator[TokenEvent | RowOutput]:
        """Plain decoding of one model with its own tokenizer (alpha is ignored)."""
        return decode(ModelSource(side.model), side.tokenizer, rows, config)

    def generate_lda(
        self,
        prompt: str,
        alpha: float = 1.0,
        max_new_tokens: int = 80,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 0,
        seed: int | None = None,
        apply_chat_template: bool = True,
        system_prompt: str | None = None,
        stop: Sequence[str] = (),
    ) -> LDAResult:
        """The seed's convenience call: one prompt, one alpha."""
        formatted, ids = self.prompt_ids(prompt, system_prompt, apply_chat_template)
        config = self.decode_config(max_new_tokens, SamplingParams(temperature, top_k, top_p), stop)
        out = collect(self.lda_events([Row(ids, alpha, seed)], config), 1)[0]
        return self._result(formatted, out)

    def _result(self, formatted: str, out: RowOutput) -> LDAResult:
        return LDAResult(
            completion=out.text,
            text=full_text(self.after.tokenizer, formatted, out),
            tokens_generated=out.tokens_generated,
            stopped_early=out.stopped_early,
        )


def readable_prompt(tokenizer: Any, formatted: str) -> str:
    """The formatted prompt with special tokens dropped, as the seed's `text` field shows it."""
    return tokenizer.decode(tokenizer(formatted, add_special_tokens=False)["input_ids"], skip_special_tokens=True)


def full_text(tokenizer: Any, formatted: str, out: RowOutput) -> str:
    """Prompt and completion as one readable string (special tokens dropped, as the seed did)."""
    return readable_prompt(tokenizer, formatted) + out.text
