"""Logit diff amplification: a before/after model pair decoded with synchronized KV caches."""

from lda.compat import IncompatibleTokenizersError, TokenizerCompatibility, check_compatibility
from lda.decode import DecodeConfig, LogitsSource, Row, RowOutput, TokenEvent, TokenLogprobs, collect, decode
from lda.loading import LoadConfig, load_model, load_tokenizer, resolve_device, resolve_dtype
from lda.pair import LDAModelPair, LDAResult, Side, format_prompt
from lda.score import prompt_logprobs
from lda.sampling import SamplingParams, logit_diff, logits_to_probs, sample
from lda.source import ModelSource

__all__ = [
    "DecodeConfig",
    "IncompatibleTokenizersError",
    "LDAModelPair",
    "LDAResult",
    "LoadConfig",
    "LogitsSource",
    "ModelSource",
    "Row",
    "RowOutput",
    "SamplingParams",
    "Side",
    "TokenEvent",
    "TokenLogprobs",
    "TokenizerCompatibility",
    "check_compatibility",
    "collect",
    "decode",
    "format_prompt",
    "load_model",
    "load_tokenizer",
    "logit_diff",
    "logits_to_probs",
    "prompt_logprobs",
    "resolve_device",
    "resolve_dtype",
    "sample",
]
