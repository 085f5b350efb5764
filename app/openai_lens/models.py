"""Model ids select the lens, as vLLM's `model` field selects a LoRA module.

- `after` / `before` (or the models' ids): one model alone;
- `lda`: LDA with `alpha` from the body (default 1.0); `lda@ALPHA` carries alpha in the name (for
  tools that can only set `model`); `lda@ALPHA@ADAPTER` is adapter-mode LDA on the base;
- a registered adapter name or a compiled `lora_name`: the base with that adapter merged
  (amplified) in place, restored after the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from lda import LDAModelPair
from lda.pair import Side

from app.amplification_lens.jobs import text_side as base_side
from app.lda_lens.schemas import MAX_ALPHA

Kind = Literal["after", "before", "lda", "adapter"]
LDA = "lda"


class ParamError(ValueError):
    """Invalid input in one field: a 400 whose OpenAI `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(LookupError):
    """No lens has this id: answered 404 with `code: model_not_found`."""


@dataclass(frozen=True)
class Lens:
    """What one `model` id decodes with."""

    model: str  # the id as the client sent it (echoed back in responses)
    kind: Kind
    alpha: float | None = None  # lda: from the name (None: from the body)
    adapter: str | None = None  # adapter: the adapter or lora_name merged; lda: adapter mode


def parse_alpha(text: str, model: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        raise ParamError(f"model {model!r}: alpha {text!r} is not a number (e.g. lda@2, lda@-0.5)", "model") from None
    if not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise ParamError(f"model {model!r}: alpha must be a finite number in [-{MAX_ALPHA:g}, {MAX_ALPHA:g}]", "model")
    return alpha


def resolve(model: str, pair: LDAModelPair, amp: Any | None) -> Lens:
    """The lens of a model id; ValueError for a malformed `lda@...`, ModelNotFoundError for none."""
    if model in ("after", pair.after.model_id):
        return Lens(model, "after")
    if model in ("before", pair.before.model_id):
        return Lens(model, "before")
    if model == LDA:
        return Lens(model, "lda")
    if model.startswith(LDA + "@"):
        alpha_text, _, adapter = model[len(LDA) + 1 :].partition("@")
        alpha = parse_alpha(alpha_text, model)
        if adapter:
            if not adapter_exists(adapter, amp):
                raise ModelNotFoundError(f"model {model!r}: no adapter or lora_name {adapter!r}")
            return Lens(model, "lda", alpha, adapter)
        return Lens(model, "lda", alpha)
    if adapter_exists(model, amp):
        return Lens(model, "adapter", adapter=model)
    raise ModelNotFoundError(
        f"the model {model!r} does not exist: use after, before, lda, lda@ALPHA, lda@ALPHA@ADAPTER, "
        "a registered adapter or a compiled lora_name (GET /v1/models lists them)"
    )


def adapter_exists(name: str, amp: Any | None) -> bool:
    """A registered adapter, a compiled lora_name in memory, or one written to the compiled folder."""
    if amp is None:
        return False
    return name in amp.registry or name in amp.compiled or amp.written_exists(name)


def text_side(lens: Lens, pair: LDAModelPair, amp: Any | None) -> Side:
    """Whose tokenizer and chat template a lens uses."""
    if lens.kind == "before":
        return pair.before
    if lens.kind == "after" or (lens.kind == "lda" and lens.adapter is None):
        return pair.after
    return base_side(amp.pair)
