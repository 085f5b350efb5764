"""Loading from local directories: dtype/device choice, tokenizer overrides, device_map."""

from __future__ import annotations

import pytest
import torch

from app.loader import load_pair
from app.settings import Settings
from lda import LDAModelPair, LoadConfig, load_model, load_tokenizer, resolve_device, resolve_dtype
from lda.loading import eos_ids


def test_resolve_device_and_dtype():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_load_model_dtype_and_device_map(tiny_dirs, monkeypatch):
    after, _ = tiny_dirs
    half = load_model(str(after), LoadConfig(dtype="bfloat16"))
    assert half.dtype == torch.bfloat16 and not any(p.requires_grad for p in half.parameters())
    import lda.loading

    seen = {}
    real = lda.loading.AutoModelForCausalLM.from_pretrained

    def spy(model_id, **kwargs):
        seen.update(kwargs)
        return real(model_id, **kwargs)

    monkeypatch.setattr(lda.loading.AutoModelForCausalLM, "from_pretrained", spy)
    mapped = load_model(str(after), LoadConfig(device_map="auto"))
    assert seen["device_map"] == "auto"  # placement left to accelerate
    assert next(mapped.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tokenizer_class_override_is_case_insensitive(tiny_dirs):
    after, _ = tiny_dirs
    tok = load_tokenizer(str(after), "pretrainedtokenizerfast")
    import transformers

    assert isinstance(tok, transformers.PreTrainedTokenizerFast) and len(tok) > 0
    with pytest.raises(ValueError, match="unknown tokenizer class"):
        load_tokenizer(str(after), "NoSuchTokenizer")


def test_eos_union_covers_generation_config(after_model, tokenizer):
    after_model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    try:
        assert eos_ids(tokenizer, after_model) == {tokenizer.eos_token_id, 7}
    finally:
        after_model.generation_config.eos_token_id = tokenizer.eos_token_id


def test_pair_from_pretrained_and_settings_loader(tiny_dirs, tmp_path):
    after, before = tiny_dirs
    pair = LDAModelPair.from_pretrained(str(after), str(before))
    result = pair.generate_lda("Hello world", alpha=1.0, max_new_tokens=5, temperature=0.0)
    assert result.tokens_generated == 5 and result.text.endswith(result.completion)
    loaded, demo = load_pair(
        Settings(model_after_id=str(after), model_before_id=str(before), data_dir=tmp_path, dtype="float32")
    )
    assert demo is None and loaded.after.model_id == str(after) and loaded.compatibility.compatible
