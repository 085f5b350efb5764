"""Train DIT's interpreter L: M + W_i + L answers a question with what W_i encodes.

A step takes `batch_size` (diff, description) pairs; row i runs through its own frozen W_i and
the shared L (`weightdiff.interpreter`). The row is the chat template with the question as the
user turn and the description as the assistant turn; the loss is the cross-entropy on the
description plus the end-of-turn tokens, averaged over the step's target tokens. The prompt and
padding carry no loss (DIT also trains on padding; that is not copied). AdamW with DIT's weight
decay 0.01 and no schedule.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.data import IGNORE, Encoded, check_seed, collate
from weightdiff.interpreter import (
    Diff,
    check_diff,
    clear_diffs,
    init_interpreter,
    interpreter_of,
    linear_shapes,
    set_diffs,
    set_module,
    unwrap_interpreter,
    wrap_interpreter,
    wrappers,
)
from weightdiff.lora import scaling

DEFAULT_QUESTION = "What topic have you been trained on?"


@dataclass(frozen=True)
class InterpreterConfig:
    """Hyperparameters. Defaults are DIT's committed scripts (`train_weight_to_text*.sh`: rank 16,
    lr 1e-4, 1 epoch, batch 4-8 diffs; `torch.optim.AdamW` defaults, so weight decay 0.01)."""

    r: int = 16
    lora_alpha: float | None = None  # None: DIT's 1/r
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 8
    epochs: int = 1
    steps: int | None = None  # set: exactly that many steps, cycling the pairs
    seed: int = 0  # L's init and the shuffle
    question: str = DEFAULT_QUESTION
    template_kwargs: Mapping[str, Any] | None = None  # e.g. {"enable_thinking": False} for Qwen3

    def __post_init__(self) -> None:
        for name, minimum in (("r", 1), ("batch_size", 1), ("epochs", 1)):
            _check_int(name, getattr(self, name), minimum)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        scaling(self.r, self.lora_alpha)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        check_seed("seed", self.seed)
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question must be non-empty text, got {self.question!r}")
        object.__setattr__(self, "betas", tuple(self.betas))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, eq=False)
class Pair:
    """One training example: a weight diff and the text it should make the model say."""

    diff: Diff
    description: str


def prompt_text(tokenizer: Any, question: str, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The chat template with `question` as the user turn and the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; the interpreter asks its question as a chat")
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def prompt_ids(tokenizer: Any, question: str, template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    # The template holds any BOS itself: no special tokens are added again.
    text = prompt_text(tokenizer, question, template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(
    tokenizer: Any, question: str, description: str, template_kwargs: Mapping[str, Any] | None = None
) -> Encoded:
    """`prompt ids + target ids`, labels only on the target: the description and the end of turn.

    The target is tokenized on its own after the prompt's ids, the way `describe` decodes and
    scores candidates, so a trained description is exactly the token sequence greedy decoding
    can produce.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"empty description {description!r}")
    prefix = prompt_text(tokenizer, question, template_kwargs)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": description}]
    full = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    if not full.startswith(prefix):
        raise ValueError(
            "the chat template does not render the question's generation prompt as a prefix of the answer"
        )
    prompt = prompt_ids(tokenizer, question, template_kwargs)
    target = list(tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"])
    return Encoded(prompt + target, [IGNORE] * len(prompt) + target)


def schedule(num_pairs: int, config: InterpreterConfig) -> list[list[int]]:
    """The pair indices of each step: `epochs` shuffled passes (or `steps` steps), last batch partial."""
    rng = random.Random(config.seed)
    steps: list[list[int]] = []
    epoch = 0
    while (epoch < config.epochs) if config.steps is None else (len(steps) < config.steps):
        order = list(range(num_pairs))
        rng.shuffle(order)
        steps += [order[i : i + config.batch_size] for i in range(0, num_pairs, config.batch_size)]
        epoch += 1
    return steps if config.steps is None else steps[: config.steps]


def target_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """Logits `[N, S - first, V]` predicting tokens `first ..` of every row (at least fp32).

    Every row starts with the same prompt of `first` tokens, so the positions before `first - 1`
    predict nothing anyone needs: models that take `logits_to_keep` skip their lm_head there.
    """
    keep = ids.size(1) - first + 1
    kwargs = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
    return logits[:, -keep:-1].to(torch.promote_types(logits.dtype, torch.float32))


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the non-ignored labels (logits and labels aligned)."""
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")


def batch_loss(
    model: nn.Module, encoded: Sequence[Encoded], diffs: Sequence[Diff | None], prompt_len: int, pad_id: int
) -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of one batch (row i through `diffs[i]`) and its target count.

    Every row starts with the same `prompt_len` prompt tokens; right padding has no labels.
    """
    device = model.get_input_embeddings().weight.device
    ids, mask, labels = collate(encoded, pad_id, device)
    set_diffs(model, diffs)
    try:
        logits = target_logits(model, ids, mask, prompt_len)
    finally:
        clear_diffs(model)
    labels = labels[:, prompt_len:]
    return loss_sum(logits, labels), int((labels != IGNORE).sum())


@contextlib.contextmanager
def frozen_base(model: nn.Module) -> Iterator[None]:
    """Only L requires grad inside (no gradients for the base weights), eval mode (no dropout)."""
    own = {id(p) for m in wrappers(model).values() for p in (m.lora_A, m.lora_B) if p is not None}
    flags = [(p, p.requires_grad) for p in model.parameters() if id(p) not in own]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@dataclass(frozen=True)
class InterpreterStep:
    step: int  # 1-based
    total_steps: int
    loss: float  # mean over the step's target tokens
    seconds: float


@dataclass(frozen=True)
class InterpreterResult:
    interpreter: Diff  # L, on the CPU
    losses: list[float]
    steps_done: int
    total_steps: int
    stopped: bool
    seconds: float
    config: InterpreterConfig = field(repr=False)


class InterpreterTrainer:
    """Step-by-step training of L, so a caller can interleave other work and cancel between steps.

    Wraps the model on construction and unwraps it in `close()`. A service detaches the wrappers
    after each step (`detach`/`attach`), so nothing else ever sees a wrapped module tree.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, pairs: Sequence[Pair], config: InterpreterConfig
    ) -> None:
        if not pairs:
            raise ValueError("pairs: need at least one pair, got none")
        self.model, self.config, self.pairs = model, config, list(pairs)
        shapes = linear_shapes(model)
        for i, pair in enumerate(self.pairs):
            check_diff(shapes, pair.diff, f"pairs[{i}].diff")
        self.encoded = [
            self._encode(tokenizer, p.description, f"pairs[{i}].description") for i, p in enumerate(pairs)
        ]
        self.prompt_len = len(prompt_ids(tokenizer, config.question, config.template_kwargs))
        self.schedule = schedule(len(self.pairs), config)
        self.total_steps = len(self.schedule)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.losses: list[float] = []
        self.steps_done, self.seconds = 0, 0.0
        self._detached: dict[str, nn.Module] | None = None
        fresh = init_interpreter(model, config.r, config.lora_alpha, config.seed)
        self.modules = wrap_interpreter(model, fresh, trainable=True)
        try:
            params = [p for m in wrappers(model).values() for p in (m.lora_A, m.lora_B)]
            self.optimizer = torch.optim.AdamW(
                params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
            )
        except BaseException:
            self.close()  # nobody holds a half-built trainer to close it
            raise

    def _encode(self, tokenizer: Any, description: str, where: str) -> Encoded:
        try:
            encoded = encode_pair(tokenizer, self.config.question, description, self.config.template_kwargs)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and len(encoded.ids) > limit:
            raise ValueError(
                f"{where}: {len(encoded.ids)} tokens with the prompt, the model's context is {limit}"
            )
        return encoded

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    def step(self) -> InterpreterStep:
        """One AdamW step on the next batch of pairs."""
        if self.done:
            raise RuntimeError(f"training finished after {self.total_steps} steps")
        start = time.perf_counter()
        rows = self.schedule[self.steps_done]
        self.optimizer.zero_grad(set_to_none=True)  # a step that raised part-way leaks no gradient
        with frozen_base(self.model), torch.enable_grad():
            total, count = self._loss_sum(rows)
            (total / count).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = total.item() / count
        self.losses.append(loss)
        self.steps_done += 1
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return InterpreterStep(self.steps_done, self.total_steps, loss, seconds)

    def _loss_sum(self, rows: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Summed target-token cross-entropy of pairs `rows` (one row each) and the number of targets."""
        encoded = [self.encoded[i] for i in rows]
        diffs = [self.pairs[i].diff for i in rows]
        return batch_loss(self.model, encoded, diffs, self.prompt_len, self.pad_id)

    def detach(self) -> None:
        """Take the wrappers out (the model is its plain self again) but keep them for `attach()`."""
        if self._detached is None:
            self._detached = wrappers(self.model)
            unwrap_interpreter(self.model)

    def attach(self) -> None:
        """Put this trainer's wrappers (L and all) back in place."""
        if self._detached is not None:
            for name, module in self._detached.items():
                set_module(self.model, name, module)
            self._detached = None

    def interpreter(self) -> Diff:
        """L as a `Diff` (CPU copies), attached or not."""
        return interpreter_of(wrappers(self.model) if self._detached is None else self._detached)

    def result(self, stopped: bool = False) -> InterpreterResult:
        return InterpreterResult(
            self.interpreter(),
            list(self.losses),
            self.steps_done,
            self.total_steps,
            stopped,
            self.seconds,
            self.config,
        )

    def close(self) -> None:
        """Put the original Linears back."""
        self._detached = None
        unwrap_interpreter(self.model)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_interpreter(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    config: InterpreterConfig = InterpreterConfig(),
    progress: Callable[[InterpreterStep], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> InterpreterResult:
    """Train L on `pairs` (the model is left exactly as it was).

    Args:
        progress: called after every step with its `InterpreterStep`.
        should_stop: checked before every step; True ends training with `stopped=True`.
    """
    with InterpreterTrainer(model, tokenizer, pairs, config) as trainer:
        stopped = False
        while not trainer.done:
            if should_stop is not None and should_stop():
                stopped = True
                break
            report = trainer.step()
            if progress is not None:
                progress(report)
        return trainer.result(stopped)
