"""Batched weight-diff training against one-at-a-time PEFT LoRA, on the ~29M-parameter `bench_lda` Llama.

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_weightdiff [--tasks 8 16] [--steps 5]
        [--seq-len 64] [--threads 2] [--repeats 1] [--size tiny|bench|1b] [--device cpu|cuda]
        [--dtype auto|bf16] [--no-memory]

Every task is one plain-text sample of about `--seq-len` tokens (whole corpus words, BOS included),
a different one per task; LoRA rank 8, alpha 8 (scale 1) on q, k, v, o, gate, up and down; Adam
lr 1e-3; `--steps` steps per task (`--size`, `--device`, `--dtype` as in `bench_lda`). Prints JSON.
Times are best of `--repeats` rounds, each round
running every compared job once in turn, so a neighbour's load hits them alike. On a shared 2-core
VM set OMP_WAIT_POLICY=PASSIVE: OpenMP spin-waiting makes 2-thread runs 10-20x slower and erratic.
For each T in `--tasks`:
- batched_over_sequential_T{T}: wall time of training the T tasks one after another with PEFT over
  the wall time of one `weightdiff.train(...)` call training them together (a speedup). Goal >= 4
  at T = 8. The PEFT side is one `get_peft_model` over its own copy of the base, created once
  and reused: per task its LoRA layers are re-initialised (`reset_lora_parameters`, PEFT's own
  init) and a fresh `torch.optim.Adam` is made, then `--steps` steps of forward with
  `labels=ids`, backward, Adam step. That leaves out PEFT's per-task wrapping while ours pays
  its wrap/unwrap inside the timed call, so the figure is conservative. Both sides see the same
  token ids; `first_step_loss_max_abs_diff_T{T}` (both start at the base, so the first losses
  agree up to float rounding) checks it.
- train_over_frozen_fwd_bwd_T{T}: tokens/s of our training steps (`TrainResult.seconds`: the
  steps only, optimizer included, not the wrap) over tokens/s of a plain forward + backward of
  the frozen base on the same `[T, width]` batch, mask and loss (`token_loss_sums` / target
  counts). Goal >= 0.8. The base has no trainable parameter, so backward would stop at once; a
  forward hook makes the input embeddings' output require grad, so backward runs through every
  layer and computes the activation gradients LoRA training also needs, but no weight gradient:
  it is the floor any adapter trainer on a frozen base pays, and the ratio is what the per-task
  LoRA matmuls and TaskAdam add to it. Tokens are the padded `T * width` per step on both sides.
Memory (T = the smallest of `--tasks`, 4 samples per task, `batch_size=4`, so a step is one
micro-batch of `T * 4 * width` tokens unless a budget splits it):
- memory.<setting>: `max_tokens_per_micro_batch` unset ("unsplit"), half and a quarter of the
  step's tokens, and half of `T * width` ("below_floor": smaller than one sample per task, the
  least a micro-batch can hold because the tasks share every forward; the job still runs, as
  micro-batches of one sample per task). Each setting trains in a fresh subprocess with
  MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so RSS follows live memory):
  `peak_rss_growth_bytes` is VmHWM after training minus RSS before it (peak reset through
  `/proc/self/clear_refs`; null if refused), `micro_batches_per_step` counts model forwards,
  and `factors_max_abs_diff_vs_unsplit`, `losses_max_abs_diff_vs_unsplit` show that splitting
  keeps the step's gradient, so the factors, up to float rounding (Adam's first steps move an
  entry by about lr even for a rounding-sized gradient; `unsplit_down_max_abs`, the largest `down`
  entry, zero at the start, is the scale of what training changed).
  On CUDA the same settings run in this process instead, and `peak_gpu_growth_bytes` is the peak
  of `torch.cuda.max_memory_allocated` during training over the allocation before it. `--no-memory`
  skips this part.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedTokenizerFast

from tests.benchmarks.bench_lda import (
    add_model_args,
    bench_model,
    bench_tokenizer,
    corpus,
    hardware,
    model_placement,
    sync,
)
from weightdiff import Task, TrainConfig, TrainResult, train
from weightdiff.data import collate, encode_sample
from weightdiff.train import token_loss_sums

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
LR = 1e-3
MEM_SAMPLES = 4


def texts(tokenizer: Any, count: int, seq_len: int) -> list[str]:
    """`count` consecutive, distinct runs of corpus words, each as long as fits `seq_len` tokens."""
    words = " ".join(corpus()).split()
    out: list[str] = []
    i = 0
    while len(out) < count:
        j = i + 1
        while len(tokenizer(" ".join(words[i : j + 1]))["input_ids"]) <= seq_len:
            j += 1
        out.append(" ".join(words[i:j]))
        i = j
    return out


def config(steps: int, **kw: Any) -> TrainConfig:
    return TrainConfig(r=RANK, lora_alpha=RANK, lr=LR, steps=steps, targets=TARGETS, **kw)


def peft_sequential(peft_model: nn.Module, tokenizer: Any, samples: list[str], steps: int) -> list[float]:
    """Train one fresh adapter per sample, one after another; returns each task's first loss."""
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    device = peft_model.get_input_embeddings().weight.device
    first = []
    for t, text in enumerate(samples):
        torch.manual_seed(t)
        for layer in layers:
            layer.reset_lora_parameters("default", True)
        optimizer = torch.optim.Adam(params, lr=LR)
        ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)
        for step in range(steps):
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0:
                first.append(loss.item())
    return first


def frozen_fwd_bwd(
    model: nn.Module, batch: tuple[torch.Tensor, ...], counts: torch.Tensor, steps: int
) -> None:
    """`steps` forward + backward passes of the frozen model, gradients flowing from the embeddings up."""
    ids, mask, labels = batch
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            (token_loss_sums(logits, labels, len(ids)) / counts).sum().backward()
    finally:
        hook.remove()


def compare(args: argparse.Namespace, base: nn.Module, peft_model: nn.Module, tokenizer: Any, t: int) -> dict:
    samples = texts(tokenizer, t, args.seq_len)
    tasks = [Task([s]) for s in samples]
    encoded = [encode_sample(tokenizer, s) for s in samples]
    device = base.get_input_embeddings().weight.device
    batch = collate(encoded, tokenizer.pad_token_id, device)
    counts = torch.tensor([e.num_targets for e in encoded], dtype=torch.float32, device=device)
    results: list[TrainResult] = []
    peft_first: list[list[float]] = []
    jobs: dict[str, Callable[[], object]] = {
        "ours": lambda: results.append(train(base, tokenizer, tasks, config(args.steps))),
        "peft": lambda: peft_first.append(peft_sequential(peft_model, tokenizer, samples, args.steps)),
        "frozen": lambda: frozen_fwd_bwd(base, batch, counts, args.steps),
    }
    best = {name: float("inf") for name in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    step_seconds = min(r.seconds for r in results)
    tokens = args.steps * batch[0].numel()
    ours_first = [losses[0] for losses in results[0].losses]
    return {
        f"batched_train_T{t}_s": round(best["ours"], 3),
        f"sequential_peft_T{t}_s": round(best["peft"], 3),
        f"batched_over_sequential_T{t}": round(best["peft"] / best["ours"], 3),
        f"train_T{t}_tokens_per_s": round(tokens / step_seconds, 1),
        f"frozen_fwd_bwd_T{t}_tokens_per_s": round(tokens / best["frozen"], 1),
        f"train_over_frozen_fwd_bwd_T{t}": round(best["frozen"] / step_seconds, 3),
        f"padded_width_T{t}": batch[0].shape[1],
        f"first_step_loss_max_abs_diff_T{t}": max(abs(a - b) for a, b in zip(ours_first, peft_first[0])),
    }


def peak_rss_bytes() -> int:
    """`VmHWM` of this process: the peak resident set since start or the last reset."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def mem_probe(root: Path, budget: int, size: str) -> None:
    """Subprocess side: train the saved job once under `budget` (0: none); print growth and counts."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    model = bench_model(tokenizer, 1, size)
    job = json.loads((root / "job.json").read_text())
    cfg = config(job["steps"], batch_size=MEM_SAMPLES, max_tokens_per_micro_batch=budget or None)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))  # libraries and thread pools up before the reset
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before: int | None = peak_rss_bytes()
    except OSError:
        before = None
    result = train(model, tokenizer, [Task(s) for s in job["tasks"]], cfg)
    growth = None if before is None else peak_rss_bytes() - before
    factors = {
        f"{t}.{name}.{kind}": getattr(f, kind)
        for t, task_factors in enumerate(result.factors)
        for name, f in task_factors.items()
        for kind in ("down", "up")
    }
    torch.save(factors, root / f"factors_{budget}.pt")
    print(json.dumps({"growth": growth, "micro_batches": forwards[0] / cfg.steps, "losses": result.losses}))


def memory_job(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[str]], int, dict[str, int]]:
    """The memory part's tasks (`MEM_SAMPLES` samples each), their padded width and the budgets."""
    t = min(args.tasks)
    samples = texts(tokenizer, t * MEM_SAMPLES, args.seq_len)
    width = max(len(encode_sample(tokenizer, s).ids) for s in samples)
    tasks = [samples[i : i + MEM_SAMPLES] for i in range(0, len(samples), MEM_SAMPLES)]
    full = t * MEM_SAMPLES * width
    budgets = {"unsplit": 0, "half": full // 2, "quarter": full // 4, "below_floor": t * width // 2}
    return tasks, width, budgets


def gpu_memory(args: argparse.Namespace, base: nn.Module, tokenizer: Any) -> dict:
    """The memory comparison on CUDA, in this process: peak device allocation growth per budget."""
    tasks, width, budgets = memory_job(args, tokenizer)
    device = base.get_input_embeddings().weight.device
    report: dict[str, Any] = {
        "tasks": len(tasks),
        "samples_per_task": MEM_SAMPLES,
        "padded_width": width,
        "step_tokens": len(tasks) * MEM_SAMPLES * width,
    }
    runs = {}
    for name, budget in budgets.items():
        cfg = config(args.steps, batch_size=MEM_SAMPLES, max_tokens_per_micro_batch=budget or None)
        forwards = [0]
        hook = base.register_forward_pre_hook(lambda *_, n=forwards: n.__setitem__(0, n[0] + 1))
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            result = train(base, tokenizer, [Task(s) for s in tasks], cfg)
        finally:
            hook.remove()
        sync(device)
        runs[name] = result
        diff = {}
        if name != "unsplit":
            ref = runs["unsplit"]
            diff = {
                "factors_max_abs_diff_vs_unsplit": max(
                    (getattr(f, kind) - getattr(ref.factors[t][m], kind)).abs().max().item()
                    for t, task_factors in enumerate(result.factors)
                    for m, f in task_factors.items()
                    for kind in ("down", "up")
                ),
                "losses_max_abs_diff_vs_unsplit": max(
                    abs(a - b)
                    for split, whole in zip(result.losses, ref.losses, strict=True)
                    for a, b in zip(split, whole, strict=True)
                ),
            }
        report[name] = {
            "max_tokens_per_micro_batch": budget or None,
            "micro_batches_per_step": forwards[0] / cfg.steps,
            "peak_gpu_growth_bytes": torch.cuda.max_memory_allocated(device) - before,
            **diff,
        }
    return report


def memory(args: argparse.Namespace, tokenizer: Any, root: Path) -> dict:
    t = min(args.tasks)
    tasks, width, budgets = memory_job(args, tokenizer)
    tokenizer.save_pretrained(root / "tokenizer")
    job = {"steps": args.steps, "tasks": tasks}
    (root / "job.json").write_text(json.dumps(job))
    full = t * MEM_SAMPLES * width
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {}
    for name, budget in budgets.items():
        cmd = [sys.executable, "-m", "tests.benchmarks.bench_weightdiff", "--threads", str(args.threads)]
        cmd += ["--mem-probe", str(root), "--budget", str(budget), "--size", args.size]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = torch.load(root / "factors_0.pt")
    report: dict[str, Any] = {
        "tasks": t,
        "samples_per_task": MEM_SAMPLES,
        "padded_width": width,
        "step_tokens": full,
        "unsplit_down_max_abs": max(ref[k].abs().max().item() for k in ref if k.endswith(".down")),
    }
    for name, budget in budgets.items():
        factors = torch.load(root / f"factors_{budget}.pt")
        pairs = zip(runs[name]["losses"], runs["unsplit"]["losses"], strict=True)
        loss_diff = max(abs(a - b) for split, whole in pairs for a, b in zip(split, whole, strict=True))
        report[name] = {
            "max_tokens_per_micro_batch": budget or None,
            "micro_batches_per_step": runs[name]["micro_batches"],
            "peak_rss_growth_bytes": runs[name]["growth"],
            "factors_max_abs_diff_vs_unsplit": max((factors[k] - ref[k]).abs().max().item() for k in ref),
            "losses_max_abs_diff_vs_unsplit": loss_diff,
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory part")
    add_model_args(ap)
    ap.add_argument("--mem-probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mem_probe is not None:
        mem_probe(args.mem_probe, args.budget, args.size)
        return
    device, dtype = model_placement(args)
    start = time.perf_counter()
    tokenizer = bench_tokenizer(args.size)
    # train() restores these flags afterwards
    base = bench_model(tokenizer, 1, args.size, device, dtype).requires_grad_(False)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS), lora_dropout=0.0),
    ).eval()
    warm = texts(tokenizer, 2, args.seq_len)
    train(base, tokenizer, [Task([s]) for s in warm], config(1))
    peft_sequential(peft_model, tokenizer, warm[:1], 1)
    result: dict[str, Any] = {
        "benchmark": "weightdiff_train",
        "parameters": sum(p.numel() for p in base.parameters()),
        "rank": RANK,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "size": args.size,
        **hardware(device, dtype),
    }
    for t in args.tasks:
        result |= compare(args, base, peft_model, tokenizer, t)
    if args.no_memory:
        pass
    elif device.type == "cuda":
        result["memory"] = gpu_memory(args, base, tokenizer)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result["memory"] = memory(args, tokenizer, Path(tmp))
    result["benchmark_wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
