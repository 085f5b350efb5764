"""Loading models and tokenizers from local directories or hub ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadConfig:
    """How to place a model.

    Args:
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU) or a name.
        device_map: passed to accelerate (e.g. "auto") for models larger than one device;
            `device` is then ignored.
        trust_remote_code: run code shipped with the checkpoint (operator's choice only).
    """

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={device} but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_id: str, cfg: LoadConfig) -> Any:
    device = resolve_device(cfg.device) if cfg.device_map is None else torch.device("cpu")
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    if cfg.device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _tokenizer_class(name: str) -> Any:
    """Find a tokenizer class by name, forgiving case (old LLaMA uploads say `LLaMATokenizer`)."""
    cls = getattr(transformers, name, None)
    if cls is None:
        lowered = name.lower()
        matches = [n for n in dir(transformers) if n.lower() == lowered and "Tokenizer" in n]
        cls = getattr(transformers, matches[0]) if matches else None
    if cls is None:
        raise ValueError(f"unknown tokenizer class {name!r}")
    return cls


def load_tokenizer(model_id: str, tokenizer_class: str | None = None, trust_remote_code: bool = False) -> Any:
    if tokenizer_class:
        return _tokenizer_class(tokenizer_class).from_pretrained(model_id)
    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (ValueError, AttributeError) as exc:
        if "LLaMATokenizer" not in str(exc):
            raise
        return _tokenizer_class("LlamaTokenizer").from_pretrained(model_id)


def eos_ids(tokenizer: Any, *models: Any) -> frozenset[int]:
    """The union of the tokenizer's EOS and every model's generation_config EOS list."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for model in models:
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    return frozenset(ids)
