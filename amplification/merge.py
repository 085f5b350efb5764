"""Exact in-place amplified merges: `W += sum_i weight_i * scaling_i * B_i @ A_i`, then restore.

Restore never subtracts the delta back (floating-point `(W + d) - d != W`): `apply` keeps the
original tensor of every touched Linear and `restore` copies it back, so the model is bit-identical
afterwards. Deltas are computed in fp32 one module at a time and written with a single `copy_`, so
the peak extra memory is the saved originals plus one module's fp32 delta, and a bf16 weight is
rounded once, not once per adapter.

    plan = plan_deltas(model, [(adapter, table)])
    with merged(model, plan) as state:
        ...  # generate with the amplified weights; restored on exit, even on errors
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, Self

import torch
from torch import nn

from amplification.registry import LoadedAdapter
from amplification.resolve import LayerWeights, module_kinds


class DeltaTerm(NamedTuple):
    A: torch.Tensor  # [r, in], fp32 CPU
    B: torch.Tensor  # [out, r], fp32 CPU
    coefficient: float  # amplification weight * adapter scaling


Plan = dict[str, list[DeltaTerm]]
FP32_MAX = torch.finfo(torch.float32).max

# The merged state of a model has one source: the MergedWeights registered here until restored.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, MergedWeights] = weakref.WeakKeyDictionary()


def plan_deltas(model: nn.Module, adapters_with_tables: Sequence[tuple[LoadedAdapter, LayerWeights]]) -> Plan:
    """`{Linear name: [(A, B, weight * scaling), ...]}` for every module some adapter changes.

    Weights come from each adapter's table at the module's `(layer, kind)` in `module_kinds(model)`.
    A zero weight contributes nothing and is dropped; a module left without terms is not touched at
    all, so a config of zeros leaves the model exactly as it is.

    Raises:
        ValueError: an adapter targets a module this model lacks (or with another shape), a table
            misses a layer or kind, or a weight (or weight x scaling, in fp32) is not finite.
    """
    kinds = module_kinds(model)
    modules = dict(model.named_modules())
    plan: Plan = {}
    for adapter, table in adapters_with_tables:
        for name, (a, b) in adapter.factors.items():
            if name not in kinds:
                raise ValueError(
                    f"adapter {adapter.name!r} targets {name!r}, which is not a decoder-layer Linear of this model"
                )
            _check_shape(modules[name], name, a, b, adapter.name)
            layer, kind = kinds[name]
            weight = table.get(layer, {}).get(kind)
            if weight is None:
                raise ValueError(
                    f"adapter {adapter.name!r}: no {kind!r} weight for layer {layer} in its table"
                )
            if not math.isfinite(weight):
                raise ValueError(f"adapter {adapter.name!r}: weight for layer {layer} {kind} is {weight}")
            coefficient = float(weight) * adapter.scaling
            # Deltas are computed in fp32 (here and in adapter mode): the product must be finite there.
            if not abs(coefficient) <= FP32_MAX:
                raise ValueError(
                    f"adapter {adapter.name!r}: weight {weight} x scaling {adapter.scaling} for layer "
                    f"{layer} {kind} is not finite in float32"
                )
            if weight != 0:
                plan.setdefault(name, []).append(DeltaTerm(a, b, coefficient))
    return {name: plan[name] for name in sorted(plan)}


def _check_shape(module: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, adapter: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or weight is None:
        raise ValueError(f"adapter {adapter!r} targets {name!r}, a {type(module).__name__}, not a Linear")
    if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"adapter {adapter!r}: {name!r} is {list(weight.shape)} but B @ A is "
            f"{list(b.shape)} @ {list(a.shape)}: adapter built for another base"
        )


def _delta(terms: Sequence[DeltaTerm], out: torch.Tensor) -> torch.Tensor:
    """`sum_i coefficient_i * (B_i @ A_i)` in fp32, written into `out` (a reused scratch buffer)."""
    if not terms:
        raise ValueError("a planned module has no delta terms")
    for i, (a, b, coefficient) in enumerate(terms):
        a = a.to(device=out.device, dtype=torch.float32)
        b = b.to(device=out.device, dtype=torch.float32)
        if i == 0:
            torch.mm(b, a, out=out).mul_(coefficient)
        else:
            out.addmm_(b, a, alpha=coefficient)
    return out


class _Buffers:
    """Memory one model's merges reuse: a host copy per touched weight and one fp32 scratch.

    Allocating ~the touched weights' size on every request costs page faults on CPU and slow pinned
    allocations on GPU, so the buffers stay with the model (`release_buffers` frees them).
    """

    def __init__(self) -> None:
        self.copies: dict[str, torch.Tensor] = {}
        self.scratch: dict[torch.device, torch.Tensor] = {}

    def host_copy(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` copied where later writes to it cannot reach; pinned host memory for CUDA."""
        saved = self.copies.get(name)
        if saved is None or saved.shape != weight.shape or saved.dtype != weight.dtype:
            saved = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=weight.is_cuda)
            self.copies[name] = saved
        return saved.copy_(weight)

    def fp32(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        flat = self.scratch.get(device)
        if flat is None or flat.numel() < shape.numel():
            flat = torch.empty(shape.numel(), dtype=torch.float32, device=device)
            self.scratch[device] = flat
        return flat[: shape.numel()].view(shape)


_BUFFERS: weakref.WeakKeyDictionary[nn.Module, _Buffers] = weakref.WeakKeyDictionary()


def release_buffers(model: nn.Module) -> None:
    """Free the host copies and scratch kept for `model`'s merges (they are re-made on demand)."""
    _BUFFERS.pop(model, None)


class MergedWeights:
    """The original tensors of the Linears one `apply` changed; `restore()` copies them back.

    Mutable on purpose: it tracks whether it has been restored, so restoring twice is harmless.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live weight, original)
        self.modules: list[str] = []  # names of the touched Linears, kept after restore for reporting
        self.touched_bytes = 0
        self.restored = False

    def _save(self, name: str, weight: torch.Tensor, buffers: _Buffers) -> None:
        self._saved.append((weight, buffers.host_copy(name, weight)))
        self.modules.append(name)
        self.touched_bytes += weight.numel() * weight.element_size()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every saved original back (never subtract); a no-op once done."""
        if self.restored:
            return
        # Newest first: if two names share one tensor, its first (true) original is written last.
        for weight, original in reversed(self._saved):
            weight.copy_(original)
        self.restored = True
        self._saved.clear()
        model = self._model()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def is_merged(model: nn.Module) -> bool:
    """Whether `model` currently holds merged weights that have not been restored."""
    return model in _ACTIVE


@torch.no_grad()
def apply(model: nn.Module, plan: Plan) -> MergedWeights:
    """Merge `plan` into `model` in place and return what restores it.

    If anything fails midway (e.g. out of memory), the modules already changed are restored before
    the error propagates.

    Raises:
        RuntimeError: `model` already holds merged weights (restore them first).
        ValueError: a planned module is missing or has another shape, or its merged weight would not
            be finite in the weight's dtype (the model is then restored before the error).
    """
    if is_merged(model):
        raise RuntimeError("model already holds merged weights; restore them before merging again")
    modules = dict(model.named_modules())
    # Check every module before changing any, so a bad plan leaves the model untouched.
    plan = {name: terms for name, terms in plan.items() if terms}
    for name, terms in plan.items():
        if name not in modules:
            raise ValueError(f"planned module {name!r} is not in the model")
        for a, b, _ in terms:
            _check_shape(modules[name], name, a, b, "plan")
    state = MergedWeights(model)
    _ACTIVE[model] = state
    buffers = _BUFFERS.setdefault(model, _Buffers())
    try:
        for name, terms in plan.items():
            weight = modules[name].weight
            state._save(name, weight, buffers)
            delta = _delta(terms, buffers.fp32(weight.shape, weight.device))
            # In place, `delta + weight` equals `weight.float() + delta` without a second fp32 buffer;
            # copy_ rounds to the weight's dtype exactly as `.to(weight.dtype)` would, in one write.
            delta.add_(weight)
            _check_finite(delta, weight.dtype, name)
            weight.copy_(delta)
    except BaseException:
        state.restore()
        raise
    return state


def _check_finite(merged: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Before writing: every merged value fits `dtype` (NaN and inf fail the comparison too).

    A finite weight x scaling can still overflow (a large weight on a large delta, or fp16's 65504):
    decoding inf/NaN weights gives garbage text under greedy and a failure under sampling.
    """
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    low, high = torch.aminmax(merged)  # no weight-sized temporary; NaN propagates and fails both tests
    if not bool((low >= -limit) & (high <= limit)):
        kind = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"merging into {name!r} gives weights that are not finite in {kind}: lower the amplification weight"
        )


def restore(state: MergedWeights) -> None:
    """Copy the originals `apply` saved back into the model (idempotent)."""
    state.restore()


@contextmanager
def merged(model: nn.Module, plan: Plan) -> Iterator[MergedWeights]:
    """Apply `plan` for the duration of the block; restores on every exit path."""
    state = apply(model, plan)
    try:
        yield state
    finally:
        state.restore()
