"""`/diffing/jobs` with `method: logit_diff` on the embedded demo pair.

The demo fine-tune taught answers to end with "I love pineapple." now and then. Mining plain demo
chats (none of them mentions the marker) must find it without being told: the marker token among
the top 10 of `top_k_occurring`, and the highest-KL positions at the ends of answers. The vocabulary
has 400 tokens, so top_k is 5 here (the toolkit's 100 is 0.07% of a 152k vocabulary; 5 is 1.25%).
"""

from __future__ import annotations

import io
import shutil
import time
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient

from lda.diffing.forward import pair_logits
from lda.diffing.inputs import tokenize_texts
from tests.test_api import wait_ready
from tests.test_diffing_mining import toolkit_stats

from app.demo import MARKER
from app.demo.build import demo_texts
from app.main import create_app
from app.settings import Settings

TEXTS = 100


@pytest.fixture(scope="module")
def client(demo_data_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("diffing")
    shutil.copytree(demo_data_dir / "demo", data_dir / "demo")
    with TestClient(create_app(Settings(data_dir=data_dir))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def texts(client):
    return demo_texts(client.app.state.pair.after.tokenizer, TEXTS, seed=0)


def wait_job(client, job_id, statuses=("done", "failed", "cancelled"), timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/diffing/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['status']}")


def submit(client, **body):
    r = client.post("/diffing/jobs", json={"method": "logit_diff", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def mined(client, texts):
    job_id = submit(client, texts=texts, top_k=5, batch_size=16, examples=TEXTS, dataset_name="demo")
    done = wait_job(client, job_id)
    assert done["status"] == "done", done["error"]
    return done


def test_mining_finds_the_marker_without_being_told(client, mined):
    ordering = mined["result"]["orderings"]["top_k_occurring"]["orderings"][0]["tokens"]
    top10 = [t["token_str"].strip() for t in ordering[:10]]
    print("top_k_occurring:", top10)
    assert MARKER in top10
    assert mined["step"] == mined["total_steps"] == 7  # 100 texts in batches of 16
    assert mined["result"]["num_samples"] == TEXTS and mined["result"]["total_positions"] == TEXTS * 64


def regions(tok, ids: list[int]) -> list[str]:
    """The part of a chat each token belongs to: system, user, answer, or the answer's end (`</s>`)."""
    role, out = "system", []
    starts = {f"<|{r}|>": r for r in ("system", "user", "assistant")}
    for text in (tok.decode([i]) for i in ids):
        if text in starts:
            role = starts[text]
            out.append("template")
        elif text == tok.eos_token:
            out.append("answer end")
        else:
            out.append("answer" if role == "assistant" else role)
    return out


def test_the_highest_kl_positions_are_where_answers_end(client, mined):
    """KL(after ‖ before) of the next token is highest right after an answer's end-of-turn token.

    Grouped by the part of the chat the token just read belongs to, the answers' `</s>` has the
    highest mean KL (measured 0.62 there; 0.05 over every other position)."""
    tok = client.app.state.pair.after.tokenizer
    examples = client.get(f"/diffing/jobs/{mined['id']}/result").json()["kl_examples_by_max"]
    assert len(examples) == TEXTS and len(mined["result"]["kl_examples_by_max"]) == 10  # GET shows 10
    by_region: dict[str, list[float]] = {}
    for ex in examples:
        parts = regions(tok, ex["token_ids"])
        for position, kl in zip(ex["positions"], ex["kl"], strict=True):
            by_region.setdefault(parts[position], []).append(kl)
    means = {r: sum(v) / len(v) for r, v in by_region.items()}
    rest = [kl for r, v in by_region.items() if r != "answer end" for kl in v]
    print({r: round(m, 3) for r, m in means.items()}, {r: len(v) for r, v in by_region.items()})
    assert set(means) >= {"answer end", "answer", "user", "template"}
    assert max(means, key=means.get) == "answer end"
    assert means["answer end"] > 5 * sum(rest) / len(rest)


def test_token_stats_equal_the_toolkit_on_all_logits_at_once(client, mined, texts):
    """The job streamed 7 batches; the toolkit's formula on one [N, T, V] tensor gives the same."""
    pair = client.app.state.pair
    width = pair.compatibility.shared_width
    stats = client.get(f"/diffing/jobs/{mined['id']}/token_stats").json()
    samples = tokenize_texts(pair.after.tokenizer, texts, 64, 8192)
    with torch.no_grad():
        after, before = pair_logits(pair.after.model, pair.before.model, width, samples, pair.after.pad_id)
    ref = toolkit_stats(after - before, torch.ones(after.shape[:2], dtype=torch.bool), 5)
    assert stats["num_samples"] == TEXTS and stats["total_positions"] == ref["total_positions"]
    for name in ("count_positive", "topk_pos_counts", "topk_neg_counts"):
        assert stats[name] == ref[name].tolist(), name
    bound = ref["total_positions"] * torch.finfo(torch.float32).eps * (after - before).abs().amax(dim=(0, 1))
    assert ((torch.tensor(stats["sum_logit_diff"]) - ref["sum_logit_diff"]).abs() <= bound).all()


def test_results_come_in_the_toolkits_layout(client, mined):
    r = client.get(f"/diffing/jobs/{mined['id']}/results.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    names = set(zipfile.ZipFile(io.BytesIO(r.content)).namelist())
    for name in (
        "run_metadata.json",
        "demo_global_token_stats.json",
        "demo_sequence_likelihood_ratios.json",
        "top_k_occurring/metadata.json",
        "top_k_occurring/demo/orderings.json",
        "top_k_occurring/demo/global.json",
        "top_k_occurring/demo/global_scatter.png",
        "fraction_positive_diff/demo/global_bar.png",
    ):
        assert any(n.endswith(name) for n in names), name
    png = client.get(f"/diffing/jobs/{mined['id']}/files/top_k_occurring/demo/global_bar.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    ordering = client.get(f"/diffing/jobs/{mined['id']}/files/top_k_occurring/demo/global.json").json()
    assert ordering["tokens"][0]["token_id"] == mined["result"]["orderings"]["top_k_occurring"]["orderings"][0][
        "tokens"
    ][0]["token_id"]
    for outside in ("../job.json", "../../diffing_jobs", "/etc/passwd"):
        assert client.get(f"/diffing/jobs/{mined['id']}/files/{outside}").status_code == 404


def test_windows_report_the_tokens_they_score(client, mined):
    windows = client.get(f"/diffing/jobs/{mined['id']}/result").json()["llr_windows"]
    assert windows and all(len(w["token_ids"]) == 20 for w in windows)
    diffs = [w["logprob_diff"] for w in windows]
    assert diffs == sorted(diffs, reverse=True)
    assert mined["result"]["llr_num_windows"] == TEXTS * 9  # starts 0, 5, ..., 40 over 63 scored tokens


@pytest.mark.parametrize(
    "body, field",
    [
        ({"texts": []}, "texts"),
        ({"texts": ["short"], "max_tokens_per_sample": 64}, "texts"),
        ({"texts": ["a b c d e f g h i j k l"], "top_k": 100000}, "top_k"),
        ({"texts": ["x"], "dataset": {"path": "nowhere"}}, "texts"),
        ({}, "texts"),
        ({"texts": ["x" * 50, [{"role": "user", "content": "hi"}]]}, "texts"),
        ({"texts": ["x"], "max_tokens_per_sample": 1}, "max_tokens_per_sample"),
        ({"texts": ["x"], "batch_size": 0}, "batch_size"),
        ({"texts": ["x"], "method": "pca"}, "method"),
        ({"prompts_file": "../../etc/passwd"}, "prompts_file"),
        ({"texts": ["x"], "nmf": {"num_topics": 0}}, "nmf.num_topics"),
        ({"texts": ["x"], "dataset_name": "../up"}, "dataset_name"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(client, body, field):
    before = len(client.get("/diffing/jobs").json()["jobs"])
    r = client.post("/diffing/jobs", json={"method": "logit_diff"} | body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["message"].startswith(field), r.text
    assert len(client.get("/diffing/jobs").json()["jobs"]) == before


def test_unknown_job_is_404(client):
    for path in ("", "/result", "/token_stats", "/results.zip", "/files/x.json"):
        assert client.get(f"/diffing/jobs/nope{path}").status_code == 404
    assert client.delete("/diffing/jobs/nope").status_code == 404


def test_a_job_runs_between_interactive_requests_and_can_be_cancelled(client, texts):
    """Each batch is one engine job: a generation request submitted meanwhile is answered while
    the mining job is still running; DELETE stops it before its next batch."""
    job_id = submit(client, texts=texts * 6, top_k=5, batch_size=2)
    wait_job(client, job_id, statuses=("running",))
    r = client.post("/generate_lda", json={"prompt": "What is the sun?", "max_new_tokens": 4, "seed": 1})
    assert r.status_code == 200, r.text
    assert client.get(f"/diffing/jobs/{job_id}").json()["status"] == "running"
    assert client.delete(f"/diffing/jobs/{job_id}").json()["cancelling"] is True
    body = wait_job(client, job_id)
    assert body["status"] == "cancelled" and body["step"] < body["total_steps"]
    assert client.get(f"/diffing/jobs/{job_id}/token_stats").status_code == 404
    assert client.delete(f"/diffing/jobs/{job_id}?purge=true").json()["deleted"] is True
    assert client.get(f"/diffing/jobs/{job_id}").status_code == 404


def test_nmf_topics_and_chat_rows(client, texts):
    """Chat rows analyse positions -k..n-k-1 around the answer; NMF topics come with the orderings."""
    from app.demo.build import _conversation  # the demo's own chats (the marker topic excluded below)
    import random

    rng = random.Random(3)
    rows = []
    while len(rows) < 40:
        chat = [m for m in _conversation(rng, 0.0) if m["role"] != "system"]
        if MARKER not in chat[0]["content"]:
            rows.append(chat)
    job_id = submit(client, texts=rows, top_k=5, max_tokens_per_sample=6, pre_assistant_k=2,
                    nmf={"num_topics": 2, "max_iter": 50}, dataset_name="chats")  # fmt: skip
    done = wait_job(client, job_id)
    assert done["status"] == "done", done["error"]
    result = client.get(f"/diffing/jobs/{job_id}/result").json()
    assert result["num_samples"] == 40 and result["total_positions"] == 40 * 6
    topics = result["orderings"]["nmf"]["orderings"]
    assert [t["ordering_id"] for t in topics] == ["topic_0", "topic_1"] and all(t["tokens"] for t in topics)
    example = result["kl_examples_by_max"][0]
    tok = client.app.state.pair.after.tokenizer
    start = example["token_ids"].index(tok.convert_tokens_to_ids("<|assistant|>")) + 2  # "<|assistant|>\n"
    assert example["positions"] == list(range(start - 2, start + 4))
    names = zipfile.ZipFile(io.BytesIO(client.get(f"/diffing/jobs/{job_id}/results.zip").content)).namelist()
    assert any(n.startswith("nmf_topics2_") and n.endswith("chats/topic_0.json") for n in names), names


def test_an_empty_dataset_is_a_422(client, tmp_path):
    folder = client.app.state.settings.data_dir / "empty-set"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("")
    r = client.post("/diffing/jobs", json={"method": "logit_diff", "dataset": {"path": str(folder)}})
    assert r.status_code == 422 and "dataset" in r.text, r.text


def test_max_diffing_rows_bounds_a_job(tiny_dirs, tmp_path):
    from tests.test_api import make_settings

    with TestClient(create_app(make_settings(tiny_dirs, tmp_path, max_diffing_rows=3))) as c:
        wait_ready(c)
        assert c.get("/info").json()["limits"]["max_diffing_rows"] == 3
        for body, field in (({"texts": ["a b c d"] * 4}, "texts"), ({"texts": ["a b c d"], "max_samples": 4}, "max_samples")):
            r = c.post("/diffing/jobs", json={"method": "logit_diff", "max_tokens_per_sample": 2} | body)
            assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
        r = c.post("/diffing/jobs", json={"method": "logit_diff", "texts": ["a b c d"] * 3,
                                          "max_tokens_per_sample": 2, "top_k": 2})  # fmt: skip
        assert r.status_code == 202, r.text  # the default 8192 samples capped at the limit
        assert c.get(f"/diffing/jobs/{r.json()['id']}").json()["spec"]["max_samples"] == 3
