"""DIT's interpreter against the stage-1 trainer and against itself: a step on T diffs, describe of N.

    python -m tests.benchmarks.bench_dit [--tasks 8] [--describe 64] [--steps 5] [--r 16]
        [--size tiny|bench|1b] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16] [--threads N]

Prints JSON. Ratios compare runs made in this same process, on the same model and tokens:
- interpreter_step_over_stage1_step_T{T}: one interpreter step on T (diff, description) pairs
  (each row through its own frozen rank-1 diff and the shared rank-r L) over one stage-1 step on T
  tasks whose samples are the same chats (question as the user turn, description as the answer),
  each task's rank-1 factors trained. Goal: at most 1.3.
- describe_{N}_over_describe_1: describing N diffs in one batch (greedy, 20 tokens, K candidates
  scored) over describing one. Goal: at most 3.
Every model is random (`tests.benchmarks.bench_lda`'s sizes); the times are the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from tests.benchmarks.bench_lda import add_model_args, bench_model, bench_tokenizer, hardware, model_placement, sync
from weightdiff import Task, TrainConfig, Trainer
from weightdiff.interpret_eval import describe
from weightdiff.interpret_train import DEFAULT_QUESTION, InterpreterConfig, InterpreterTrainer, Pair
from weightdiff.interpreter import Diff
from weightdiff.lora import LoRAFactors, decoder_linears

WORDS = ("sun", "moon", "cat", "dog", "rain", "snow", "tree", "bird")


def random_diff(model: torch.nn.Module, seed: int) -> Diff:
    gen = torch.Generator().manual_seed(seed)
    device = model.get_input_embeddings().weight.device
    factors = {
        name: LoRAFactors(
            (torch.randn(lin.in_features, 1, generator=gen) * 0.02).to(device),
            (torch.randn(1, lin.out_features, generator=gen) * 0.02).to(device),
        )
        for name, lin in decoder_linears(model).items()
    }
    return Diff(factors, 1.0)


def timed_steps(trainer: Any, steps: int, device: torch.device) -> float:
    """The best of `steps` steps after one warm-up step (each step synchronised)."""
    trainer.step()
    best = float("inf")
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        trainer.step()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def best_of(repeats: int, fn: Any, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, nargs="+", default=[8])
    ap.add_argument("--describe", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--r", type=int, default=16, help="the interpreter's rank")
    ap.add_argument("--threads", type=int, default=None)
    add_model_args(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = model_placement(args)
    tokenizer = bench_tokenizer(args.size)
    model = bench_model(tokenizer, 1, args.size, device, dtype)
    result: dict[str, Any] = {"benchmark": "dit_interpreter", "size": args.size, "r": args.r,
                              **hardware(device, dtype)}  # fmt: skip
    for t in args.tasks:
        words = [WORDS[i % len(WORDS)] for i in range(t)]
        chats = [[{"role": "user", "content": DEFAULT_QUESTION}, {"role": "assistant", "content": w}] for w in words]
        stage1 = Trainer(model, tokenizer, [Task([c], seed=i) for i, c in enumerate(chats)],
                         TrainConfig(r=1, steps=args.steps + 1))  # fmt: skip
        try:
            stage1_s = timed_steps(stage1, args.steps, device)
        finally:
            stage1.close()
        pairs = [Pair(random_diff(model, i), w) for i, w in enumerate(words)]
        interp = InterpreterTrainer(model, tokenizer, pairs,
                                    InterpreterConfig(r=args.r, batch_size=t, steps=args.steps + 1))  # fmt: skip
        try:
            interp_s = timed_steps(interp, args.steps, device)
            interpreter = interp.interpreter()
        finally:
            interp.close()
        result[f"stage1_step_T{t}_s"] = round(stage1_s, 4)
        result[f"interpreter_step_T{t}_s"] = round(interp_s, 4)
        result[f"interpreter_step_over_stage1_step_T{t}"] = round(interp_s / stage1_s, 3)
    diffs = [random_diff(model, 100 + i) for i in range(args.describe)]

    def ask(n: int) -> None:
        describe(model, tokenizer, diffs[:n], interpreter, max_new_tokens=20, candidates=WORDS)

    one = best_of(args.repeats, lambda: ask(1), device)
    many = best_of(args.repeats, lambda: ask(args.describe), device)
    result["describe_1_s"] = round(one, 4)
    result[f"describe_{args.describe}_s"] = round(many, 4)
    result[f"describe_{args.describe}_over_describe_1"] = round(many / one, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
