"""DIT's interpreter: one shared LoRA L on top of a different weight diff W_i for each row.

Every decoder-layer Linear becomes `InterpreterLinear`:

    y = base(x) + (x @ down_i @ up_i) * scaling_i + (x @ lora_A^T @ lora_B^T) * scaling

Row i's frozen diff W_i (`down_i [in, r_i]`, `up_i [r_i, out]`, its own scaling) and the shared
L (`lora_A [r, in]`, `lora_B [out, r]`, PEFT's names and layout) simply add, as in DIT's
`multi_lora.py`. DIT materialises a dense `[out, in]` matrix per row (7 GB per row on a 4B model);
the factored path `x @ down_i @ up_i` is the same sum at the cost of two thin batched matmuls.
Diffs of different ranks are padded with zero columns to the batch's largest rank, which adds
exact zeros. L starts as DIT's: the output side (`lora_B`, DIT's `A [out, r]`) kaiming-uniform with
fan-in r, the input side (`lora_A`, DIT's `B [r, in]`) zeros, so M + W + L is exactly M + W at init.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.lora import LoRAFactors, decoder_linears, scaling, set_module


@dataclass(frozen=True, eq=False)  # tensors have no useful ==; diffs compare by identity
class Diff:
    """A low-rank weight diff: `delta(x) = x @ down @ up * scaling` on each named Linear.

    Both a weight diff W and the interpreter L are one of these (L's `down` is `lora_A^T`).
    """

    factors: Mapping[str, LoRAFactors]  # {module: (down [in, r], up [r, out])}
    scaling: float

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("factors: a diff needs at least one module")
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be finite, got {self.scaling}")
        for name, f in self.factors.items():
            if f.down.dim() != 2 or f.up.dim() != 2 or f.down.shape[1] != f.up.shape[0]:
                raise ValueError(
                    f"{name}: expected down [in, r] and up [r, out], "
                    f"got {list(f.down.shape)} and {list(f.up.shape)}"
                )

    @classmethod
    def from_lora(cls, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> Diff:
        """From PEFT's (and the adapter registry's) `{module: (lora_A [r, in], lora_B [out, r])}`."""
        return cls({name: LoRAFactors(down=a.T, up=b.T) for name, (a, b) in factors.items()}, scaling)

    @property
    def r(self) -> int:
        return max(f.down.shape[1] for f in self.factors.values())


def init_interpreter(
    model: nn.Module, r: int, lora_alpha: float | None = None, seed: int | None = None
) -> Diff:
    """A fresh L on every decoder-layer Linear, initialised as DIT's (`M + W + L == M + W`).

    `lora_B [out, r]` is kaiming-uniform with fan-in r (bound `sqrt(6 / r)`, DIT's call on its
    `A [out, r]`), drawn module by module from one CPU generator seeded with `seed`; `lora_A` is 0.
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    factors = {}
    for name, linear in decoder_linears(model).items():
        lora_B = torch.empty(linear.out_features, r)
        nn.init.kaiming_uniform_(lora_B, generator=generator)
        factors[name] = LoRAFactors(down=torch.zeros(linear.in_features, r), up=lora_B.T)
    return Diff(factors, scaling(r, lora_alpha))


class InterpreterLinear(nn.Module):
    """`base(x)` plus the row's frozen diff (set per batch with `set_diffs`) plus the shared L.

    The input's first dimension holds the rows diff-major: with D diffs set, rows
    `d*b .. d*b+b-1` use diff d (b = 1 in training; b = candidates when scoring them).
    """

    def __init__(
        self,
        base: nn.Linear,
        interpreter: LoRAFactors | None = None,
        scaling: float = 1.0,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        # At least fp32 even on a bf16 base: AdamW's small updates vanish in bf16.
        self.dtype = torch.promote_types(base.weight.dtype, torch.float32)
        device = base.weight.device
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        if interpreter is not None:
            down, up = interpreter.down, interpreter.up
            r = down.shape[1]
            if (tuple(down.shape), tuple(up.shape)) != ((base.in_features, r), (r, base.out_features)):
                raise ValueError(f"L factors {list(down.shape)}, {list(up.shape)} do not fit {base}")
            self.lora_A = nn.Parameter(down.T.to(device, self.dtype).clone(), requires_grad=trainable)
            self.lora_B = nn.Parameter(up.T.to(device, self.dtype).clone(), requires_grad=trainable)
        # The step's diffs: plain attributes, not buffers, so they never enter a state_dict.
        self.down: torch.Tensor | None = None  # [D, in, R]
        self.up: torch.Tensor | None = None  # [D, R, out]
        self.diff_scaling: torch.Tensor | None = None  # [D, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.down is None and self.lora_A is None:
            return out
        h = x.to(self.dtype)
        delta = None
        if self.down is not None:
            rows = self.down.size(0)
            if x.size(0) % rows:
                raise ValueError(f"batch size {x.size(0)} is not a multiple of the {rows} diffs set")
            # Scale the small [D, b*S, R] intermediate, not the full-width delta.
            low = torch.bmm(h.reshape(rows, -1, h.size(-1)), self.down).mul_(self.diff_scaling)
            delta = torch.bmm(low, self.up).reshape(*x.shape[:-1], -1)
        if self.lora_A is not None:
            lora = F.linear(F.linear(h, self.lora_A) * self.scaling, self.lora_B)
            delta = lora if delta is None else delta + lora
        # One rounding to the base's dtype for both paths; with L at zero this adds an exact 0.
        return out + delta.to(out.dtype)

    def factors(self) -> LoRAFactors | None:
        """Detached CPU copies of L on this module (None without L)."""
        if self.lora_A is None or self.lora_B is None:
            return None
        return LoRAFactors(self.lora_A.detach().T.cpu().clone(), self.lora_B.detach().T.cpu().clone())

    def extra_repr(self) -> str:
        r = None if self.lora_A is None else self.lora_A.shape[0]
        return f"r={r}, scaling={self.scaling:g}, diffs={None if self.down is None else self.down.shape[0]}"


def wrappers(model: nn.Module) -> dict[str, InterpreterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, InterpreterLinear)}


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """`(in_features, out_features)` of every decoder-layer Linear, wrapped or not."""
    found = wrappers(model)
    if found:
        return {name: (m.base.in_features, m.base.out_features) for name, m in found.items()}
    return {name: (m.in_features, m.out_features) for name, m in decoder_linears(model).items()}


def check_diff(shapes: Mapping[str, tuple[int, int]], diff: Diff, where: str) -> None:
    """Refuse a diff built for other modules or other shapes, naming `where` it came from."""
    for name, f in diff.factors.items():
        if name not in shapes:
            raise ValueError(f"{where}: module {name!r} is not a decoder-layer Linear of this model")
        in_features, out_features = shapes[name]
        if f.down.shape[0] != in_features or f.up.shape[1] != out_features:
            raise ValueError(
                f"{where}: {name!r} maps {f.down.shape[0]} -> {f.up.shape[1]} features, the model's "
                f"Linear {in_features} -> {out_features}: a diff built for another model"
            )


def wrap_interpreter(model: nn.Module, interpreter: Diff | None = None, trainable: bool = False) -> list[str]:
    """Wrap every decoder-layer Linear in an `InterpreterLinear`, in place; returns their names.

    Args:
        interpreter: L, on the modules it names (None: no L, the plain `M + W` baseline).
        trainable: whether L's parameters require grad.
    """
    if wrappers(model):
        raise ValueError("the model already holds interpreter wrappers; unwrap it first")
    linears = decoder_linears(model)
    if interpreter is not None:
        shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
        check_diff(shapes, interpreter, "interpreter")
    done: list[tuple[str, nn.Linear]] = []
    try:
        for name, linear in linears.items():
            factors = None if interpreter is None else interpreter.factors.get(name)
            scale = 1.0 if interpreter is None else interpreter.scaling
            set_module(model, name, InterpreterLinear(linear, factors, scale, trainable))
            done.append((name, linear))
    except BaseException:
        for name, linear in done:  # all or nothing, as weightdiff.lora.wrap
            set_module(model, name, linear)
        raise
    return list(linears)


def unwrap_interpreter(model: nn.Module) -> list[str]:
    """Put the original Linear objects back (same objects, untouched weights); returns their names."""
    found = wrappers(model)
    for name, module in found.items():
        set_module(model, name, module.base)
    return list(found)


@contextlib.contextmanager
def interpreting(model: nn.Module, interpreter: Diff | None = None) -> Iterator[nn.Module]:
    """The model wrapped (L frozen) inside the block and its plain self again after, on any exit."""
    wrap_interpreter(model, interpreter)
    try:
        yield model
    finally:
        unwrap_interpreter(model)


def interpreter_of(found: Mapping[str, InterpreterLinear]) -> Diff:
    """L as a `Diff` (CPU copies) from `{name: wrapper}` (`wrappers(model)`, or ones detached)."""
    factors = {name: f for name, m in found.items() if (f := m.factors()) is not None}
    if not factors:
        raise ValueError("no interpreter among these modules")
    return Diff(factors, next(iter(found.values())).scaling)


def set_diffs(model: nn.Module, diffs: Sequence[Diff | None]) -> None:
    """Give row group d of the next forwards diff d (None: no diff, exact zeros).

    Each module gets `down [D, in, R]` and `up [D, R, out]`, R the largest rank among the diffs
    on it, lower ranks padded with zero columns; a module no diff touches gets no diff path.
    """
    found = wrappers(model)
    if not found or not diffs:
        raise ValueError("set_diffs needs a wrapped model and at least one diff")
    shapes = {name: (m.base.in_features, m.base.out_features) for name, m in found.items()}
    for i, diff in enumerate(diffs):
        if diff is not None:
            check_diff(shapes, diff, f"diffs[{i}]")
    some = next(iter(found.values()))
    device, dtype = some.base.weight.device, some.dtype
    diff_scaling = torch.tensor(
        [0.0 if d is None else d.scaling for d in diffs], dtype=dtype
    ).view(-1, 1, 1).to(device)
    for name, module in found.items():
        stacked = _stack(diffs, name, *shapes[name], dtype)
        if stacked is None:
            module.down = module.up = module.diff_scaling = None
        else:
            module.down, module.up = stacked[0].to(device), stacked[1].to(device)
            module.diff_scaling = diff_scaling


def clear_diffs(model: nn.Module) -> None:
    for module in wrappers(model).values():
        module.down = module.up = module.diff_scaling = None


def _stack(
    diffs: Sequence[Diff | None], name: str, in_features: int, out_features: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(down [D, in, R], up [D, R, out])` on the CPU, or None when no diff touches `name`."""
    present = [(i, d.factors[name]) for i, d in enumerate(diffs) if d is not None and name in d.factors]
    if not present:
        return None
    ranks = {f.down.shape[1] for _, f in present}
    if len(present) == len(diffs) and len(ranks) == 1:  # the common case: one stack, no padding
        down = torch.stack([f.down for _, f in present]).to(dtype)
        return down, torch.stack([f.up for _, f in present]).to(dtype)
    rank = max(ranks)
    down = torch.zeros(len(diffs), in_features, rank, dtype=dtype)
    up = torch.zeros(len(diffs), rank, out_features, dtype=dtype)
    for i, f in present:
        down[i, :, : f.down.shape[1]] = f.down
        up[i, : f.up.shape[0]] = f.up
    return down, up
