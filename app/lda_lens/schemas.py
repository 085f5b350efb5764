"""Request and response bodies of the LDA lens. Seed field names are kept; extensions are optional."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from app.api.schemas import Prompt, PromptFields, SamplingFields, SteerBody

# |alpha| beyond this overflows nothing in fp32 but is far past any useful amplification; bounding
# it keeps `after + alpha * (after - before)` finite for any logits a model produces.
MAX_ALPHA = 1000.0
Alpha = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ALPHA, le=MAX_ALPHA)]


class LDARequest(PromptFields):
    alpha: Alpha = Field(1.0, description="amplification; 0 = after model, -1 = before model")
    alphas: list[Alpha] | None = Field(
        None, min_length=1, description="several alphas instead of `alpha`"
    )
    n: int = Field(1, ge=1, description="samples per (prompt, alpha)")
    stream: bool = Field(False, description="Server-Sent Events: token events, then one result event")
    details: bool = Field(False, description="per-token ids and logprobs under before / after / amplified")
    adapter: str | None = Field(
        None, description="adapter mode: before = base, after = base + this registered adapter (one model)"
    )
    amplification: dict | str | None = Field(
        None, description="adapter mode with an amplification config (body or compiled lora_name)"
    )
    steer: SteerBody | None = Field(
        None, description="steer the after model with an ADL job's vector (alpha 0: the steered after alone)"
    )

    @model_validator(mode="after")
    def _one_alpha_field(self) -> LDARequest:
        if self.alphas is not None and "alpha" in self.model_fields_set:
            raise ValueError("give `alpha` or `alphas`, not both")
        return self

    @property
    def alpha_list(self) -> list[float]:
        return self.alphas if self.alphas is not None else [self.alpha]


class LDABatchRequest(SamplingFields):
    """The seed's `/generate_lda_batch` body (plus `seed`, `top_k`, `stop`): one alpha, one row per prompt."""

    prompts: list[Prompt] = Field(min_length=1, description="one row per prompt, answered in order")
    alpha: Alpha = Field(1.0, description="amplification; 0 = after model, -1 = before model")


class GenerateRequest(SamplingFields):
    prompt: Prompt


class TokenDetail(BaseModel):
    token_id: int
    token: str
    logprob_after: float
    logprob_before: float | None
    logprob_amplified: float


class LDARow(BaseModel):
    prompt_index: int
    prompt: str
    formatted_prompt: str
    alpha: float
    sample_index: int
    seed: int
    completion: str
    text: str
    tokens_generated: int
    stopped_early: bool
    finish_reason: str = Field(description="eos | stop | length")
    details: list[TokenDetail] | None = None


class LDAResponse(BaseModel):
    prompt: str
    formatted_prompt: str
    completion: str
    text: str
    alpha: float
    model_after: str
    model_before: str
    tokens_generated: int
    stopped_early: bool
    results: list[LDARow]


class LDABatchRow(BaseModel):
    prompt: str
    formatted_prompt: str
    completion: str
    text: str
    tokens_generated: int
    stopped_early: bool
    seed: int = Field(description="this row's seed: `seed + i` for prompt i, so it reproduces alone")
    finish_reason: str = Field(description="eos | stop | length")


BATCH_ROW_FIELDS = tuple(LDABatchRow.model_fields)


class LDABatchResponse(BaseModel):
    results: list[LDABatchRow]
    alpha: float
    model_after: str
    model_before: str
    batch_size: int = Field(description="the number of prompts")


class ModelCompletion(BaseModel):
    model_id: str
    completion: str
    text: str
    tokens_generated: int
    stopped_early: bool


class GenerateResponse(BaseModel):
    prompt: str
    model_1: ModelCompletion
    model_2: ModelCompletion


class TokenizerCompatibilityResponse(BaseModel):
    compatible: bool
    vocab_size_1: int
    vocab_size_2: int
    vocabs_match: bool
    warning: str | None
    special_tokens_match: bool
    logits_width_1: int
    logits_width_2: int
    shared_width: int
