"""A static KV cache and a compiled decode step for `ModelSource`'s models (gpt-fast's recipe).

Each decode step of the dynamic path grows every layer's cache by one column (a new tensor per
layer and model) and runs the model eagerly: on a small model at batch 1 most of a token's time
is that Python and allocator work, not reading the weights. Here every model's K/V live in
preallocated `transformers.StaticCache` tensors of a fixed shape `[b, H, L, D]`, the step writes
its column in place, and the step itself (both models' forwards and the logits slice) is one
`torch.compile`d function: inductor's C++ kernels on CPU, Triton with CUDA graphs
(`mode="reduce-overhead"`) on a GPU.

Shapes are bucketed so a running batch compiles a handful of graphs, not one per length: rows
round up to a power of two (`row_bucket`, as vLLM captures CUDA graphs per batch size) and the
cache length to a power of two of at least `MIN_LENGTH` columns. A row that leaves or joins moves
rows between slots (a copy), never changes the compiled shape unless the row count crosses a
bucket. Slots past the live rows decode a dummy token on a one-column mask; their logits are
dropped.

The layout is the dynamic path's, column for column: rows left-padded to the batch's length `S`,
the step writing column `S - 1` of every row (`StaticLayer.cumulative_length`, set before each
step), the 2-D attention mask zero on padding. The paired step (`lda.paired`) attends over the
used columns only (a mask `[b, S]`, its width a symbolic size of the compiled graph, so reading the
cache costs what the dynamic cache's does); each model's own forward and a CUDA graph take the
mask over the whole cache `[b, L]`. So `RunningBatch` drives a `StaticSource` exactly as a
`ModelSource`: prefill (eager, into a dynamic cache; the rows move into the static cache at their
first step or when they join a running batch), `keep_rows`, `join`, `trim_left`, `crop`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from lda import paired as pairing
from lda.cache_ops import Layers
from lda.paired import PairedWeights, paired_forward, why_not_paired
from lda.source import ModelSource, context_window, input_device, logits_width

MIN_LENGTH = 256


def row_bucket(rows: int) -> int:
    """The compiled batch size for `rows` live rows: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def row_buckets(max_rows: int) -> list[int]:
    """Every bucket a batch of up to `max_rows` rows can use."""
    return sorted({row_bucket(r) for r in (1 << k for k in range(max_rows.bit_length() + 1)) if r <= max_rows}
                  | {row_bucket(max_rows)})  # fmt: skip


def length_bucket(columns: int, limit: int | None) -> int:
    """The cache length for `columns` used columns: a power of two >= MIN_LENGTH, capped at the
    models' context window (`limit`), which no row may pass anyway."""
    length = MIN_LENGTH
    while length < columns:
        length *= 2
    return length if limit is None else max(min(length, limit), columns)


def _full_width(models: Sequence[Any]) -> int:
    """The logits every one of `models` has (a width at least this keeps them all)."""
    return min(logits_width(m) for m in models)


def _kv_shape(model: Any) -> tuple[int, int]:
    """(key/value heads, head dim) of a model's attention layers."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(heads), int(head_dim)


def supports_static(models: Sequence[Any]) -> str | None:
    """Why these models cannot use the static path (None when they can): every layer must be a
    full-attention one (sliding windows and linear attention keep other state), and all models on
    one device, not split by a device map."""
    devices = {input_device(m) for m in models}
    if len(devices) != 1:
        return "the models are on different devices"
    for m in models:
        if getattr(m, "hf_device_map", None) and len(set(m.hf_device_map.values())) > 1:
            return "a model is split over devices"
        cfg = m.config.get_text_config(decoder=True)
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            return f"a model has {sorted(kinds - {'full_attention'})} layers"
    return None


@dataclass
class Shape:
    rows: int  # the bucket: the compiled batch size
    length: int  # cache columns


def _hf_step(
    models: list[Any],
    width: int,
    caches: list[StaticCache],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    column: torch.Tensor,
) -> list[torch.Tensor]:
    """Each model's own forward on its static cache (the write column is the caches' counters)."""
    out = []
    for model, cache in zip(models, caches):
        logits = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        out.append(logits[:, -1, :width].float())
    return out


def _paired_step(
    paired: PairedWeights,
    width: int,
    caches: list[StaticCache],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    column: torch.Tensor,
) -> list[torch.Tensor]:
    return paired_forward(paired, caches, tokens, mask, positions, column, width)


def _configure_dynamo() -> None:
    """Process-wide settings for the decode step's compiles (the only ones the server makes)."""
    # Dynamo keeps graphs per code object: every family's step is the same function with its own
    # models, a batch of 1 is its own graph, and past the default 8 it would run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Sizes that happen to be equal while tracing (the used columns and the rows, say) would
    # otherwise share one symbol, and the graph would recompile when they part.
    torch.fx.experimental._config.use_duck_shape = False


class Family:
    """What every pool of one set of models shares: the models, their paired weights, the step
    function (compiled once: the pools pass their caches as arguments, so a second pool reuses the
    graphs) and the compile timings. Each running batch has a pool of its own (its caches): the
    engine runs an isolated experiment's batch beside the interactive one on the same models.

    `trusting`: check the paired weights only when `lda.paired.may_change` was called since the
    last check (the server: its engine calls it before every job), not before every step."""

    def __init__(
        self, models: Sequence[Any], width: int | None, compile: bool, mode: str | None, dynamic: bool,
        paired: bool, trusting: bool = False,
    ) -> None:  # fmt: skip
        why = supports_static(models)
        if why:
            raise ValueError(f"no static cache: {why}")
        self.models = list(models)
        self.full_width = _full_width(self.models)
        self.width = width or self.full_width
        self.compiled = compile
        self.graphs = compile and mode is not None and "reduce-overhead" in mode  # CUDA graphs
        self.options = {"dynamic": dynamic, "mode": mode}
        # Two Llama-family models of one shape: the paired step (lda.paired); else each model's forward.
        self.paired = PairedWeights(self.models) if paired and why_not_paired(self.models) is None else None
        self.trusting = trusting
        self._checked: int | None = None  # the generation the last full check saw
        if compile:
            _configure_dynamo()
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self.pools: list[StaticPool] = []
        self.step = self._build()

    def _build(self) -> Callable[..., list[torch.Tensor]]:
        fn = _paired_step if self.paired is not None else _hf_step
        return torch.compile(fn, **self.options) if self.compiled else fn

    @property
    def reads_used_columns(self) -> bool:
        """Whether the step attends over the used columns only (the paired step without CUDA
        graphs: a mask as wide as the used columns, a symbolic size in the compiled graph), not the
        whole cache (each model's own forward needs a mask as long as its cache; a CUDA graph
        replays fixed shapes)."""
        return self.paired is not None and not self.graphs

    @property
    def first_argument(self) -> Any:
        return self.paired if self.paired is not None else self.models

    def check(self) -> None:
        """Before a step: a replaced (not changed in place) parameter, a wrapper or a hook makes the
        stacks stale, so the models' own forward takes over (one more compile)."""
        if self.paired is None or (self.trusting and self._checked == pairing.generation()):
            return
        self._checked = pairing.generation()
        if not self.paired.intact():
            self.paired = None
            self.step = self._build()
            for pool in self.pools:
                pool._column = None

    def claim(self, source: Any, home: StaticPool) -> StaticPool:
        """A pool for `source`'s rows: `home` or another whose batch has ended, else a new one."""
        for pool in [home, *self.pools]:
            owner = pool.owner() if pool.owner is not None else None
            if owner is None or owner is source:
                break
        else:
            pool = StaticPool(self.models, self.width, family=self)
        # A second batch's caches go when its batch ends (the first pool's stay for the next one).
        pool.owner = weakref.ref(source) if pool is self.pools[0] else weakref.ref(source, pool._released)
        return pool


class StaticPool:
    """One running batch's static caches (one per model, of the current shape: the previous one is
    freed when the shape changes), stepped with its family's step function.

    `compile=False` runs the same static-cache step eagerly (the reference the compiled one is
    tested against). `mode` is torch.compile's ("reduce-overhead" adds CUDA graphs on a GPU).
    `dynamic=True` compiles one graph whose batch and length are symbolic (dynamo still
    specializes a batch of 1), so every bucket after the first costs no compile: on 2 CPU cores a
    compile takes ~20 s for a 2-layer model; CUDA graphs are still recorded per bucket.
    `dynamic=False` compiles each bucket's shape on its own. `paired=False` keeps each model's own
    forward where the paired step would apply. `family`: share another pool's (see `Family`).
    `trusting`: see `Family`.
    """

    def __init__(
        self,
        models: Sequence[Any],
        width: int | None = None,
        compile: bool = True,
        mode: str | None = None,
        dynamic: bool = True,
        paired: bool = True,
        family: Family | None = None,
        trusting: bool = False,
    ) -> None:
        self.family = family or Family(models, width, compile, mode, dynamic, paired, trusting)
        self.family.pools.append(self)
        self.models = self.family.models
        self.device = input_device(self.models[0])
        self.width = self.family.width
        self.window = context_window(self.models)
        self.shape: Shape | None = None
        self.caches: list[StaticCache] = []
        self.allocated = 0  # the caches' columns: the shape's length, and a spare one (`_allocate`)
        self.owner: weakref.ref[Any] | None = None  # the StaticSource whose rows the caches hold
        self._column: int | None = None  # what every layer's write counter holds now
        self._column_t = torch.zeros(1, dtype=torch.long, device=self.device)  # the paired step's column

    @property
    def paired(self) -> PairedWeights | None:
        return self.family.paired

    def _released(self, _: Any) -> None:
        """The batch using these caches ended (its source is gone): free them."""
        self.caches, self.shape, self._column = [], None, None

    @property
    def compile_seconds(self) -> dict[tuple[int, int], float]:
        return self.family.compile_seconds

    # -- caches ----------------------------------------------------------------------------------

    def _allocate(self, shape: Shape) -> list[StaticCache]:
        # Reading only the used columns, one spare column keeps them from ever spanning the whole
        # cache: a slice that is the whole tensor would be a second graph (inductor's matmul tells
        # the two apart).
        self.allocated = shape.length + (1 if self.family.reads_used_columns else 0)
        caches = []
        for m in self.models:
            cache = StaticCache(config=m.config, max_cache_len=self.allocated)
            heads, head_dim = _kv_shape(m)
            dtype = next(m.parameters()).dtype
            cache.early_initialization(shape.rows, heads, head_dim, dtype, self.device)
            caches.append(cache)
        return caches

    def reshape(self, shape: Shape, rows: torch.Tensor | None, columns: int) -> None:
        """Make `shape` the current one, moving rows `rows` of the current cache (all live rows,
        in their new order; None: none yet) into its first slots, columns [0, columns)."""
        if self.shape == shape and rows is None:
            return
        old = self.caches
        new = old if self.shape == shape else self._allocate(shape)
        if rows is not None and len(rows) and old:
            for cache_old, cache_new in zip(old, new, strict=True):
                for lo, ln in zip(cache_old.layers, cache_new.layers, strict=True):
                    keys = lo.keys[:, :, :columns].index_select(0, rows)
                    values = lo.values[:, :, :columns].index_select(0, rows)
                    ln.keys[: len(rows), :, :columns].copy_(keys)
                    ln.values[: len(rows), :, :columns].copy_(values)
        if new is not old:
            self._column = None
        self.caches, self.shape = new, shape

    def write(self, slot: int, layers_per_model: list[Layers], at: int) -> None:
        """Rows of dynamic caches (one `Layers` per model, [k, H, s, D] each) into slots
        [slot, slot + k), columns [at, at + s)."""
        for cache, layers in zip(self.caches, layers_per_model, strict=True):
            for layer, (keys, values) in zip(cache.layers, layers, strict=True):
                k, s = keys.shape[0], keys.shape[-2]
                layer.keys[slot : slot + k, :, at : at + s].copy_(keys)
                layer.values[slot : slot + k, :, at : at + s].copy_(values)

    def shift(self, rows: int, columns: int, by: int) -> None:
        """Move columns [0, columns) of the first `rows` slots `by` columns (right when > 0, left
        when < 0), every layer and model."""
        for cache in self.caches:
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    if by > 0:
                        t[:rows, :, by : by + columns].copy_(t[:rows, :, :columns].clone())
                    else:
                        t[:rows, :, : columns + by].copy_(t[:rows, :, -by:columns].clone())

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, column: int
    ) -> list[torch.Tensor]:
        """One decode step of the current shape: `tokens` [b, 1], `mask` [b, U] over the used
        columns [0, U), `positions` [b, 1]; the new K/V go to column `column` (< U) of every slot."""
        family = self.family
        family.check()
        if not family.reads_used_columns:  # the mask spans the whole cache
            full = mask.new_zeros((mask.shape[0], self.allocated))
            full[:, : mask.shape[1]] = mask
            mask = full
        if family.paired is not None:
            self._column_t.fill_(column)
        elif column != self._column:
            # Each layer's counter says where its next write goes, and a step advances it by one:
            # set only when the batch's column moved otherwise (a join, a trim, a new cache).
            for cache in self.caches:
                for layer in cache.layers:
                    layer.cumulative_length.fill_(column)
        self._column = None  # a step that fails part-way leaves the counters unknown
        key = (self.shape.rows, self.shape.length)
        started = time.perf_counter()
        if family.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = family.step(
            family.first_argument, self.width, self.caches, tokens, mask, positions, self._column_t
        )
        if family.graphs:
            out = [o.clone() for o in out]  # a replay's outputs are overwritten by the next replay
        if family.compiled and key not in family.compile_seconds:
            family.compile_seconds[key] = round(time.perf_counter() - started, 2)
        self._column = column + 1
        return out


class StaticSource:
    """A `LogitsSource` over a `StaticPool`: what `ModelSource` does, on the pool's static caches.

    Prefilled rows wait in a dynamic cache (`pending`, a `ModelSource`) until the first decode
    step moves them into the static slots, or until they join a running `StaticSource`.
    """

    repaddable = True

    def __init__(self, pool: StaticPool) -> None:
        self.pool = pool
        self.device = pool.device
        self.pending: ModelSource | None = None
        self.rows = 0  # live rows in the static slots [0, rows)
        self.columns = 0  # used columns [0, columns)

    @property
    def models(self) -> list[Any]:
        return self.pool.models

    def _pending_source(self) -> ModelSource:
        models = self.pool.models
        return ModelSource(models[0], models[1] if len(models) > 1 else None, self.pool.width)

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at every position (a prompt's own logprobs): eager, no cache involved."""
        return self._pending_source().score(input_ids, attention_mask, position_ids)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.pending = self._pending_source()
        self.rows = self.columns = 0
        return self.pending.prefill(input_ids, attention_mask, position_ids)

    def _shape(self, rows: int, columns: int) -> Shape:
        current = self.pool.shape
        length = current.length if current and columns <= current.length else 0
        return Shape(row_bucket(rows), length or length_bucket(columns, self.pool.window))

    def _install(self, columns: int) -> None:
        """Move the pending rows into slots [0, k) (the pool's shape chosen for them)."""
        assert self.pending is not None
        caches = self.pending.caches
        k = caches[0].layers[0].keys.shape[0]
        s = caches[0].layers[0].keys.shape[-2]
        self.pool = self.pool.family.claim(self, self.pool)
        self.pool.reshape(self._shape(k, columns), None, 0)
        self.pool.write(0, [[(layer.keys, layer.values) for layer in c.layers] for c in caches], 0)
        self.rows, self.columns, self.pending = k, s, None

    def decode_one_token(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, width = attention_mask.shape  # width: the columns after this step
        if self.pending is not None:
            self._install(width)
        assert n == self.rows and width == self.columns + 1, (n, self.rows, width, self.columns)
        shape = self._shape(n, width)
        if shape != self.pool.shape:
            self.pool.reshape(shape, torch.arange(n, device=self.device), self.columns)
        b = shape.rows
        step_tokens = torch.zeros((b, 1), dtype=tokens.dtype, device=self.device)
        step_tokens[:n] = tokens
        mask = torch.zeros((b, width), dtype=attention_mask.dtype, device=self.device)
        mask[:n] = attention_mask
        mask[n:, width - 1] = 1  # a dummy slot attends to its own column: finite, and dropped
        positions = torch.zeros((b, 1), dtype=position_ids.dtype, device=self.device)
        positions[:n] = position_ids
        logits = self.pool.step(step_tokens, mask, positions, width - 1)
        self.columns = width
        after = logits[0][:n]
        return after, (logits[1][:n] if len(logits) > 1 else None)

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.pending is not None:
            self.pending.keep_rows(rows)
            return
        n = len(rows)
        self.pool.reshape(self._shape(n, self.columns), rows.to(self.device), self.columns)
        self.rows = n

    def join(self, other: Any) -> None:
        """Append `other`'s prefilled rows (a `StaticSource` whose rows are pending), left re-padded
        to the longer of the two lengths."""
        theirs = other.pending if isinstance(other, StaticSource) else other
        if not isinstance(theirs, ModelSource):
            raise TypeError("only prefilled rows can join a static batch")
        if self.pending is not None:
            self.pending.join(theirs)
            return
        caches: list[DynamicCache] = theirs.caches
        k = caches[0].layers[0].keys.shape[0]
        s = caches[0].layers[0].keys.shape[-2]
        width = max(self.columns, s)
        shape = self._shape(self.rows + k, width + 1)
        if shape != self.pool.shape:
            self.pool.reshape(shape, torch.arange(self.rows, device=self.device), self.columns)
        if width > self.columns:
            self.pool.shift(self.rows, self.columns, width - self.columns)
        self.pool.write(
            self.rows, [[(layer.keys, layer.values) for layer in c.layers] for c in caches], width - s
        )
        self.rows += k
        self.columns = width

    def trim_left(self, columns: int) -> None:
        if self.pending is not None:
            self.pending.trim_left(columns)
            return
        if columns > 0:
            self.pool.shift(self.rows, self.columns, -columns)
            self.columns -= columns

    def crop(self, length: int) -> None:
        if self.pending is not None:
            self.pending.crop(length)
            return
        self.columns = min(self.columns, length)  # the next step writes column `length` again


class DecodeCompiler:
    """The process's compiled decode: one `StaticPool` per set of models, made on first use.

    `source(models, width)` is what a running batch's `make_source` becomes: a `StaticSource` on
    the models' pool, or a plain `ModelSource` where the models cannot use a static cache (why is
    kept in `refused`). `warm_up` compiles (and on a GPU records) every row bucket up to the
    engine's batch bound before the server says it is ready. `trusting`: the pools' paired
    weights are checked after `lda.paired.may_change` only (see `Family`).
    """

    def __init__(self, mode: str | None = None, dynamic: bool = True, trusting: bool = False) -> None:
        self.mode = mode
        self.trusting = trusting
        self.dynamic = dynamic
        self.pools: dict[tuple[tuple[int, ...], int | None], StaticPool] = {}
        self.refused: dict[str, str] = {}
        self.warm_up_seconds: float | None = None

    def pool(self, models: Sequence[Any], width: int | None = None) -> StaticPool | None:
        # A width that keeps every logit is no width: one pool (and graph) for both.
        key = (tuple(id(m) for m in models), None if width is None or width >= _full_width(models) else width)
        if key not in self.pools:
            why = supports_static(models)
            if why:
                self.refused[" + ".join(type(m).__name__ for m in models)] = why
                return None
            self.pools[key] = StaticPool(
                models, width, compile=True, mode=self.mode, dynamic=self.dynamic, trusting=self.trusting
            )
        return self.pools[key]

    def source(self, models: Sequence[Any], width: int | None = None) -> Callable[[], Any]:
        pool = self.pool(models, width)
        if pool is None:
            after, before = models[0], (models[1] if len(models) > 1 else None)
            return lambda: ModelSource(after, before, width)
        return lambda: StaticSource(pool)

    def warm_up(self, model_sets: Sequence[tuple[Sequence[Any], int | None]], max_rows: int) -> float:
        """Compile the step of every set at every row bucket up to `max_rows` (one dummy step
        each: its K/V land in slots no batch reads before overwriting). Returns the seconds."""
        started = time.perf_counter()
        for models, width in model_sets:
            pool = self.pool(models, width)
            if pool is None:
                continue
            for rows in row_buckets(max_rows):
                pool.reshape(Shape(rows, length_bucket(2, pool.window)), None, 0)
                # Two used columns (a size of 1 would be a graph of its own: dynamo specializes 0 and 1).
                mask = torch.ones((rows, 2), dtype=torch.long, device=pool.device)
                # Tokens and positions as two tensors: dynamo guards on aliasing, and a step never
                # gets one tensor for both.
                tokens = torch.zeros((rows, 1), dtype=torch.long, device=pool.device)
                positions = torch.zeros((rows, 1), dtype=torch.long, device=pool.device)
                for _ in range(2 if pool.family.graphs else 1):  # CUDA graphs record on a later call
                    pool.step(tokens, mask, positions, 1)
        self.warm_up_seconds = round(time.perf_counter() - started, 2)
        return self.warm_up_seconds

    def info(self) -> dict[str, Any]:
        compiles = {}
        for pool in self.pools.values():
            name = " + ".join(getattr(m.config, "_name_or_path", "") or type(m).__name__ for m in pool.models)
            if pool.width < pool.family.full_width:
                name += f" (logits [:{pool.width}])"
            base, k = name, 2
            while name in compiles:  # two unnamed models of one class
                name, k = f"{base} #{k}", k + 1
            compiles[name] = {f"{r}x{length}": s for (r, length), s in sorted(pool.compile_seconds.items())}
        return {
            "warm_up_s": self.warm_up_seconds,
            "first_step_s": compiles,
            "not_compiled": dict(self.refused),
        }


_compiler: DecodeCompiler | None = None


def use(compiler: DecodeCompiler | None) -> None:
    """Make `compiler` the process's compiled decode (None: eager everywhere). The server sets it
    once its models are loaded; the running batches' sources come from `source_factory`."""
    global _compiler
    _compiler = compiler


def current() -> DecodeCompiler | None:
    return _compiler


def source_factory(models: Sequence[Any], width: int | None = None) -> Callable[[], Any]:
    """A running batch's `make_source` for `models` (after, then before when there are two):
    static and compiled when the process has a compiler, `ModelSource` otherwise."""
    if _compiler is not None:
        return _compiler.source(models, width)
    after, before = models[0], (models[1] if len(models) > 1 else None)
    return lambda: ModelSource(after, before, width)
