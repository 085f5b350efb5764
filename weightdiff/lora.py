"""Per-task LoRA factors on a batch of tasks: task t of the batch runs through its own low-rank diff.

Layout and initialisation follow Diff Interpretation Tuning (DIT,
`src/finetune_recovery/multi_task_lora.py`): `down` is DIT's `B` `[T, in, r]`, zeros, and `up` is
DIT's `A` `[T, r, out]`, `kaiming_uniform_` over the whole `[T, r, out]` tensor (so the bound is
`sqrt(6 / (r * out))`), and the delta is `x @ down @ up / r`. Because `down` starts at zero the
wrapped model starts exactly at the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from amplification.resolve import decoder_layers


def scaling(r: int, lora_alpha: float | None = None) -> float:
    """The factor on `x @ down @ up`: `1 / r` as in DIT, or `lora_alpha / r` as in PEFT when given."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if lora_alpha is not None and lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}")
    return (1.0 if lora_alpha is None else float(lora_alpha)) / r


@dataclass(frozen=True)
class LoRAFactors:
    """One task's diff on one Linear: `delta(x) = x @ down @ up * scaling`."""

    down: torch.Tensor  # [in, r], DIT's B
    up: torch.Tensor  # [r, out], DIT's A


class MultiTaskLoRALinear(nn.Module):
    """`base(x) + (x @ down[t] @ up[t]) * scaling` for the rows of task t.

    The input's first dimension holds the tasks, task-major: `[T * b, ..., in]` where rows
    `t*b .. t*b+b-1` belong to task t (b = 1 gives DIT's `[T, S, in]`). With `bypass` set the
    module is exactly `base` for any batch size, so the model can serve generation between steps.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        r: int,
        lora_alpha: float | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if generators is not None and len(generators) != num_tasks:
            raise ValueError(f"expected {num_tasks} generators, got {len(generators)}")
        self.base = base
        self.num_tasks = num_tasks
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = scaling(r, lora_alpha)
        self.bypass = False
        weight = base.weight
        # Factors stay at least fp32 even on a bf16 base: Adam's small updates vanish in bf16.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.down = nn.Parameter(
            torch.zeros(num_tasks, base.in_features, r, dtype=dtype, device=weight.device)
        )
        self.up = nn.Parameter(
            self._init_up(num_tasks, r, base.out_features, dtype, generators).to(weight.device)
        )

    @staticmethod
    def _init_up(
        num_tasks: int,
        r: int,
        out_features: int,
        dtype: torch.dtype,
        generators: Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """DIT's kaiming init, drawn per task from that task's generator on the CPU.

        Each slice is initialised as `[1, r, out]` so its fan-in is `r * out`, the same as DIT's
        call on the full `[T, r, out]` tensor, while the values depend only on the task's seed.
        """
        up = torch.empty(num_tasks, r, out_features, dtype=dtype)
        for t in range(num_tasks):
            nn.init.kaiming_uniform_(up[t : t + 1], generator=None if generators is None else generators[t])
        return up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.bypass:
            return out
        if x.size(0) % self.num_tasks:
            raise ValueError(f"batch size {x.size(0)} is not a multiple of num_tasks {self.num_tasks}")
        h = x.reshape(self.num_tasks, -1, x.size(-1)).to(self.down.dtype)  # [T, b*S, in]
        # DIT's einsums "bsi,bir->bsr", "bsr,bro->bso" as batched matmuls: on CPU einsum was
        # ~10x slower than bmm for these small per-task shapes.
        # Scale the small [T, b*S, r] intermediate, not the full-width delta.
        low = torch.bmm(h, self.down).mul_(self.scaling)  # [T, b*S, r]
        if out.dtype == low.dtype:
            base = out.reshape(self.num_tasks, -1, out.size(-1))
            return torch.baddbmm(base, low, self.up).reshape(out.shape)  # out + low @ up, fused
        return out + torch.bmm(low, self.up).reshape(out.shape).to(out.dtype)

    def task_factors(self, task: int) -> LoRAFactors:
        """Detached CPU copies of one task's factors."""
        return LoRAFactors(self.down[task].detach().cpu().clone(), self.up[task].detach().cpu().clone())

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, r={self.r}, scaling={self.scaling:g}, bypass={self.bypass}"


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` inside the decoder layers by qualified name (never lm_head or embeddings)."""
    list_name, layers = decoder_layers(model)
    found: dict[str, nn.Linear] = {}
    for index, layer in enumerate(layers):
        prefix = f"{list_name}.{index}" if list_name else str(index)
        for name, module in layer.named_modules():
            if isinstance(module, MultiTaskLoRALinear):
                raise ValueError(f"{prefix}.{name} is already wrapped; unwrap the model first")
            if isinstance(module, nn.Linear):
                found[f"{prefix}.{name}"] = module
    return found


def select_targets(model: nn.Module, targets: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The decoder-layer Linears whose attribute name is in `targets` (all of them when None)."""
    linears = decoder_linears(model)
    if targets is None:
        return linears
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    leaf_names = {name.rsplit(".", 1)[-1] for name in linears}
    unknown = sorted(set(targets) - leaf_names)
    if unknown:
        raise ValueError(f"targets: unknown module names {unknown}; decoder layers have {sorted(leaf_names)}")
    wanted = set(targets)
    return {name: mod for name, mod in linears.items() if name.rsplit(".", 1)[-1] in wanted}


def task_generators(num_tasks: int, seed: int | Sequence[int] | None) -> list[torch.Generator] | None:
    """One CPU generator per task: a list gives each task's seed, an int gives task t `seed + t`."""
    if seed is None:
        return None
    seeds = [seed + t for t in range(num_tasks)] if isinstance(seed, int) else list(seed)
    if len(seeds) != num_tasks:
        raise ValueError(f"seed: expected {num_tasks} task seeds, got {len(seeds)}")
    return [torch.Generator().manual_seed(s) for s in seeds]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def wrap(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    *,
    num_tasks: int,
    r: int,
    lora_alpha: float | None = None,
    seed: int | Sequence[int] | None = None,
) -> list[str]:
    """Replace the target Linears in the decoder layers with `MultiTaskLoRALinear`s, in place.

    Args:
        targets: attribute names such as `q_proj`; None wraps every decoder-layer Linear.
        seed: per-task seeds (or one int, task t gets `seed + t`). Each task draws its init from
            its own generator in module order, so its factors do not depend on the other tasks.

    Returns:
        The qualified names of the wrapped modules, in model order.
    """
    chosen = select_targets(model, targets)
    generators = task_generators(num_tasks, seed)
    scaling(r, lora_alpha)
    done: list[tuple[str, nn.Linear]] = []
    try:
        for name, linear in chosen.items():
            set_module(model, name, MultiTaskLoRALinear(linear, num_tasks, r, lora_alpha, generators))
            done.append((name, linear))
    except BaseException:
        # All or nothing: an OOM at the k-th wrapper must not leave k-1 wrapped modules behind,
        # which would break every later forward (batch size checks) and every later wrap().
        for name, linear in done:
            set_module(model, name, linear)
        raise
    return list(chosen)


def wrappers(model: nn.Module) -> dict[str, MultiTaskLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiTaskLoRALinear)}


def unwrap(model: nn.Module) -> list[str]:
    """Put the original Linear objects back (same objects, untouched weights); returns their names."""
    found = wrappers(model)
    for name, module in found.items():
        set_module(model, name, module.base)
    return list(found)


def set_bypass(model: nn.Module, bypass: bool) -> None:
    for module in wrappers(model).values():
        module.bypass = bypass


@contextlib.contextmanager
def bypassed(model: nn.Module, bypass: bool = True) -> Iterator[nn.Module]:
    """Run the wrapped model as the base (or, with `bypass=False`, with its diffs) inside the block."""
    previous = {name: m.bypass for name, m in wrappers(model).items()}
    set_bypass(model, bypass)
    try:
        yield model
    finally:
        for name, module in wrappers(model).items():
            module.bypass = previous.get(name, module.bypass)


def factors_of(model: nn.Module) -> list[dict[str, LoRAFactors]]:
    """Each task's `{module name: LoRAFactors}`, detached on the CPU."""
    found = wrappers(model)
    if not found:
        return []
    num_tasks = next(iter(found.values())).num_tasks
    return [{name: m.task_factors(t) for name, m in found.items()} for t in range(num_tasks)]
