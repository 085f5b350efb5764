"""Tiny local models and tokenizers for tests and benchmarks (nothing from a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from app.demo import build_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model pair decodes in lockstep, one token at a time.",
    "What should I do if I feel bored? Read a book, take a walk, call a friend.",
    "Amplified logits surface rare behaviours in fine-tuned language models.",
    "Hello world, this is a small test of the tokenizer and the chat template.",
] * 4


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    return build_tokenizer(CORPUS, vocab_size=vocab_size)


def tiny_llama(
    tokenizer: Any,
    seed: int,
    vocab_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> LlamaForCausalLM:
    """A 2-layer, 32-wide random Llama; `vocab_size` larger than the tokenizer pads the embeddings.

    `device` / `dtype` build it there directly (a ~1B model initialises in seconds on a GPU, in bf16
    never holding an fp32 copy); left unset, the model is the CPU fp32 one the tests always used.
    """
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device or "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    finally:
        torch.set_default_dtype(previous)
    # Random init gives near-uniform logits; sharpen them so greedy paths are unambiguous.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
