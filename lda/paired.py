"""One decode step for both models of a Llama-family pair, their same-shaped matrices multiplied as
one batched matmul (`[2, out, in] @ [2, in, rows]`).

Why: at a few rows a decode step is a chain of matrix-vector products, and one of a layer's
1-3 MB matrices does not keep the machine's memory busy: on the 2-core CPU box one such product
reads ~11 GB/s (one thread; the library does not split it), while the two models' matching
matrices as a batch of 2 read ~22 GB/s, the bandwidth of one large product. The step is the
models' own arithmetic (Hugging Face's Llama: RMSNorm in fp32, rotary embeddings from the model's
own module, SDPA with grouped heads, SiLU-gated MLP), run on the `StaticPool`'s caches.

No weights are copied: each matrix of both models is stacked once into a `[2, ...]` tensor and the
models' parameters become views of it (`param.data = stacked[m]`), so the models keep working as
before and an in-place change to a parameter (an amplification merge and its restore) is what the
step reads. `PairedWeights.intact()` checks before each step that every parameter still is that
view; a parameter replaced by another tensor makes the step fall back to the models' own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ARCHITECTURES = {"llama", "mistral", "qwen2"}
# Bumped by `may_change`: a `PairedWeights.intact` check of an unchanged generation can be skipped.
_generation = 0
# Per layer: (the attribute path of each projection, in order).
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def _get(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _text_config(model: Any) -> Any:
    return model.config.get_text_config(decoder=True)


def why_not_paired(models: Sequence[Any]) -> str | None:
    """Why these models cannot decode as one paired step (None when they can): two models of a
    supported architecture, the same shapes, full attention, SiLU, one device and dtype."""
    if len(models) != 2:
        return "one model"
    configs = [_text_config(m) for m in models]
    for c in configs:
        if c.model_type not in ARCHITECTURES:
            return f"architecture {c.model_type!r} (paired: {sorted(ARCHITECTURES)})"
        if c.hidden_act != "silu" or getattr(c, "pretraining_tp", 1) != 1:
            return "activation or tensor-parallel layout"
        if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or ["full_attention"])):
            return "sliding-window or other non-full attention layers"
    a, b = models
    if any(getattr(m.get_output_embeddings(), "bias", None) is not None for m in models):
        return "a head with a bias"
    shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in models]
    if shapes[0] != shapes[1]:
        return "the models' parameters differ in shape"
    if {(p.device, p.dtype) for m in models for p in m.parameters()} != {(next(a.parameters()).device,
                                                                        next(a.parameters()).dtype)}:  # fmt: skip
        return "parameters on several devices or dtypes"
    ra, rb = a.model.rotary_emb, b.model.rotary_emb
    if not torch.equal(ra.inv_freq, rb.inv_freq) or ra.attention_scaling != rb.attention_scaling:
        return "different rotary embeddings"
    if configs[0].rms_norm_eps != configs[1].rms_norm_eps:
        return "different norm epsilons"
    return None


@dataclass
class Layer:
    norms: list[torch.Tensor]  # [2, hidden] each: input, post-attention
    attention: list[torch.Tensor]  # [2, out, in]: q, k, v, o
    attention_bias: list[torch.Tensor | None]
    mlp: list[torch.Tensor]  # [2, out, in]: gate, up, down
    mlp_bias: list[torch.Tensor | None]


class PairedWeights:
    """Both models' weights stacked, the models' parameters made views of the stacks."""

    def __init__(self, models: Sequence[Any]) -> None:
        why = why_not_paired(models)
        if why:
            raise ValueError(f"no paired step: {why}")
        self.models = list(models)
        # What `intact` compares before every step, kept as the dicts it reads, so the check is a
        # few hundred dict lookups (25 us for 6 layers x 2 models; attribute walks took 320 us).
        self._views: list[tuple[dict[str, Any], str, int]] = []  # (module._parameters, name, view's data_ptr)
        self._paths: list[tuple[dict[str, Any], str, Any]] = []  # (owner._modules, name, the module there)
        self.layers = []
        for la, lb in zip(models[0].model.layers, models[1].model.layers, strict=True):
            self.layers.append(
                Layer(
                    norms=[self._stack(self._at(la, n), self._at(lb, n)) for n in NORMS],
                    attention=[self._stack(self._at(la, n), self._at(lb, n)) for n in ATTENTION],
                    attention_bias=[self._bias(_get(la, n), _get(lb, n)) for n in ATTENTION],
                    mlp=[self._stack(self._at(la, n), self._at(lb, n)) for n in MLP],
                    mlp_bias=[self._bias(_get(la, n), _get(lb, n)) for n in MLP],
                )
            )
        self.final_norm = self._stack(self._at(models[0].model, "norm"), self._at(models[1].model, "norm"))
        # The heads too (a tied head is the embedding's Parameter: both then read the stack).
        self.head = self._stack(self._at(models[0], "lm_head"), self._at(models[1], "lm_head"))
        cfg = _text_config(models[0])
        self.eps = cfg.rms_norm_eps
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # Plain Python values for the kernels' keyword arguments (a compile with dynamic sizes would
        # otherwise trace the head counts as symbols, which SDPA's flags do not take).
        self.grouped = bool(self.kv_heads != self.heads)
        self.scale = float(self.head_dim**-0.5)

    def _at(self, parent: Any, path: str) -> Any:
        owner, _, name = path.rpartition(".")
        owner_module = _get(parent, owner) if owner else parent
        module = owner_module._modules[name]
        self._paths.append((owner_module._modules, name, module))
        return module

    def _stack(self, a: Any, b: Any, name: str = "weight") -> torch.Tensor:
        """Module `a`'s and `b`'s parameter `name` as one [2, ...] tensor, each now a view of it."""
        stacked = torch.stack([getattr(a, name).detach(), getattr(b, name).detach()])
        for i, module in enumerate((a, b)):
            getattr(module, name).data = stacked[i]  # a view: no second copy in memory
            self._views.append((module._parameters, name, stacked[i].data_ptr()))
        return stacked

    def _bias(self, a: Any, b: Any) -> torch.Tensor | None:
        if getattr(a, "bias", None) is None:
            return None
        return self._stack(a, b, "bias")

    def intact(self) -> bool:
        """Whether the models still compute what the step does: every module where it was (not
        wrapped, e.g. by a LoRA layer), without hooks, and its parameters still the views the step
        reads (not replaced or rebound); in-place changes keep all of it so."""
        for modules, name, module in self._paths:
            if modules.get(name) is not module or module._forward_hooks or module._forward_pre_hooks:
                return False
        for parameters, name, pointer in self._views:
            p = parameters.get(name)
            if p is None or p.data_ptr() != pointer:
                return False
        return True


def may_change() -> None:
    """Code that may replace, wrap or hook the models' modules is about to run: the next step of
    every paired step that checks by generation (`lda.static.Family`, `trusting`) checks in full.
    The server's engine calls it before every job's code; on 2 CPU cores the full check costs
    ~0.25 ms a step (its ~300 objects are out of the caches after a step), 2% of a token."""
    global _generation
    _generation += 1


def generation() -> int:
    return _generation


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm, both models at once: h [2, b, H], weight [2, H]."""
    dtype = h.dtype
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None, :] * x.to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [2, b, in] through weight [2, out, in]: `W @ x^T`, one batched product for both models."""
    y = torch.matmul(weight, x.transpose(1, 2)).transpose(1, 2)
    return y if bias is None else y + bias[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sdpa(
    weights: PairedWeights, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=bias, scale=weights.scale, enable_gqa=weights.grouped
    )


def _attend(
    weights: PairedWeights, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One query per row over the cache's used columns: q [b, heads, 1, dim], keys and values
    [b, kv_heads, U, dim], bias [b, 1, 1, U] (0 or -inf). On a GPU, SDPA; on a CPU the same
    arithmetic written out (two matmuls and a softmax in fp32), which the compiler fuses: the CPU
    SDPA kernel costs ~0.16 ms a call at one query, as much as a layer's weights take to read."""
    if q.device.type != "cpu":
        return _sdpa(weights, q, keys, values, bias)
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(rows, kv_heads, heads // kv_heads, dim)  # query heads sharing a key head
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * weights.scale + bias
    probs = scores.softmax(-1).to(values.dtype)  # [b, kv_heads, group, L]
    return torch.matmul(probs, values).view(rows, heads, 1, dim)


def paired_forward(
    weights: PairedWeights,
    caches: Sequence[Any],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    column: torch.Tensor,
    width: int | None,
) -> list[torch.Tensor]:
    """One decode step of both models: tokens [b, 1], mask [b, U] (1 = attend) over the first U
    columns of the static caches (U <= their length L: attention reads only those columns),
    positions [b, 1], the new keys and values written at `column` (a one-element long tensor,
    < U) of each model's static cache. Returns each model's last-position logits, fp32, [b, width]."""
    a, b = weights.models
    h = torch.stack([a.model.embed_tokens(tokens[:, 0]), b.model.embed_tokens(tokens[:, 0])])  # [2, b, H]
    rows = h.shape[1]
    cos, sin = a.model.rotary_emb(h[0][:, None, :], positions)  # [b, 1, D]
    cos, sin = cos[None, :, None], sin[None, :, None]  # [1, b, 1, 1, D] against [2, b, heads, 1, D]
    allowed = mask.bool()[:, None, None, :]  # [b, 1, 1, L]
    bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, float("-inf"))
    heads, kv_heads, dim = weights.heads, weights.kv_heads, weights.head_dim
    used = mask.shape[-1]  # the cache columns attention reads
    for i, layer in enumerate(weights.layers):
        x = _rms(h, layer.norms[0], weights.eps)
        q_w, k_w, v_w, o_w = layer.attention
        q_b, k_b, v_b, o_b = layer.attention_bias
        q = _linear(x, q_w, q_b).view(2, rows, heads, 1, dim)
        k = _linear(x, k_w, k_b).view(2, rows, kv_heads, 1, dim)
        v = _linear(x, v_w, v_b).view(2, rows, kv_heads, 1, dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        outs = []
        for m, cache in enumerate(caches):
            keys, values = cache.layers[i].keys, cache.layers[i].values  # [b, kv_heads, L, dim]
            keys.index_copy_(2, column, k[m])
            values.index_copy_(2, column, v[m])
            outs.append(_attend(weights, q[m], keys[:, :, :used], values[:, :, :used], bias))
        attended = torch.stack(outs).view(2, rows, heads * dim)
        h = h + _linear(attended, o_w, o_b)
        x = _rms(h, layer.norms[1], weights.eps)
        gate_w, up_w, down_w = layer.mlp
        gate_b, up_b, down_b = layer.mlp_bias
        h = h + _linear(F.silu(_linear(x, gate_w, gate_b)) * _linear(x, up_w, up_b), down_w, down_b)
    h = _rms(h, weights.final_norm, weights.eps)
    logits = _linear(h, weights.head, None)[..., :width].float()  # [2, b, width]
    return [logits[0], logits[1]]
