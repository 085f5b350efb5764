"""Amplified LoRA merges and adapter-mode LDA against their baselines, on a ~29M-parameter Llama (CPU ok).

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_amplification [--repeats 5] [--tokens 32]
        [--rows 8] [--threads N] [--size tiny|bench|1b] [--device cpu|cuda] [--dtype auto|bf16] [--no-rss]

The `bench_lda` model and a random rank-16 PEFT LoRA (alpha 32) on q, k, v, o, gate, up and down,
both saved with `save_pretrained`; weight 2.0 on every layer and module kind (`--size`, `--device`,
`--dtype` as in `bench_lda`; on CUDA the reload goes straight to the device). Prints JSON. Times are
best of `--repeats`, the runs of one comparison interleaved so a neighbour's load hits both alike.
On a shared 2-core VM OpenMP's spin-waiting can make 2-thread runs 10x slower and erratic: use
OMP_WAIT_POLICY=PASSIVE or `--threads 1`.
- apply_restore_over_peft_merge_unmerge: our `apply(model, plan)` + `.restore()` over PEFT's
  `merge_adapter()` + `unmerge_adapter()` of the same adapter and scale (a PeftModel over its own
  copy of the base). Goal <= 1.0. `ours_restore_exact` is asserted (SHA-256 of all parameters
  after the first and the last restore); `peft_unmerge_exact`: whether PEFT's subtracting unmerge
  restores bit for bit (expected false), with its largest error after one and after all cycles.
  `merged_max_abs_diff_vs_peft`: both merge the same weights.
- reload_over_apply_restore: `AutoModelForCausalLM.from_pretrained(base_dir)`, the other way back
  to the base, over apply+restore. Goal >= 20. On CPU the loaded tensors map the page-cached
  file, so its reads are deferred; `reload_read_*` adds one read of every parameter.
- adapter_mode_over_two_model_b1 / _b{rows}: greedy LDA tokens/s of `AdapterSource(base, plan)`
  (one model, adapter on and off as two halves of one batch) over `ModelSource(merged_copy, base)`
  (two models, the adapter merged into the copy), at 1 and `--rows` rows, no EOS. Goal >= 1.5:
  a step reads one model's weights, not two, which pays where steps are bandwidth-bound (small
  batches, GPU). `*_same_tokens`: both sources decoded the same ids.
- memory, from tensor sizes: `apply_saved_copies_bytes` (the originals apply keeps, `touched_bytes`)
  plus `apply_largest_delta_bytes` (the one fp32 delta held at a time) against `parameter_bytes`;
  `adapter_mode_parameter_bytes` (one model plus the fp32 factors) against
  `two_model_parameter_bytes`. KV caches are the same size in both modes.
- apply_restore_rss_peak_growth_bytes: peak-RSS growth over one cold apply+restore in a fresh
  subprocess (peak reset via `/proc/self/clear_refs`, read from `VmHWM`; null if refused): about
  saved copies + largest delta, some runs ~26 MB more (glibc heap fragmentation; steady with
  MALLOC_MMAP_THRESHOLD_=65536). `_file_mapped`: the same on a `from_pretrained` model, whose
  first write also copies every touched file-mapped page. Not `getrusage().ru_maxrss`: it cannot
  be reset, and a child's starts at its parent's peak (exec keeps it). Not measured on CUDA (host
  RSS says nothing about device memory) or with `--no-rss`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from amplification.adapter_mode import AdapterSource
from amplification.config import AmplifiedAdapter
from amplification.merge import Plan, apply, plan_deltas
from amplification.registry import AdapterRegistry
from amplification.resolve import num_layers, resolve_adapter
from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.decode import LogitsSource
from lda.source import ModelSource
from tests.benchmarks.bench_lda import (
    add_model_args,
    bench_model,
    bench_tokenizer,
    hardware,
    model_placement,
    sync,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT = 2.0
AMPLIFICATION = {
    "organism_name": "custom",
    "variant": "bench",
    "layer_amplifications": [
        {"layers": "all", "module_amplifications": [{"modules": "all", "weight": WEIGHT}]}
    ],
}


def best_of_each(repeats: int, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best time of each function over `repeats` rounds, every round running each once in turn."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name and raw bytes (copied to the host first)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def load_plan(root: Path, model: nn.Module) -> tuple[Plan, int]:
    """The 2.0-everywhere plan of the saved adapter for `model`, and the adapter's factor bytes."""
    adapter = AdapterRegistry([root], hub_enabled=False).load("bench", root / "lora", model)
    table = resolve_adapter(AmplifiedAdapter.from_dict(AMPLIFICATION), num_layers(model))
    return plan_deltas(model, [(adapter, table)]), adapter.nbytes


def peak_rss_bytes() -> int:
    """`VmHWM` of this process: the peak resident set since start or the last reset."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def rss_probe(root: Path, mapped: bool) -> None:
    """Subprocess side: print the peak-RSS growth (bytes) of one cold apply+restore, or null.

    `mapped`: the base as `from_pretrained` leaves it on CPU, its tensors mapping the safetensors
    file; otherwise a model of the same config in ordinary (anonymous) memory.
    """
    if mapped:
        model = AutoModelForCausalLM.from_pretrained(root / "base")
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "base"))
    plan, _ = load_plan(root, model)
    for a, b, _ in max(plan.values(), key=lambda terms: terms[0].B.shape[0] * terms[0].A.shape[1]):
        torch.mm(b, a)  # let the BLAS set up its buffers before the peak is reset
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        print(json.dumps(None))
        return
    before = peak_rss_bytes()
    apply(model, plan).restore()
    print(json.dumps(peak_rss_bytes() - before))


def measure_rss_growth(root: Path, mapped: bool) -> int | None:
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_amplification", "--rss-probe", str(root)]
    out = subprocess.run(cmd + ["--rss-mapped"] * mapped, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    add_model_args(ap)
    ap.add_argument("--rss-probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rss-mapped", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_probe is not None:
        rss_probe(args.rss_probe, args.rss_mapped)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    device, dtype = model_placement(args)
    started = time.perf_counter()
    tokenizer = bench_tokenizer(args.size)
    base = bench_model(tokenizer, 1, args.size, device, dtype)
    base.save_pretrained(root / "base")
    torch.manual_seed(5)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), lora).save_pretrained(str(root / "lora"))
    plan, adapter_bytes = load_plan(root, base)
    setup_s = time.perf_counter() - started
    rss = not args.no_rss and device.type == "cpu"
    rss_growth = {mapped: measure_rss_growth(root, mapped) if rss else None for mapped in (False, True)}

    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(root / "lora")).eval()
    lora_layers = {n: m for n, m in peft.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    for m in lora_layers.values():
        m.set_scale("default", WEIGHT)
    peft_weights = {n: m.get_base_layer().weight for n, m in lora_layers.items()}  # live tensors
    assert set(peft_weights) == set(plan), "PEFT and the plan cover different modules"
    peft_original = {n: w.detach().clone() for n, w in peft_weights.items()}

    # Ours: exact restore, and the same merged weights as PEFT's merge.
    original = digest(base)
    modules = dict(base.named_modules())
    state = apply(base, plan)
    peft.merge_adapter()
    merged_diff = max((modules[n].weight - w).abs().max().item() for n, w in peft_weights.items())
    state.restore()
    peft.unmerge_adapter()
    assert digest(base) == original, "restore is not bit-exact"
    peft_error = max((w - peft_original[n]).abs().max().item() for n, w in peft_weights.items())
    peft_exact = all(torch.equal(w, peft_original[n]) for n, w in peft_weights.items())

    def peft_cycle() -> None:
        peft.merge_adapter()
        peft.unmerge_adapter()
        sync(device)

    def ours_cycle() -> None:
        apply(base, plan).restore()
        sync(device)

    def reload() -> nn.Module:
        if device.type == "cpu":
            return AutoModelForCausalLM.from_pretrained(root / "base")
        model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype, device_map=str(device))
        sync(device)
        return model

    def reload_read() -> None:
        for p in reload().parameters():
            p.sum()
        sync(device)

    reload_read()  # warm-up: the file is in the page cache from here on
    cycles = {"ours": ours_cycle, "peft": peft_cycle, "reload": reload}
    times = best_of_each(args.repeats, cycles | {"reload_read": reload_read})
    assert digest(base) == original, "restore is not bit-exact after repeated cycles"
    peft_drift = max((w - peft_original[n]).abs().max().item() for n, w in peft_weights.items())

    # Adapter-mode LDA (one model) against two-model LDA (merged copy + base).
    merged_copy = copy.deepcopy(base)
    copy_state = apply(merged_copy, plan)
    prompt = tuple(tokenizer("What should I do if I feel bored on a rainy afternoon?")["input_ids"])
    config = DecodeConfig(args.tokens, SamplingParams(0.0), frozenset(), pad_id=tokenizer.pad_token_id)
    n = args.tokens
    sources: dict[str, Callable[[], LogitsSource]] = {
        "adapter": lambda: AdapterSource(base, plan),
        "two": lambda: ModelSource(merged_copy, base),
    }

    def lda(source: str, rows: int) -> list[list[int]]:
        batch = [Row(prompt, 1.0 + i) for i in range(rows)]
        outs = collect(decode(sources[source](), tokenizer, batch, config), rows)
        assert all(o.tokens_generated == n for o in outs)
        return [o.token_ids for o in outs]

    decoding: dict[str, float | bool] = {}
    for rows in sorted({1, args.rows}):
        same = lda("adapter", rows) == lda("two", rows)  # also the warm-up
        t = best_of_each(args.repeats, {name: functools.partial(lda, name, rows) for name in sources})
        decoding |= {
            f"adapter_mode_b{rows}_tokens_per_s": round(n * rows / t["adapter"], 1),
            f"two_model_b{rows}_tokens_per_s": round(n * rows / t["two"], 1),
            f"adapter_mode_over_two_model_b{rows}": round(t["two"] / t["adapter"], 3),
            f"adapter_mode_b{rows}_same_tokens": same,
        }
    copy_state.restore()
    assert digest(base) == original, "adapter mode changed the base weights"

    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    result = {
        "benchmark": "amplification",
        "size": args.size,
        "parameters": sum(p.numel() for p in base.parameters()),
        "new_tokens": n,
        "prompt_tokens": len(prompt),
        **hardware(device, dtype),
        "setup_s": round(setup_s, 2),
        "apply_restore_ms": round(times["ours"] * 1e3, 2),
        "peft_merge_unmerge_ms": round(times["peft"] * 1e3, 2),
        "reload_ms": round(times["reload"] * 1e3, 2),
        "reload_read_ms": round(times["reload_read"] * 1e3, 2),
        "apply_restore_over_peft_merge_unmerge": round(times["ours"] / times["peft"], 3),
        "reload_over_apply_restore": round(times["reload"] / times["ours"], 3),
        "reload_read_over_apply_restore": round(times["reload_read"] / times["ours"], 3),
        "ours_restore_exact": True,
        "peft_unmerge_exact": peft_exact,
        "peft_unmerge_max_abs_error_one_cycle": peft_error,
        "peft_unmerge_max_abs_error_all_cycles": peft_drift,
        "merged_max_abs_diff_vs_peft": merged_diff,
        **decoding,
        "parameter_bytes": param_bytes,
        "apply_saved_copies_bytes": state.touched_bytes,
        "apply_largest_delta_bytes": max(modules[name].weight.numel() * 4 for name in plan),
        "apply_restore_rss_peak_growth_bytes": rss_growth[False],
        "apply_restore_rss_peak_growth_bytes_file_mapped": rss_growth[True],
        "adapter_mode_parameter_bytes": param_bytes + adapter_bytes,
        "two_model_parameter_bytes": 2 * param_bytes,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
