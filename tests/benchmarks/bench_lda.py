"""LDA decoding speed against plain `generate`, on a ~30M-parameter Llama-shaped pair (CPU ok).

    python -m tests.benchmarks.bench_lda [--tokens 64] [--rows 8] [--repeats 3]
        [--size tiny|bench|1b] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16]

Prints JSON. Ratios compare runs made in this same process:
- lda_b1_over_generate_b1: LDA tokens/s at 1 row over the after model's own greedy `generate`
  tokens/s (two forward passes per token, so 0.5 is the ceiling);
- lda_b{R}_over_generate_b{R}: the same at R rows (`generate` of the prompt repeated R times), for
  every R given to `--rows` (e.g. `--rows 1 8 64`);
- lda_rows_over_lda_b1: LDA tokens/s at the largest `--rows` over LDA at 1 row;
- lda_b{R}_over_seed_loop_b{R}: LDA at R rows over the seed LDA server's decode of the same R rows:
  one row at a time, each model with its own KV cache (`seed_loop_b{R}_tokens_per_s`);
  `seed_loop_same_tokens_as_lda_b1` says the two decoded the same tokens at 1 row;
- with `--compiled` (default): the same LDA decode on static KV caches with one torch.compile'd
  step (`lda.static`; CUDA graphs on a GPU), `lda_compiled_b{R}_tokens_per_s` and its ratios to
  eager LDA and the seed loop, `compile_s` (the first step of each row bucket, compile included)
  and `lda_compiled_b{R}_same_tokens` (greedy tokens equal to eager LDA's);
- the memory-bandwidth limit: `read_gb_per_s`, this process's read bandwidth (a large matrix-vector
  product), `decode_bytes_per_token` (both models' weights a decode step reads: every parameter but
  the input embeddings, of which a step reads one row per token), and for each R
  `lda_b{R}_fraction_of_limit` / `lda_compiled_b{R}_fraction_of_limit`: tokens/s over
  R x read_gb_per_s / decode_bytes_per_token (a step reads the weights once for all its rows; the
  KV cache's reads are left out, small at these lengths).
`--size`: `bench` (default) the ~29M model; `tiny` a 2-layer, 64-wide one (a smoke test);
`1b` a ~0.95B one (16 layers, width 2048, MLP 5632, vocab 32000) for a GPU, built on the device.
`--dtype auto` is bf16 on CUDA and fp32 on CPU. The other benchmarks take the same options.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from app.demo import build_tokenizer  # noqa: E402
from lda import DecodeConfig, LDAModelPair, Row, SamplingParams, Side, collect, decode  # noqa: E402
from lda.loading import resolve_device, resolve_dtype  # noqa: E402
from lda.static import StaticPool, StaticSource  # noqa: E402
from tests.tiny import tiny_llama, tiny_tokenizer  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ),
    # ~29M parameters: 6 layers x 3.4M + 2 x 8192 x 512 embeddings.
    "bench": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    ),
    # ~0.95B parameters: 16 layers x 51M + 2 x 32000 x 2048 embeddings (ids past the tokenizer's
    # 8192 are padding rows, as in checkpoints with padded embeddings).
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        vocab_size=32000,
    ),
}


def corpus(n_words: int = 60000, seed: int = 0) -> list[str]:
    """Random pseudo-words: enough distinct pairs for BPE to learn an ~8k vocabulary."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(n_words)
    ]
    return [" ".join(words[i : i + 20]) for i in range(0, n_words, 20)]


def bench_tokenizer(size: str = "bench") -> Any:
    """The tests' tiny BPE for `tiny` (instant); an ~8k BPE over `corpus()` otherwise."""
    return tiny_tokenizer() if size == "tiny" else build_tokenizer(corpus(), vocab_size=8192)


def bench_model(
    tokenizer: Any,
    seed: int,
    size: str = "bench",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    return tiny_llama(tokenizer, seed, device=device, dtype=dtype, **SIZES[size])


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")


def model_placement(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def read_bandwidth(
    device: torch.device, dtype: torch.dtype, megabytes: int = 512, repeats: int = 10
) -> float:
    """Bytes/s a matrix-vector product reads: a [n, n] matrix of about `megabytes` (far past the
    caches) times a vector, best of `repeats`; the memory-bound operation a batch-1 decode is."""
    n = int((megabytes * 2**20 / torch.finfo(dtype).bits * 8) ** 0.5)
    matrix = torch.randn(n, n, device=device).to(dtype)
    vector = torch.randn(n, device=device).to(dtype)
    seconds = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        torch.mv(matrix, vector)
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return matrix.numel() * matrix.element_size() / min(seconds[1:])


def decode_bytes(*models: Any) -> int:
    """Bytes of weights one decode step reads from each model: all but the input embeddings (a
    step reads one row of them per token; a tied head is read in full as the head)."""
    total = 0
    for model in models:
        embeddings = model.get_input_embeddings().weight
        tied = embeddings is model.get_output_embeddings().weight
        for p in model.parameters():
            if p is not embeddings or tied:
                total += p.numel() * p.element_size()
    return total


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="+", default=[8], help="row counts (1 is always measured)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                    help="also the static-cache compiled decode (lda.static)")  # fmt: skip
    add_model_args(ap)
    args = ap.parse_args()
    device, dtype = model_placement(args)

    started = time.perf_counter()
    tokenizer = bench_tokenizer(args.size)
    after = bench_model(tokenizer, 1, args.size, device, dtype)
    before = bench_model(tokenizer, 2, args.size, device, dtype)
    sync(device)
    build_s = time.perf_counter() - started
    pair = LDAModelPair(Side("after", after, tokenizer), Side("before", before, tokenizer))
    _, prompt = pair.prompt_ids("What should I do if I feel bored on a rainy afternoon?")
    config = DecodeConfig(args.tokens, SamplingParams(0.0), frozenset(), pad_id=pair.after.pad_id)
    n = args.tokens

    def generate(rows: int) -> None:
        with torch.no_grad():
            out = after.generate(
                torch.tensor([prompt] * rows, device=device),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        sync(device)
        assert out.shape == (rows, len(prompt) + n)

    def lda(rows: int) -> None:
        outs = collect(pair.lda_events([Row(prompt, 1.0 + i) for i in range(rows)], config), rows)
        assert all(o.tokens_generated == n for o in outs)

    pool = None
    if args.compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        # Trusting, as the server's pools are: nothing here changes the models between steps.
        width = pair.compatibility.shared_width
        pool = StaticPool([after, before], width, compile=True, mode=mode, trusting=True)

    def lda_compiled(rows: int) -> list[tuple[int, ...]]:
        source = StaticSource(pool)
        outs = collect(decode(source, tokenizer, [Row(prompt, 1.0 + i) for i in range(rows)], config), rows)
        sync(device)
        assert all(o.tokens_generated == n for o in outs)
        return [tuple(o.token_ids) for o in outs]

    def seed_loop(rows: int) -> list[list[int]]:
        """The seed server's loop: each row alone (one request at a time), both models keeping a
        KV cache, greedy on after + alpha * (after - before); no batching across rows."""
        out = []
        with torch.no_grad():
            for i in range(rows):
                ids, alpha, tokens = torch.tensor([prompt], device=device), 1.0 + i, []
                a, b = after(ids, use_cache=True), before(ids, use_cache=True)
                for step in range(n):
                    la, lb = a.logits[:, -1].float(), b.logits[:, -1].float()
                    token = (la + alpha * (la - lb)).argmax(-1, keepdim=True)
                    tokens.append(int(token))
                    if step < n - 1:
                        a = after(token, past_key_values=a.past_key_values, use_cache=True)
                        b = before(token, past_key_values=b.past_key_values, use_cache=True)
                out.append(tokens)
        sync(device)
        return out

    # The baseline decodes what LDA decodes (greedy, the same alpha): the first token always, and
    # in fp32 every token (a bf16 GPU run may part ways after a near tie).
    seed_tokens = seed_loop(1)[0]
    lda_tokens = collect(pair.lda_events([Row(prompt, 1.0)], config), 1)[0].token_ids
    assert seed_tokens[0] == lda_tokens[0], (seed_tokens[:8], lda_tokens[:8])
    same_tokens = seed_tokens == list(lda_tokens)

    rows_list = sorted({1, *args.rows})
    bandwidth = read_bandwidth(device, dtype)
    weight_bytes = decode_bytes(after, before)
    result: dict[str, Any] = {
        "benchmark": "lda_decode",
        "size": args.size,
        "parameters_per_model": sum(p.numel() for p in after.parameters()),
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "rows": max(rows_list),
        **hardware(device, dtype),
        "build_pair_s": round(build_s, 2),
        "read_gb_per_s": round(bandwidth / 1e9, 2),
        "decode_bytes_per_token": weight_bytes,
        "limit_b1_tokens_per_s": round(bandwidth / weight_bytes, 1),
    }
    tps: dict[int, float] = {}
    for rows in rows_list:
        generate(rows)  # warm-up (kernels, allocator) at this batch size
        lda(rows)
        gen_tps = n * rows / best_of(args.repeats, functools.partial(generate, rows))
        tps[rows] = n * rows / best_of(args.repeats, functools.partial(lda, rows))
        result[f"generate_b{rows}_tokens_per_s"] = round(gen_tps, 1)
        result[f"lda_b{rows}_tokens_per_s"] = round(tps[rows], 1)
        result[f"lda_b{rows}_over_generate_b{rows}"] = round(tps[rows] / gen_tps, 3)
        seed_loop(min(rows, 2))  # warm-up
        # Its rows run one after another, so R rows already average R decodes: one timing suffices.
        seed_tps = n * rows / best_of(args.repeats if rows <= 2 else 1, functools.partial(seed_loop, rows))
        result[f"seed_loop_b{rows}_tokens_per_s"] = round(seed_tps, 1)
        result[f"lda_b{rows}_over_seed_loop_b{rows}"] = round(tps[rows] / seed_tps, 3)
        limit = rows * bandwidth / weight_bytes
        result[f"lda_b{rows}_fraction_of_limit"] = round(tps[rows] / limit, 3)
        if pool is not None:
            compiled_tokens = lda_compiled(rows)  # compiles this bucket (once per process)
            eager_tokens = [tuple(o.token_ids) for o in collect(pair.lda_events(
                [Row(prompt, 1.0 + i) for i in range(rows)], config), rows)]  # fmt: skip
            ctps = n * rows / best_of(args.repeats, functools.partial(lda_compiled, rows))
            result[f"lda_compiled_b{rows}_tokens_per_s"] = round(ctps, 1)
            result[f"lda_compiled_b{rows}_over_lda_b{rows}"] = round(ctps / tps[rows], 3)
            result[f"lda_compiled_b{rows}_over_seed_loop_b{rows}"] = round(ctps / seed_tps, 3)
            result[f"lda_compiled_b{rows}_fraction_of_limit"] = round(ctps / limit, 3)
            result[f"lda_compiled_b{rows}_same_tokens"] = compiled_tokens == eager_tokens
    if pool is not None:
        result["compile_s"] = {f"{r}x{length}": s for (r, length), s in sorted(pool.compile_seconds.items())}
    result["lda_rows_over_lda_b1"] = round(tps[max(rows_list)] / tps[1], 2)
    result["seed_loop_same_tokens_as_lda_b1"] = same_tokens
    if device.type == "cuda":
        result["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
