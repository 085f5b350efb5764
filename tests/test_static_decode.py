"""Decode on static KV caches with a compiled step (`lda.static`, COMPILE): the same tokens as the
dynamic eager path through joins, leaves, cancellation, sampling and an out-of-memory step, with
the paired step (`lda.paired`: both models' matrices as one batched matmul) and with each model's
own forward; the paired step follows in-place weight changes and falls back when a parameter is
replaced; one compiled graph in steady state; a server with COMPILE=on answering as COMPILE=off.

The static path runs two ways: `compile=False` (the static layout, eager: fast, so every scenario
runs) and compiled (inductor's C++ kernels here; ~15 s per graph on 2 cores, so one scenario)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fastapi.testclient import TestClient
from torch._dynamo.utils import counters

from lda import paired, static
from lda.decode import DecodeConfig, Row, RowFailed, RowOutput, RunningBatch, collect, decode
from lda.sampling import SamplingParams
from lda.source import ModelSource
from lda.static import DecodeCompiler, StaticPool, StaticSource, length_bucket, row_bucket, row_buckets
from tests.test_api import wait_ready
from tests.tiny import tiny_llama

from app.engine import Engine
from app.main import create_app
from app.scheduler import BatchWork
from app.settings import Settings

PROMPTS = ["the sun is", "a cat", "rain falls on the moon and the", "x",
           "one two three four five six seven eight nine ten eleven twelve"]  # fmt: skip
# step -> requests admitted before it: (prompt, max_new_tokens, temperature). Rows join a running
# batch with shorter and longer prompts (re-padding both ways), leave at different steps (slots
# compact, buckets shrink), and the batch crosses row buckets 2 -> 4 -> 8 and back.
SCHEDULE = {0: [(0, 10, 0.0), (1, 30, 0.9)], 3: [(2, 12, 0.0), (3, 5, 0.9)], 7: [(4, 20, 0.0)],
            15: [(0, 8, 0.9), (4, 3, 0.0)], 40: [(2, 6, 0.0)]}  # fmt: skip
STEPS = 60


def run(make_source, tokenizer, cancel=None, on_step=None):
    """Every request of SCHEDULE through one RunningBatch: {(ticket, row): RowOutput | RowFailed}.
    Each request is two rows (alpha 1.5 and 0, their own seeds); `cancel` = (step, ticket)."""
    batch = RunningBatch(make_source, tokenizer)
    out = {}
    for step in range(STEPS):
        for k, (p, n, temperature) in enumerate(SCHEDULE.get(step, [])):
            ids = tuple(tokenizer(PROMPTS[p])["input_ids"])
            config = DecodeConfig(n, SamplingParams(temperature, 0, 1.0), frozenset(), details=True)
            batch.admit([Row(ids, 1.5, 100 + step + k), Row(ids, 0.0, 7)], config, ticket=(step, k))
        if cancel and cancel[0] == step:
            batch.cancel(cancel[1])
        if on_step:
            on_step(step)
        for ticket, event in batch.step():
            if isinstance(event, RowOutput | RowFailed):
                out[(ticket, event.row)] = event
    assert not batch, "the schedule ends with every row finished"
    return out


def tolerance(model, logits_scale: float) -> float:
    """How far two fp32 evaluations of the same logprob may differ when only the order of the
    additions changes (compiled kernels tile reductions differently; SDPA over a static cache adds
    exact zeros for masked columns). A sum of K terms reordered moves by at most K * u * sum|terms|
    (u = 2^-24); each layer chains 7 projections and attention, the head one more reduction over
    the hidden size, and log_softmax one over the vocabulary: bound every reduction by the largest
    K, and the terms by the logits' scale."""
    cfg = model.config
    largest = max(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    reductions = cfg.num_hidden_layers * 8 + 2
    return reductions * largest * 2.0**-24 * max(1.0, logits_scale)


def same_outputs(reference, got, model):
    assert reference.keys() == got.keys()
    for key, ref in reference.items():
        out = got[key]
        assert type(out) is type(ref), key
        if isinstance(ref, RowFailed):
            continue
        assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason, key
        scale = max(abs(lp.after) for lp in ref.logprobs)
        tol = tolerance(model, scale)
        for a, b in zip(ref.logprobs, out.logprobs, strict=True):
            assert abs(a.after - b.after) <= tol and abs(a.amplified - b.amplified) <= (1 + 2 * 1.5) * tol, (
                key,
                a,
                b,
            )
            assert (a.before is None) == (b.before is None)
            assert a.before is None or abs(a.before - b.before) <= tol, (key, a, b, tol)


def test_buckets():
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 200)] == [1, 2, 4, 4, 8, 8, 16, 256]
    assert row_buckets(6) == [1, 2, 4, 8] and row_buckets(1) == [1]
    assert length_bucket(1, None) == 256 and length_bucket(257, None) == 512
    assert length_bucket(300, 300) == 300 and length_bucket(900, 512) == 900  # capped at the window


@pytest.mark.parametrize("paired", [True, False])
def test_the_static_layout_decodes_what_the_dynamic_cache_does(pair, tokenizer, paired):
    after, before = pair.after.model, pair.before.model
    reference = run(lambda: ModelSource(after, before), tokenizer)
    assert len(reference) == 16
    pool = StaticPool([after, before], compile=False, paired=paired)
    assert (pool.paired is not None) == paired
    got = run(lambda: StaticSource(pool), tokenizer)
    same_outputs(reference, got, after)
    # A request cancelled mid-run leaves its slots; the others decode on unchanged.
    cancelled = run(lambda: ModelSource(after, before), tokenizer, cancel=(9, (3, 0)))
    assert len(cancelled) == 14
    same_outputs(cancelled, run(lambda: StaticSource(pool), tokenizer, cancel=(9, (3, 0))), after)
    # One model alone (the /generate and control batches).
    alone = run(lambda: ModelSource(before), tokenizer)
    same_outputs(alone, run(lambda: StaticSource(StaticPool([before], compile=False)), tokenizer), before)


def test_two_running_batches_on_the_same_models_keep_their_own_caches(pair, tokenizer):
    """The engine runs an isolated experiment's batch beside the interactive one: each gets a pool."""
    after, before = pair.after.model, pair.before.model

    def two(make_source):
        batches = [RunningBatch(make_source, tokenizer) for _ in range(2)]
        out = {}
        config = DecodeConfig(12, SamplingParams(0.0), frozenset(), details=True)
        for i, batch in enumerate(batches):
            rows = [Row(tuple(tokenizer(PROMPTS[i + j])["input_ids"]), 1.0 * j) for j in range(3)]
            batch.admit(rows, config, ticket=i)
        while any(batches):
            for batch in batches:
                for ticket, event in batch.step():
                    if isinstance(event, RowOutput):
                        out[(ticket, event.row)] = event
        return out

    pool = StaticPool([after, before], compile=False)
    same_outputs(two(lambda: ModelSource(after, before)), two(lambda: StaticSource(pool)), after)
    assert len(pool.family.pools) == 2
    assert pool.family.pools[1].caches == []  # the second batch ended: its caches were freed
    assert len(two(lambda: StaticSource(pool))) == 6 and len(pool.family.pools) == 2  # reused


def test_the_paired_step_with_biases_follows_in_place_changes_and_survives_a_replaced_parameter(tokenizer):
    # Qwen2-style projection biases, grouped heads (4 query, 2 key/value); fresh models: the
    # parameters are changed and replaced here.
    after = tiny_llama(tokenizer, 11, attention_bias=True, mlp_bias=True)
    before = tiny_llama(tokenizer, 12, attention_bias=True, mlp_bias=True)
    pool = StaticPool([after, before], compile=False)
    assert pool.paired is not None
    parameters = sum(p.numel() for m in (after, before) for p in m.parameters())
    same_outputs(
        run(lambda: ModelSource(after, before), tokenizer), run(lambda: StaticSource(pool), tokenizer), after
    )
    # The models' parameters are views of the stacks: stacking copied nothing for good.
    assert sum(p.numel() for m in (after, before) for p in m.parameters()) == parameters
    assert after.model.layers[1].mlp.up_proj.weight.data_ptr() == pool.paired.layers[1].mlp[1][0].data_ptr()
    # An in-place change (what an amplification merge does) is what the paired step reads.
    weight = before.model.layers[0].self_attn.v_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(3.0)
    try:
        same_outputs(
            run(lambda: ModelSource(after, before), tokenizer),
            run(lambda: StaticSource(pool), tokenizer),
            after,
        )
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    # A replaced parameter: the stacks are stale, so the models' own forward takes over.
    layer = after.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)
    same_outputs(
        run(lambda: ModelSource(after, before), tokenizer), run(lambda: StaticSource(pool), tokenizer), after
    )
    assert pool.paired is None


def test_the_cuda_graph_layout_decodes_the_same(pair, tokenizer, monkeypatch):
    # What a GPU runs, on the CPU: CUDA graphs replay fixed shapes, so the mask spans the whole
    # cache (no spare column), outputs are copied out of the graph's buffers, and attention is
    # SDPA with grouped heads over the whole cache. Eager here (no CUDA to record graphs on).
    after, before = pair.after.model, pair.before.model
    monkeypatch.setattr(paired, "_attend", paired._sdpa)
    pool = StaticPool([after, before], compile=False)
    pool.family.graphs = True
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    same_outputs(
        run(lambda: ModelSource(after, before), tokenizer), run(lambda: StaticSource(pool), tokenizer), after
    )
    assert not pool.family.reads_used_columns and pool.allocated == pool.shape.length and marks


def test_a_trusting_pool_checks_its_weights_after_may_change_only(tokenizer):
    # The server's pools check the paired weights after each engine job (`lda.paired.may_change`),
    # not before every step: a parameter replaced without it goes unseen, then is found.
    after, before = tiny_llama(tokenizer, 13), tiny_llama(tokenizer, 14)
    pool = StaticPool([after, before], compile=False, trusting=True)
    reference = run(lambda: ModelSource(after, before), tokenizer)
    same_outputs(reference, run(lambda: StaticSource(pool), tokenizer), after)
    layer = after.model.layers[0].self_attn.o_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)
    run(lambda: StaticSource(pool), tokenizer)
    assert pool.paired is not None  # not checked: nothing said the models may have changed
    paired.may_change()
    same_outputs(
        run(lambda: ModelSource(after, before), tokenizer), run(lambda: StaticSource(pool), tokenizer), after
    )
    assert pool.paired is None


def test_the_engine_calls_before_job_before_every_job_and_never_between_decode_steps(pair, tokenizer):
    calls: list[int] = []
    engine = Engine(queue_size=4, before_job=lambda: calls.append(1))
    prompt = tuple(tokenizer("the sun is")["input_ids"])
    config = DecodeConfig(12, SamplingParams(0.0), frozenset())
    make = lambda: ModelSource(pair.after.model, pair.before.model)

    def decoding(job):
        outputs = yield BatchWork("pair", make, tokenizer, [Row(prompt, 1.0)], config)
        return outputs[0].tokens_generated

    async def both():
        plain = await engine.run(lambda job: "done")
        after_plain = len(calls)
        generated = await engine.run(decoding)
        return plain, after_plain, generated

    engine.start()
    try:
        plain, after_plain, generated = asyncio.run(both())
    finally:
        engine.stop()
    # The plain job once; the decoding job at its start (the call that makes its generator, then
    # the generator's first piece) and when its rows are out, not at the 12 steps between.
    assert (plain, after_plain, generated, len(calls)) == ("done", 1, 12, 4)


def test_an_out_of_memory_step_fails_the_last_request_and_the_rest_decode_on(pair, tokenizer, monkeypatch):
    after, before = pair.after.model, pair.before.model

    def inject(cls):
        real, fired = cls.decode_one_token, []

        def flaky(self, tokens, mask, positions):
            if tokens.shape[0] >= 8 and not fired:
                fired.append(tokens.shape[0])
                raise torch.OutOfMemoryError("out of memory (injected)")
            return real(self, tokens, mask, positions)

        monkeypatch.setattr(cls, "decode_one_token", flaky)
        return fired

    fired = inject(ModelSource)
    reference = run(lambda: ModelSource(after, before), tokenizer)
    assert fired and sum(isinstance(o, RowFailed) for o in reference.values()) == 1
    pool = StaticPool([after, before], compile=False)
    fired = inject(StaticSource)
    got = run(lambda: StaticSource(pool), tokenizer)
    assert fired
    same_outputs(reference, got, after)


def test_the_compiled_step_decodes_the_same_and_never_recompiles_in_steady_state(pair, tokenizer):
    after, before = pair.after.model, pair.before.model
    reference = run(lambda: ModelSource(after, before), tokenizer)
    compiler = DecodeCompiler()
    compiler.warm_up([((after, before), None)], max_rows=16)
    pool = compiler.pool((after, before))
    assert set(pool.compile_seconds) == {(b, 256) for b in (1, 2, 4, 8, 16)}
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    got = run(compiler.source((after, before)), tokenizer)
    same_outputs(reference, got, after)
    got = run(compiler.source((after, before)), tokenizer)  # again: the pool's caches reused
    same_outputs(reference, got, after)
    # Attention reads the used columns (a symbolic size): none of them may be a graph of its own,
    # not a cache filled to its bucket's last column, nor a longer cache.
    for rows, columns, length in ((2, 256, 256), (4, 4, 256), (1, 300, 512)):
        pool.reshape(static.Shape(rows, length), None, 0)
        tokens, positions = torch.ones((rows, 1), dtype=torch.long), torch.ones((rows, 1), dtype=torch.long)
        pool.step(tokens, torch.ones((rows, columns), dtype=torch.long), positions, columns - 1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) == recompiles
    assert compiler.info()["not_compiled"] == {}


def test_a_server_with_compile_on_answers_as_with_compile_off(pair, tmp_path):
    bodies = [
        {"prompts": ["the sun is", "a cat"], "alphas": [0, 2], "temperature": 0, "max_new_tokens": 12,
         "apply_chat_template": False, "details": True},
        {"prompt": "rain falls", "n": 3, "temperature": 1.0, "seed": 5, "max_new_tokens": 9,
         "apply_chat_template": False},
    ]  # fmt: skip
    answers = {}
    try:
        for mode in ("off", "on"):
            settings = Settings(_env_file=None, data_dir=tmp_path / mode, compile=mode, max_batch_rows=8)
            with TestClient(create_app(settings, loader=lambda s: (pair, None))) as client:
                wait_ready(client)
                info = client.get("/info").json()["compile"]
                assert info["setting"] == mode and info["enabled"] == (mode == "on")
                if mode == "on":  # compiled before /ready: every bucket's first step is done
                    steps = info["first_step_s"]
                    # The pair, and each model alone (the null control's width is the before model's).
                    assert info["warm_up_s"] > 0 and len(steps) == 3, steps
                    assert all(len(buckets) == 4 for buckets in steps.values()), steps
                    graphs = counters["stats"]["unique_graphs"]
                answers[mode] = [client.post("/generate_lda", json=b).json() for b in bodies]
                alone = {
                    "prompt": "a cat",
                    "temperature": 0,
                    "max_new_tokens": 6,
                    "apply_chat_template": False,
                }
                answers[mode].append(client.post("/generate", json=alone).json())  # each model alone
                if mode == "on":  # no request waited on a compile
                    assert counters["stats"]["unique_graphs"] == graphs
    finally:
        static.use(None)  # the process's other servers decode eagerly
    off, on = answers["off"], answers["on"]
    assert [r["completion"] for r in on[0]["results"]] == [r["completion"] for r in off[0]["results"]]
    assert [r["completion"] for r in on[1]["results"]] == [r["completion"] for r in off[1]["results"]]
    assert on[2]["model_1"] == off[2]["model_1"] and on[2]["model_2"] == off[2]["model_2"]


def test_the_demo_pair_decodes_the_demo_prompts_the_same(demo_data_dir):
    """The paired static step on the embedded demo pair (a chat template, a marker the fine-tune
    added): greedy LDA over every demo prompt at alphas 0 and 2 gives the eager path's tokens. Eager
    arithmetic (compile=False) keeps the suite fast; bench_lda checks the compiled step's tokens."""
    from app.demo.build import demo_prompts
    from app.loader import load_pair

    pair, _ = load_pair(Settings(_env_file=None, data_dir=demo_data_dir))
    rows = []
    for prompt in demo_prompts():
        _, ids = pair.prompt_ids(prompt)
        rows += [Row(ids, 0.0), Row(ids, 2.0)]
    config = pair.decode_config(24, SamplingParams(0.0), details=True)
    after, before = pair.after.model, pair.before.model
    width = pair.compatibility.shared_width
    eager = collect(decode(ModelSource(after, before, width), pair.after.tokenizer, rows, config), len(rows))
    pool = StaticPool([after, before], width, compile=False)
    assert pool.paired is not None
    static_rows = collect(decode(StaticSource(pool), pair.after.tokenizer, rows, config), len(rows))
    same_outputs(dict(enumerate(eager)), dict(enumerate(static_rows)), after)
