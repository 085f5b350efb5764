"""Bodies every route shares: the error shape and the sampling fields of every generation route."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

Prompt = Annotated[str, Field(min_length=1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
StopString = Annotated[str, Field(min_length=1)]


class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class SamplingFields(BaseModel):
    """Fields shared by every generation route."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(80, ge=1, description="tokens to generate at most (server limit applies)")
    temperature: FiniteFloat = Field(0.8, ge=0.0, description="0 (or below 1e-5) = greedy")
    top_p: FiniteFloat = Field(0.95, gt=0.0, le=1.0, description="nucleus mass, HF semantics")
    top_k: int = Field(0, ge=0, description="0 = off")
    do_sample: bool = Field(True, description="false = greedy, whatever the temperature")
    seed: int | None = Field(None, ge=0, le=2**62, description="row i uses seed + i; omitted = random")
    apply_chat_template: bool = True
    system_prompt: str | None = None
    stop: list[StopString] = Field(
        default_factory=list, description="stop strings (not included in the text)"
    )



class PromptFields(SamplingFields):
    """`prompt` (the seed's field) or `prompts`, exactly one of them."""

    prompt: Prompt | None = Field(None, description="the user message (seed field)")
    prompts: list[Prompt] | None = Field(None, min_length=1, description="several prompts instead of `prompt`")

    @model_validator(mode="after")
    def _one_prompt_field(self) -> PromptFields:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of `prompt` or `prompts`")
        return self

    @property
    def prompt_list(self) -> list[str]:
        return self.prompts if self.prompts is not None else [self.prompt]  # type: ignore[list-item]

# 400: a body that is not JSON at all; 422: JSON that breaks the schema or a rule.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 409, 422, 429, 503)
}



def not_found(what: str) -> dict[int | str, dict[str, Any]]:
    """The shared error responses plus a 404 for routes that name a resource in their path."""
    return {**ERRORS, 404: {"model": ErrorResponse, "description": f"no such {what}"}}


# Routes that take `stream: true` answer with Server-Sent Events instead of the JSON body.
STREAMING: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the JSON body, or with `stream: true` SSE `token` events then one `result` (or `error`)",
        "content": {"text/event-stream": {"schema": {"description": "each event's data is JSON"}}},
    },
    **ERRORS,
}


def _layer(value: Any) -> int | float:
    """An integer block or a fraction, kept as given (1 is block 1, 1.0 the last block)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be an integer block or a fraction in [0, 1], got {value!r}")
    return value


# A plain validator, not `int | float`: a union would put its branch names into an error's path.
LayerRef = Annotated[
    int | float,
    PlainValidator(_layer),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "number"}]}),
    Field(description="an int: that block; a float in [0, 1]: int(x * (layers - 1))"),
]


class SteerBody(BaseModel):
    """A steering vector from a finished ADL job: δ at (layer, position), scaled to the after
    model's mean norm at that layer, times `strength`, added to the block's output at every
    position and step of the after model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adl: str = Field(min_length=1, description="a finished `/diffing/jobs` ADL job's id")
    layer: LayerRef = Field(description="one of the job's layers: a block, or a fraction in [0, 1]")
    position: int = Field(description="a position label the job analysed (0..n-1; chats -k..n-1)")
    strength: FiniteFloat = Field(1.0, ge=-1000.0, le=1000.0, description="times the normalised vector")
    random_seed: int | None = Field(
        None, ge=0, le=2**62, description="a control: a random direction of the same norm, seeded"
    )
