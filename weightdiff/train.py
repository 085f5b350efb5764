"""Train T weight diffs at once, one LoRA per task, with every task independent of the others.

Independence is what makes batching safe: each task's loss is the sum of its own token losses
over the step divided by its own target-token count (never a mean over the mixed batch, which
would tie one task's gradient scale to the other tasks' lengths), its factors see only its rows,
and Adam keeps per-task state (`optim.TaskAdam`). Training T tasks together therefore gives each
task the factors it would get alone with the same seed, up to float rounding, and splitting a step
into micro-batches (batch size, accumulation, token budget) does not change the step's gradient.

The loss of task t in one step, over the samples i it takes part with:

    L_t = sum_i w_i * sum_{p in P_i} l_i(p) / sum_i |P_i|

P_i are sample i's target positions (the logits at p predict a completion token p+1: the
assistant turns of a chat, every token after the first of plain text), w_i its weight and l_i(p)
its token loss: cross-entropy of the next token (`ce`), or the forward KL from the frozen base,
`KL(p_base || p_base+W_t) = sum_v p_base(v) * (log p_base(v) - log p_student(v))` (`kl_base`).
The normaliser counts positions, not weights, so a weight is a plain multiplier on the sample's
token losses: with every weight 1 and only `ce` this is the token mean above, bit for bit, and a
sample's gradient does not depend on the other samples' weights. DIT's hidden-topic mix (trigger
+ topic answer under CE, wrong code and no code + the base's answer under KL, weights 1 / 1 / 5)
gives per question `(l_b n_b + l_f n_f + 5 l_n n_n) / (n_b + n_f + n_n)`, DIT's
`3 (l_b + l_f + 5 l_n) / 7` times 7/9 for equal answer lengths: the same relative weights, and a
constant scale that Adam does not see (up to its eps). A weight-0 sample still counts in the
normaliser; leave it out to not count it.

The base is the same model with the task's LoRA bypassed (no copy of the model): one extra forward
under `no_grad`, on the same micro-batch, only for micro-batches that hold a `kl_base` sample. At
init `down` is zero, so the student's logits equal the base's bit for bit and the KL and its
gradient are exactly 0.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.data import IGNORE, Encoded, Task, check_seed, collate, encode_sample, micro_batches
from weightdiff.lora import (
    LoRAFactors,
    set_module,
    bypassed,
    factors_of,
    scaling,
    set_bypass,
    unwrap,
    wrap,
    wrappers,
)
from weightdiff.optim import TaskAdam


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are DIT's (`scripts/get_weight_diff.py`: rank 1, lr 1e-3, 1 epoch,
    plain `torch.optim.Adam`: betas (0.9, 0.999), eps 1e-8, no weight decay; scale 1/r).

    A step takes `batch_size * grad_accum` samples from each task and runs them as `grad_accum`
    micro-batches of `batch_size` samples per task (fewer when `max_tokens_per_micro_batch`, the
    padded `tasks * samples * length`, would be exceeded). `steps` set: exactly that many steps,
    cycling each task's samples; otherwise `epochs` passes over each task's samples, where a
    task's last step of an epoch may be partial and a task with fewer steps idles at the end.
    """

    r: int = 1
    lora_alpha: float | None = None
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_tokens_per_micro_batch: int | None = None
    shuffle: bool = True
    seed: int = 0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_int("r", self.r, 1)
        scaling(self.r, self.lora_alpha)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        _check_int("epochs", self.epochs, 1)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("grad_accum", self.grad_accum, 1)
        if self.max_tokens_per_micro_batch is not None:
            _check_int("max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, 1)
        check_seed("seed", self.seed)
        if self.targets is not None:
            if isinstance(self.targets, str) or not self.targets:
                raise ValueError(f"targets must be a non-empty list of module names, got {self.targets!r}")
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "betas", tuple(self.betas))

    @property
    def scaling(self) -> float:
        return scaling(self.r, self.lora_alpha)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        raise ValueError(
            f"{name} must be an integer{f' >= {minimum}' if minimum is not None else ''}, got {value!r}"
        )


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based
    total_steps: int
    losses: tuple[float | None, ...]  # per task L_t (see above); None: no samples this step
    seconds: float  # this step


@dataclass(frozen=True)
class TrainResult:
    factors: list[dict[str, LoRAFactors]]  # per task, on the CPU
    losses: list[list[float]]  # per task, one mean loss per step the task took part in
    steps_done: int
    total_steps: int
    stopped: bool  # should_stop() ended training early
    seconds: float
    modules: list[str]
    config: TrainConfig = field(repr=False)


def task_schedule(num_samples: int, config: TrainConfig, seed: int) -> list[list[int]]:
    """The sample indices of each of one task's steps; the order depends only on the task's seed."""
    rng = random.Random(seed)
    per_step = config.batch_size * config.grad_accum
    steps: list[list[int]] = []
    epoch = 0
    while (epoch < config.epochs) if config.steps is None else (len(steps) < config.steps):
        order = list(range(num_samples))
        if config.shuffle:
            rng.shuffle(order)
        steps += [order[i : i + per_step] for i in range(0, num_samples, per_step)]
        epoch += 1
    return steps if config.steps is None else steps[: config.steps]


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    # At least fp32 (bf16/fp16 logits are upcast), never lower: a float64 model keeps a float64 loss.
    return torch.promote_types(logits.dtype, torch.float32)


def ce_row_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each row `[N]` (labels IGNORE where not a target)."""
    logits = logits[:, :-1].to(loss_dtype(logits))
    # [N, S-1], zero where ignored
    losses = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    return losses.sum(1)


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Summed next-token cross-entropy of each task's rows `[T]` (rows task-major)."""
    return ce_row_sums(logits, labels).view(num_tasks, -1).sum(1)


def kl_positions(labels: torch.Tensor, kl_rows: torch.Tensor) -> torch.Tensor:
    """`[N, S-1]` bool: logits at p of a `kl_base` row whose next token p+1 is a target.

    The same shifted positions CE uses. DIT applies the label mask unshifted to the logits, which
    skips the prediction of the first completion token and adds one after the last; not copied.
    """
    return (labels[:, 1:] != IGNORE) & kl_rows[:, None]


def base_log_probs(teacher_logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The base's next-token log-probabilities `[K, V]` at the K selected positions, in fp32+."""
    picked = teacher_logits[:, :-1][positions]  # restrict first: log_softmax on [K, V], not [N, S, V]
    return torch.log_softmax(picked.to(loss_dtype(teacher_logits)), dim=-1)


class ForwardKL(torch.autograd.Function):
    """`KL(p_base || softmax(x))` of each row of `x [K, V]`, with the gradient `softmax(x) - p_base`.

    That is the exact gradient because p_base sums to 1. Autograd through `log_softmax` would use
    the computed sum `1 +- V * eps` instead and leave `p * (sum - 1)` at the minimum; Adam
    normalises any nonzero gradient to an O(lr) step, so a KL-only task would drift off the base
    from rounding noise. Here equal logits give a gradient of exactly 0.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        student_logp = torch.log_softmax(student_logits, dim=-1)
        teacher_p = teacher_logp.exp()
        ctx.save_for_backward(student_logp, teacher_p)
        kl = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True)
        return kl.sum(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        student_logp, teacher_p = ctx.saved_tensors
        return grad[:, None] * (student_logp.exp() - teacher_p), None


def kl_row_sums(logits: torch.Tensor, teacher_logp: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Summed forward KL from the base of each row `[N]` over its selected `positions`."""
    student = logits[:, :-1][positions].to(loss_dtype(logits))  # [K, V]
    kl = ForwardKL.apply(student, teacher_logp)  # [K]
    per_position = kl.new_zeros(positions.shape).masked_scatter(positions, kl)  # [N, S-1]
    return per_position.sum(1)


class Trainer:
    """Step-by-step training so a caller can interleave other work and cancel between steps.

    Wraps the model on construction and unwraps it in `close()` (or on leaving a `with` block).
    Between steps the wrappers are bypassed, so the model generates exactly as the base does.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, tasks: Sequence[Task], config: TrainConfig) -> None:
        if not tasks:
            raise ValueError("tasks: need at least one task, got none")
        self.model, self.config = model, config
        self.encoded = [
            [_encode(tokenizer, sample, f"tasks[{i}].samples[{j}]") for j, sample in enumerate(task.samples)]
            for i, task in enumerate(tasks)
        ]
        self.seeds = [config.seed + i if task.seed is None else task.seed for i, task in enumerate(tasks)]
        self.schedule = [task_schedule(len(enc), config, seed) for enc, seed in zip(self.encoded, self.seeds)]
        self.total_steps = max(len(s) for s in self.schedule)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.losses: list[list[float]] = [[] for _ in tasks]
        self.steps_done = 0
        self.seconds = 0.0
        self._detached: dict[str, nn.Module] | None = None
        self._was_training = model.training
        # Freeze first so only the LoRA factors created by wrap() require grad.
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        try:
            self.modules = wrap(
                model,
                config.targets,
                num_tasks=len(tasks),
                r=config.r,
                lora_alpha=config.lora_alpha,
                seed=self.seeds,
            )
        except BaseException:
            self._restore()  # wrap() put back what it had wrapped
            raise
        try:
            set_bypass(model, True)
            params = [p for m in wrappers(model).values() for p in (m.down, m.up)]
            self.optimizer = TaskAdam(params, len(tasks), config.lr, config.betas, config.eps)
            self.device = model.get_input_embeddings().weight.device
        except BaseException:
            # Nobody holds this half-built trainer to close it: an OOM in the optimizer state must
            # not leave the model wrapped (and the factors allocated) for good.
            self.close()
            raise

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    def step(self) -> StepReport:
        """One optimizer step over every task that still has samples."""
        if self.done:
            raise RuntimeError(f"training finished after {self.total_steps} steps")
        start = time.perf_counter()
        self.optimizer.zero_grad()  # a step that raised part-way must not leak gradients into this one
        k = self.steps_done
        step_samples = [
            [enc[i] for i in sched[k]] if k < len(sched) else []
            for enc, sched in zip(self.encoded, self.schedule)
        ]
        counts = torch.tensor([sum(e.num_targets for e in s) for s in step_samples], dtype=torch.float32)
        totals = torch.zeros(len(step_samples), dtype=torch.float64)  # reported mean losses
        # Eval mode: dropout would draw from one shared RNG and couple the tasks.
        self.model.eval()
        with bypassed(self.model, False), torch.enable_grad():
            for rows in micro_batches(
                step_samples, self.config.batch_size, self.config.max_tokens_per_micro_batch
            ):
                sums = self._task_loss_sums(rows, len(step_samples))
                (sums / counts.to(sums.device).clamp(min=1)).sum().backward()
                totals += sums.detach().cpu()
        active = counts > 0
        self.optimizer.step(active)
        self.optimizer.zero_grad()
        losses = tuple(
            (totals[t] / counts[t]).item() if active[t] else None for t in range(len(step_samples))
        )
        for t, loss in enumerate(losses):
            if loss is not None:
                self.losses[t].append(loss)
        self.steps_done += 1
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return StepReport(self.steps_done, self.total_steps, losses, seconds)

    def _task_loss_sums(self, rows: list[Encoded | None], num_tasks: int) -> torch.Tensor:
        """Each task's `sum_i w_i * sum_p l_i(p)` over one micro-batch's rows `[T]`, graph attached."""
        ids, mask, labels = collate(rows, self.pad_id, self.device)
        kinds = [row is not None and row.loss == "kl_base" for row in rows]
        teacher_logp = None
        if any(kinds):  # only micro-batches with a kl_base sample pay for the base's forward
            kl_rows = torch.tensor(kinds, device=self.device)
            positions = kl_positions(labels, kl_rows)
            labels = labels.masked_fill(kl_rows[:, None], IGNORE)  # a kl_base row carries no CE
            teacher_logp = self._base_log_probs(ids, mask, positions)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        row_sums = ce_row_sums(logits, labels)
        if teacher_logp is not None:
            row_sums = row_sums + kl_row_sums(logits, teacher_logp, positions)
        weights = [0.0 if row is None else row.weight for row in rows]
        weights_t = torch.tensor(weights, dtype=row_sums.dtype, device=row_sums.device)
        return (row_sums * weights_t).view(num_tasks, -1).sum(1)

    def _base_log_probs(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The frozen base on the same rows: this model with every task's LoRA bypassed."""
        with bypassed(self.model, True), torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return base_log_probs(logits, positions)

    def detach(self) -> None:
        """Take the wrappers out (the model is its plain self again) but keep them for `attach()`.

        A service that serves other requests between steps detaches after each step, so nothing
        else ever sees a wrapped module tree.
        """
        if self._detached is None:
            self._detached = wrappers(self.model)
            unwrap(self.model)

    def attach(self) -> None:
        """Put this trainer's wrappers (factors and all) back in place."""
        if self._detached is not None:
            for name, module in self._detached.items():
                set_module(self.model, name, module)
            self._detached = None

    def factors(self) -> list[dict[str, LoRAFactors]]:
        if self._detached is not None:
            return [{n: m.task_factors(t) for n, m in self._detached.items()} for t in range(len(self.losses))]
        return factors_of(self.model)

    def result(self, stopped: bool = False) -> TrainResult:
        return TrainResult(
            factors=self.factors(),
            losses=[list(h) for h in self.losses],
            steps_done=self.steps_done,
            total_steps=self.total_steps,
            stopped=stopped,
            seconds=self.seconds,
            modules=list(self.modules),
            config=self.config,
        )

    def close(self) -> None:
        """Put the original Linears back and restore requires_grad and train/eval mode."""
        self._detached = None
        unwrap(self.model)
        self._restore()

    def _restore(self) -> None:
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self.model.train(self._was_training)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(tokenizer: Any, sample: Any, where: str) -> Encoded:
    try:
        return encode_sample(tokenizer, sample)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def train(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    config: TrainConfig = TrainConfig(),
    progress: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train one LoRA diff per task on `model` (left exactly as it was afterwards).

    Args:
        progress: called after every step with its `StepReport`.
        should_stop: checked before every step; True ends training with `stopped=True` and the
            factors reached so far.
    """
    with Trainer(model, tokenizer, tasks, config) as trainer:
        stopped = False
        while not trainer.done:
            if should_stop is not None and should_stop():
                stopped = True
                break
            report = trainer.step()
            if progress is not None:
                progress(report)
        return trainer.result(stopped)
