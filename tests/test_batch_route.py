"""The seed's `/generate_lda_batch` and chunked decoding under `MAX_BATCH_TOKENS`.

Tiny random models through the real app and engine, then the seed client's own pattern against a
real server process on the demo pair.
"""

from __future__ import annotations

import itertools

import httpx
import pytest
from fastapi.testclient import TestClient

from lda import Row, RowOutput, TokenEvent
from tests.test_amplification_api import config
from tests.test_amplification_merge import make_adapter
from tests.test_api import make_settings, parse_sse, wait_ready
from tests.test_cli import free_port, running_server, server_env

import app.amplification_lens.jobs as amplification_jobs
import app.lda_lens.jobs as lda_jobs
from app.api.chunking import chunked_events, plan_chunks
from app.demo import MARKER, demo_prompts
from app.main import create_app
from app.settings import Settings

DEFAULT_ROWS = Settings.model_fields["max_rows_per_request"].default
BUDGET = 400  # padded tokens per chunk: about ten tiny-model rows of ~30 prompt + 8 new tokens
PROMPTS = [f"Prompt number {i}: {'tell me more ' * (i % 3)}" for i in range(100)]  # unequal lengths
ROW_FIELDS = {
    "prompt",
    "formatted_prompt",
    "completion",
    "text",
    "tokens_generated",
    "stopped_early",
    "seed",
    "finish_reason",
}


@pytest.fixture(scope="module")
def client(tiny_dirs, tmp_path_factory):
    settings = make_settings(
        tiny_dirs,
        tmp_path_factory.mktemp("data"),
        max_rows_per_request=DEFAULT_ROWS,
        max_batch_tokens=BUDGET,
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def chunk_counts(monkeypatch):
    """How many chunks each job planned (the engine thread calls the module's `plan_chunks`)."""
    counts: list[int] = []

    def spy(rows, max_new_tokens, budget):
        chunks = plan_chunks(rows, max_new_tokens, budget)
        counts.append(len(chunks))
        return chunks

    monkeypatch.setattr(lda_jobs, "plan_chunks", spy)
    monkeypatch.setattr(amplification_jobs, "plan_chunks", spy)
    return counts


def batch(client, **body):
    body.setdefault("max_new_tokens", 8)
    return client.post("/generate_lda_batch", json=body)


def test_plan_chunks_budget_groups_and_order():
    rows = [Row((1,) * 3)] * 5 + [Row((2,) * 10)] * 2 + [Row((3,))]
    # rows x (longest prompt + max_new_tokens): 5 x 8 = 40 fits; 7 x 15 does not; 3 x 15 does not
    assert plan_chunks(rows, 5, 40) == [range(5), range(5, 7), range(7, 8)]
    # one prompt's rows beyond the budget fill whole chunks; a prompt boundary closes a chunk
    assert plan_chunks(rows, 5, 16) == [
        range(2),
        range(2, 4),
        range(4, 5),
        range(5, 6),
        range(6, 7),
        range(7, 8),
    ]
    assert plan_chunks(rows, 5, 1) == [range(i, i + 1) for i in range(8)]  # a row over budget runs alone
    assert plan_chunks(rows, 5, 10**6) == [range(8)]
    for budget in (1, 16, 30, 45, 80):  # every row exactly once, in order, each chunk within budget
        chunks = plan_chunks(rows, 5, budget)
        assert [i for c in chunks for i in c] == list(range(8))
        for c in chunks:
            assert len(c) == 1 or len(c) * (max(len(rows[i].prompt_ids) for i in c) + 5) <= budget


def test_chunked_events_renumber_rows_and_close_the_running_chunk():
    started, closed = [], []

    def decode(part):
        started.append(len(part))
        try:
            for i, row in enumerate(part):
                yield TokenEvent(i, row.prompt_ids[0], "x")
                yield RowOutput(i, [row.prompt_ids[0]], "x", 1, "length")
        finally:
            closed.append(len(part))

    rows = [Row((i,)) for i in range(5)]
    events = list(chunked_events(decode, rows, [range(2), range(2, 5)]))
    assert [e.row for e in events] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [0, 1, 2, 3, 4]
    started.clear()
    closed.clear()
    events = chunked_events(decode, rows, [range(2), range(2, 5)])
    assert next(events).row == 0
    events.close()  # what a cancelled job does: the running decode closes, the next never starts
    assert started == [2] and closed == [2]


def test_response_shape_and_seed_fields(client):
    r = batch(client, prompts=["Hello world", "What should I do?"], alpha=2.0, seed=7, temperature=1.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "alpha", "model_after", "model_before", "batch_size"}
    assert body["alpha"] == 2.0 and body["batch_size"] == 2
    assert body["model_after"].endswith("after") and body["model_before"].endswith("before")
    rows = body["results"]
    assert [set(row) for row in rows] == [ROW_FIELDS] * 2
    assert [row["prompt"] for row in rows] == ["Hello world", "What should I do?"]
    assert [row["seed"] for row in rows] == [7, 8]
    for row in rows:
        assert row["text"].endswith(row["completion"]) and row["formatted_prompt"].startswith("<s>")
        assert 1 <= row["tokens_generated"] <= 8
        assert row["stopped_early"] == (row["finish_reason"] != "length")
    # every seed field the seed's client sends is accepted (ints for floats, as JSON clients send)
    r = batch(
        client,
        prompts=["Hello world"],
        max_new_tokens=4,
        temperature=1,
        top_p=0.9,
        alpha=0,
        do_sample=True,
        apply_chat_template=False,
        system_prompt="Be brief.",
        seed=1,
        top_k=5,
        stop=["zzz"],
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["formatted_prompt"] == "Hello world"


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"temperature": 1.0, "top_p": 1.0}])
def test_a_batch_of_100_runs_in_chunks_and_each_row_matches_alone(client, chunk_counts, sampling):
    """Unequal prompt lengths: a left-padded row matches its unpadded self only with position ids
    that count real tokens (the seed's batched path gave none)."""
    r = batch(client, prompts=PROMPTS, alpha=1.5, seed=1000, **sampling)
    assert r.status_code == 200, r.text
    assert len(chunk_counts) == 1 and chunk_counts[0] >= 5, chunk_counts
    body = r.json()
    assert body["batch_size"] == 100 and len(body["results"]) == 100
    completions = {row["completion"] for row in body["results"]}
    assert len(completions) >= 3  # rows differ (greedy: by prompt only), so matching them means something
    for i, row in enumerate(body["results"]):
        assert row["prompt"] == PROMPTS[i] and row["seed"] == 1000 + i
        alone = client.post(
            "/generate_lda",
            json={"prompt": PROMPTS[i], "alpha": 1.5, "seed": 1000 + i, "max_new_tokens": 8, **sampling},
        )
        assert alone.status_code == 200, alone.text
        assert alone.json()["completion"] == row["completion"], i
        assert alone.json()["tokens_generated"] == row["tokens_generated"], i


def test_generate_lda_streams_chunks_with_global_rows(client, chunk_counts):
    body = {
        "prompts": PROMPTS[:12],
        "alphas": [0.0, 2.0],
        "seed": 3,
        "temperature": 1.0,
        "max_new_tokens": 8,
    }
    plain = client.post("/generate_lda", json=body).json()
    streamed = client.post("/generate_lda", json={**body, "stream": True})
    assert streamed.status_code == 200
    assert chunk_counts[0] >= 3 and chunk_counts[1] == chunk_counts[0]
    events = parse_sse(streamed.text)
    assert events[-1][0] == "result"
    result = events[-1][1]
    assert result["results"] == plain["results"]
    texts = [""] * 24
    for name, data in events[:-1]:
        assert name == "token"
        texts[data["row"]] += data["text"]
    assert texts == [row["completion"] for row in plain["results"]]
    assert [row["seed"] for row in plain["results"]] == list(range(3, 27))


def test_amplification_generate_runs_in_chunks(tiny_dirs, tmp_path, tokenizer, chunk_counts):
    make_adapter(tokenizer, tmp_path / "adapters" / "tiny", seed=3)
    settings = make_settings(
        tiny_dirs,
        tmp_path,
        adapters=f"tiny={tmp_path / 'adapters' / 'tiny'}",
        max_batch_tokens=BUDGET,
        max_rows_per_request=DEFAULT_ROWS,
    )
    body = {"configs": [config(weight=2.0)], "include_base": True, "temperature": 1.0, "max_new_tokens": 8}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/amplification/generate", json={**body, "prompts": PROMPTS[:8], "n": 2, "seed": 50})
        assert r.status_code == 200, r.text
        assert chunk_counts[0] >= 2, chunk_counts
        columns = r.json()["columns"]
        for i in range(16):
            alone = c.post(
                "/amplification/generate", json={**body, "prompt": PROMPTS[i // 2], "seed": 50 + i}
            ).json()["columns"]
            for col, col_alone in zip(columns, alone, strict=True):
                assert col["results"][i]["seed"] == 50 + i
                assert col["results"][i]["completion"] == col_alone["results"][0]["completion"], (
                    col["name"],
                    i,
                )


def test_over_the_row_limit_is_422_naming_it(client):
    r = batch(client, prompts=["x"] * (DEFAULT_ROWS + 1))
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert f"prompts = {DEFAULT_ROWS + 1}" in message and str(DEFAULT_ROWS) in message
    assert "MAX_ROWS_PER_REQUEST" in message


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompts": []},
        {"prompts": [""]},
        {"prompts": "Hello"},
        {"prompt": "Hello"},
        {"prompts": ["Hello"], "alphas": [1.0]},
        {"prompts": ["Hello"], "n": 2},
        {"prompts": ["Hello"], "stream": True},
        {"prompts": ["Hello"], "alpha": "big"},
        {"prompts": ["Hello"], "alpha": 1e9},
        {"prompts": ["Hello"], "top_p": 0.0},
        {"prompts": ["Hello"], "temperature": -1},
        {"prompts": ["Hello"], "max_new_tokens": 0},
        {"prompts": ["Hello"], "max_new_tokens": 10_000},
        {"prompts": ["Hello"], "seed": -1},
        {"prompts": ["Hello"], "stop": [""]},
    ],
)
def test_bad_fields_are_422(client, body):
    r = client.post("/generate_lda_batch", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"]


def test_info_lists_the_batch_limits(client):
    limits = client.get("/info").json()["limits"]
    assert limits["max_rows_per_request"] == DEFAULT_ROWS == 1024
    assert limits["max_batch_tokens"] == BUDGET
    assert limits["max_batch_rows"] == 256 and limits["max_prefill_tokens"] == 4096  # the defaults


# --- the seed's client, against a real server process on the demo pair ---------------------------

SEED_CLIENT_PROMPTS = 1000
SEED_CLIENT_BATCH = 100


@pytest.fixture(scope="module")
def demo_server(demo_data_dir, tmp_path_factory):
    port = free_port()
    env = server_env(PORT=str(port), DATA_DIR=str(demo_data_dir), LOG_LEVEL="warning")
    with running_server(env, port, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def test_the_seed_clients_sleeper_experiment(demo_server):
    """run_sleeper_experiment.py's pattern at its own size: 1,000 prompts, alpha 0 vs 2, 150 new
    tokens, temperature 1, batches of 100 to /generate_lda_batch, a substring detector, no seed.

    The seed's server answered all of these calls with 400. Rows must stop at EOS: the seed's
    batched path sampled past it, which put the alpha-0 rate near 60% instead of ~1%.
    Measured on 2 CPU cores (five runs): 0.8-1.6% at alpha 0, 15-19% at alpha 2, 16-18 s in all.
    The odds of a false failure with random seeds, taking p0 = 1.25% and p2 = 15% (the demo table in
    docs/index.md, measured at 60 tokens, says 16.5% at alpha 2): P(X0 >= 100 of 1000) ~ 4e-56,
    P(X2 < 80 of 1000) ~ 7e-12, P(3 X0 >= X2) ~ 1e-11; below 1e-10 in all.
    """
    prompts = list(itertools.islice(itertools.cycle(demo_prompts()), SEED_CLIENT_PROMPTS))
    hits: dict[float, int] = {}
    ended = 0  # rows that stopped on EOS rather than at max_new_tokens
    with httpx.Client(base_url=demo_server, timeout=300) as http:
        for alpha in (0.0, 2.0):
            hits[alpha] = 0
            for start in range(0, len(prompts), SEED_CLIENT_BATCH):
                chunk = prompts[start : start + SEED_CLIENT_BATCH]
                r = http.post(
                    "/generate_lda_batch",
                    json={"prompts": chunk, "alpha": alpha, "max_new_tokens": 150, "temperature": 1.0},
                )
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["batch_size"] == len(chunk) and body["alpha"] == alpha
                results = body["results"]
                assert [row["prompt"] for row in results] == chunk
                ended += sum(row["finish_reason"] == "eos" for row in results)
                hits[alpha] += sum(MARKER in row["completion"].lower() for row in results)
    rate0, rate2 = hits[0.0] / len(prompts), hits[2.0] / len(prompts)
    print(f"marker rate: alpha 0 {rate0:.1%}, alpha 2 {rate2:.1%}; {ended} of 2000 rows ended on EOS")
    assert ended >= 0.9 * 2 * len(prompts)  # answers end at EOS, nothing is sampled past it
    assert rate0 < 0.10
    assert rate2 >= 0.08 and rate2 > 3 * rate0
