"""vLLM's runtime adapter routes and tokenizer routes, with vLLM's bodies and answers.

- `POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter`: register or drop a PEFT LoRA adapter
  by name (the same registry as `/adapters`, the same path confinement); the name then works as a
  `model` id. vLLM answers these in plain text, so do we.
- `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`: the tokenizer a `model` id decodes
  with. lm-evaluation-harness's `RemoteTokenizer` reads exactly these: `eos_token`, `bos_token`,
  `pad_token` and `chat_template` from /tokenizer_info (it needs the `eos_token` key), `tokens` from
  /tokenize (it sends `{prompt, add_special_tokens: false}`) and `prompt` from /detokenize.

Tokenizing is not device work, so these handlers do not queue behind generations on the engine;
they are plain `def`s, which FastAPI runs in its thread pool, so a long prompt or chat template never
stalls the event loop. Adapter changes do go through the engine: they touch the model's registry,
which the engine thread reads while decoding.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from amplification import AdapterError, AdapterNotFound
from amplification.registry import NAME_PATTERN, AdapterNameError
from lda import LDAModelPair
from lda.pair import Side

from app.amplification_lens.amplifier import AdapterLimitError, Amplifier
from app.api.deps import AmplifierDep, EngineDep, PairDep
from app.api.schemas import ERRORS, not_found
from app.openai_lens.models import ParamError, resolve, text_side
from app.openai_lens.schemas import ChatMessage, check_template_kwargs

router = APIRouter()
# vLLM answers the adapter routes with a line of plain text; errors stay JSON (hence no
# response_class, which would document every error response as text/plain too).
PLAIN_OK: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Success: ..."}
}

# --- bodies -------------------------------------------------------------------------------------


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(description="the adapter's name, then usable as `model`; [A-Za-z0-9_-]{1,64}")
    lora_path: str = Field(min_length=1, description="a PEFT LoRA directory under DATA_DIR or ADAPTER_ROOTS")
    load_inplace: bool = Field(False, description="vLLM's: replace an adapter already loaded under this name")

    @field_validator("lora_name")
    @classmethod
    def _name(cls, name: str) -> str:
        if NAME_PATTERN.fullmatch(name) is None:
            raise ValueError("must be 1-64 characters of [A-Za-z0-9_-]")
        return name


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = Field(None, description="vLLM's numeric id; ignored (names are unique here)")


class TokenizeCompletionRequest(BaseModel):
    """vLLM's completion form: a text as /v1/completions would encode it (BOS added by default)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="picks the tokenizer as it picks the lens; default after")
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """vLLM's chat form: messages through the chat template, as /v1/chat/completions encodes them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="picks the tokenizer as it picks the lens; default after")
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The template writes its own BOS; adding special tokens on top would double it (vLLM's default).
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None

    _kwargs = field_validator("chat_template_kwargs")(check_template_kwargs)

    @model_validator(mode="after")
    def _one_ending(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "continue_final_message cannot be used with add_generation_prompt "
                "(send add_generation_prompt: false)"
            )
        return self


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None = Field(description="the model's max_position_embeddings")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="picks the tokenizer as it picks the lens; default after")
    tokens: list[Annotated[StrictInt, Field(ge=0)]]  # strict: `true` is no token id


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """vLLM's: the tokenizer's config (tokenizer_config.json's keys), and whatever else it holds."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    model_max_length: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    add_bos_token: bool = Field(description="whether encoding with special tokens starts with bos_token")


def tokenize_request(body: Annotated[dict[str, Any], Body()]) -> TokenizeRequest:
    """The form vLLM would take: `messages` makes it the chat form. Validating only that form keeps
    the errors about its fields (a union would report both forms' complaints)."""
    form: type[TokenizeRequest] = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    try:
        return form.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


# --- adapters -----------------------------------------------------------------------------------


VLLM_REPLACE = "unload it first, or send load_inplace: true"


@router.post("/v1/load_lora_adapter", responses={**ERRORS, **PLAIN_OK})
async def load_lora_adapter(
    req: LoadLoRAAdapterRequest, amp: AmplifierDep, engine: EngineDep
) -> PlainTextResponse:
    """Register a PEFT LoRA adapter under `lora_name` (vLLM's route; the registry of `/adapters`,
    with its name rule: no model id, compiled lora_name or `ref_...`, and no name taken)."""

    def run(job: Any) -> None:
        # On the engine thread, where every registry change happens, so no load races the checks.
        try:
            amp.load_adapter(req.lora_name, req.lora_path, req.load_inplace, how_to_replace=VLLM_REPLACE)
        except AdapterError as exc:
            if isinstance(exc, AdapterNameError):
                exc.param = "lora_name"  # type: ignore[attr-defined]
            elif not isinstance(exc, (AdapterNotFound, AdapterLimitError)):
                exc.param = "lora_path"  # type: ignore[attr-defined]
            raise

    await engine.run(run)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses={**not_found("adapter"), **PLAIN_OK})
async def unload_lora_adapter(
    req: UnloadLoRAAdapterRequest, amp: AmplifierDep, engine: EngineDep
) -> PlainTextResponse:
    """Drop an adapter and the compiled configs built on it (as `DELETE /adapters/{name}`)."""
    await engine.run(lambda job: amp.delete_adapter(req.lora_name))
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


# --- tokenizer ----------------------------------------------------------------------------------


def model_side(model: str | None, pair: LDAModelPair, amp: Amplifier) -> Side:
    """The side whose tokenizer `model` encodes with; none is the after model (vLLM's served model)."""
    if model is None:
        return pair.after
    return text_side(resolve(model, pair, amp), pair, amp)


def max_model_len(side: Side) -> int | None:
    return getattr(getattr(side.model, "config", None), "max_position_embeddings", None)


def render_chat(tokenizer: Any, req: TokenizeChatRequest) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ParamError("this model's tokenizer has no chat template; send `prompt` instead", "messages")
    try:
        return tokenizer.apply_chat_template(
            [m.template_message() for m in req.messages],
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except TemplateError as exc:  # the template's raise_exception (e.g. an unknown role)
        raise ParamError(f"the chat template refused the messages: {exc}", "messages") from None


@router.post("/tokenize", responses=not_found("model"))
def tokenize(
    req: Annotated[TokenizeRequest, Depends(tokenize_request)], pair: PairDep, amp: AmplifierDep
) -> TokenizeResponse:
    """vLLM's /tokenize: a text (`prompt`) or chat (`messages`) as that model's tokenizer encodes it."""
    side = model_side(req.model, pair, amp)
    tok = side.tokenizer
    text = req.prompt if isinstance(req, TokenizeCompletionRequest) else render_chat(tok, req)
    ids = [int(i) for i in tok(text, add_special_tokens=req.add_special_tokens)["input_ids"]]
    return TokenizeResponse(
        count=len(ids),
        max_model_len=max_model_len(side),
        tokens=ids,
        token_strs=tok.convert_ids_to_tokens(ids) if req.return_token_strs else None,
    )


@router.post("/detokenize", responses=not_found("model"))
def detokenize(req: DetokenizeRequest, pair: PairDep, amp: AmplifierDep) -> DetokenizeResponse:
    """vLLM's /detokenize: token ids back to text, special tokens kept (as vLLM decodes)."""
    tok = model_side(req.model, pair, amp).tokenizer
    vocab = len(tok)
    # A fast tokenizer decodes an unknown id as nothing; say so rather than answer a shorter text.
    bad = next((i for i, t in enumerate(req.tokens) if t >= vocab), None)
    if bad is not None:
        raise ParamError(
            f"tokens.{bad}: token id {req.tokens[bad]} is outside the vocabulary (ids 0..{vocab - 1})",
            f"tokens.{bad}",
        )
    return DetokenizeResponse(prompt=tok.decode(req.tokens))


def _jsonable(value: Any) -> Any:
    """A tokenizer config value as JSON: special tokens (AddedToken) as their text, as vLLM does."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no inf
    if isinstance(getattr(value, "content", None), str):
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def adds_bos(tokenizer: Any) -> bool:
    """Read off what encoding does: a fast tokenizer's post-processor may add BOS while its
    `add_bos_token` attribute says False, and clients use this flag to avoid a second BOS."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """vLLM's answer: the tokenizer's init kwargs without file paths, then the live values of the
    fields clients read (the tokenizer may have changed since it was loaded)."""
    init = getattr(tokenizer, "init_kwargs", None) or {}
    config = {k: _jsonable(v) for k, v in init.items() if not k.endswith("_file")}
    template = getattr(tokenizer, "chat_template", None)
    config.update(
        tokenizer_class=type(tokenizer).__name__,
        model_max_length=_jsonable(getattr(tokenizer, "model_max_length", None)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        chat_template=_jsonable(template) if template else None,
        add_bos_token=adds_bos(tokenizer),
    )
    return config


@router.get(
    "/tokenizer_info",
    response_model=None,
    responses={
        200: {"model": TokenizerInfoResponse, "description": "the after model's tokenizer config"},
        **ERRORS,
    },
)
def tokenizer_info(pair: PairDep) -> dict[str, Any]:
    """vLLM's /tokenizer_info for the after model's tokenizer (what lm-eval's remote tokenizer reads)."""
    return tokenizer_config(pair.after.tokenizer)
