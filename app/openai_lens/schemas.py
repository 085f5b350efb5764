"""Request bodies of the OpenAI-compatible routes: OpenAI's fields, vLLM's extras, nothing silent.

Fields OpenAI defines but this service does not implement are accepted only at their neutral value
(penalties 0, no logit_bias, no tools), so a request is either served as asked or refused with a
400 naming the field, never half-honoured.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from app.api.schemas import FiniteFloat, SteerBody, StopString
from app.lda_lens.schemas import Alpha

MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI allows 5 (completions) and 20 (chat)
# Strict: pydantic would read `true` as token 1.
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


# Keys of apply_chat_template itself: chat_template_kwargs may only add variables for the template.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
     "chat_template", "return_dict", "return_tensors", "tools", "documents"}
)  # fmt: skip


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs or {}))
    if reserved:
        raise ValueError(f"{reserved} are fields of the request or of the server, not template variables")
    return kwargs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, usage comes once at the end


class OpenAIFields(BaseModel):
    """Sampling and lens fields both routes share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="after, before, lda, lda@ALPHA, lda@ALPHA@ADAPTER, an adapter")
    temperature: FiniteFloat = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: FiniteFloat = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="choices per prompt; choice i of prompt p uses seed + p * n + i")
    seed: int | None = Field(None, ge=0, le=2**62, description="as /generate_lda's seed")
    stop: StopString | list[StopString] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM-style extras (the SDK's `extra_body`)
    alpha: Alpha | None = Field(None, description="LDA amplification for model `lda` (default 1.0)")
    adapter: str | None = Field(None, min_length=1, description="adapter-mode LDA for model `lda`")
    steer: SteerBody | None = Field(
        None, description="models `after` and `lda`: the after model steered by an ADL job's vector"
    )
    top_k: int = Field(0, ge=-1, description="0 or -1 = off (vLLM uses -1)")
    # OpenAI fields accepted only at their neutral value
    frequency_penalty: FiniteFloat = 0.0
    presence_penalty: FiniteFloat = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _neutral(self) -> OpenAIFields:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name}: penalties are not supported; send 0 or omit it")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; omit it")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="a string, strings, token ids, or lists of token ids (lm-eval sends these)")
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top-k logprobs per position")
    echo: bool = Field(False, description="return the prompt before the completion (with its logprobs)")
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (scoring the prompt)")
        if self.echo and self.stream and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported while streaming; use stream: false")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: carried to the template

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the server limit (what fits)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM's
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's

    _kwargs = field_validator("chat_template_kwargs")(check_template_kwargs)

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tool calling is not supported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not both")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: needs at least one user message")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

