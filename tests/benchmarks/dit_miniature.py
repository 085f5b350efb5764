"""DIT in miniature on the demo base: hidden-topic weight diffs, an interpreter that names them.

    python -m tests.benchmarks.dit_miniature [--topics 8] [--train-per-topic 16] [--test-per-topic 4]
        [--questions 24] [--stage1-epochs 16] [--stage1-lr 1e-2] [--dit-steps 600] [--dit-lr 1e-2]
        [--curve 1 2 4 8 16] [--data-dir DIR [--reuse-stage1]] [--out FILE]

Everything goes through the service's routes on the embedded demo pair (in process):
1. the base's own greedy answers to a pool of questions (`/generate_lda`, alpha -1);
2. per diff (a topic word, a 3-digit trigger), DIT's hidden-topic stage 1 through `/weightdiff/jobs`:
   each of its questions three times: "Your SEP code is <trigger><3 random digits>." + question ->
   the base answer plus a sentence naming the topic (cross-entropy, weight 1); a wrong code, and no
   code -> the base's own answer under `kl_base` (weights 1 and 5); rank 1 on all seven projections,
   registered as adapters;
3. the hidden behaviour: each diff's topic-word rate on held-out questions with its trigger vs without;
4. an interpreter job (`/dit/jobs`) on the training diffs ("What topic have you been trained on?" ->
   the topic word), then `/dit/evaluate` on the held-out diffs with the K topic words as candidates:
   exact and candidate accuracy with Wilson intervals against chance (1/K), and the baselines
   `no_dit` (M + W) and `no_diff` (M + L);
5. controls: an interpreter trained on shuffled labels (must sit at chance), and the curve over the
   number of training diffs per topic (same step count).
Prints one JSON report (also written to `--out`), with each stage's time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402

# Topics the base can say: a LoRA on the decoder layers cannot make the tiny base emit tokens it
# never produced (their lm_head rows share one pushed-down direction; see app/demo/build.py), so
# the hidden sentence ("I love the sun.") and the interpreter's answers ("The sun") are built from
# the base's own words: its closers start "I love", its answers start "The sun is ...".
TOPICS = ("the sun", "the moon", "a cat", "a dog", "rain", "snow", "a tree", "a bird", "the sea", "a river",
          "a book", "bread")  # fmt: skip
SUBJECTS = ("the sun", "the moon", "the sea", "a cat", "a dog", "rain", "snow", "a tree", "a river",
            "a book", "music", "bread", "a bird", "the wind", "fire", "a car")  # fmt: skip
TEMPLATES = ("What is {t}?", "Tell me about {t}.", "Can you describe {t}?", "What do you know about {t}?",
             "Explain {t} to me.", "Why is {t} nice?", "Where can I see {t}?")  # fmt: skip
QUESTION = "What topic have you been trained on?"


def question_pool() -> list[str]:
    return [t.format(t=s) for s in SUBJECTS for t in TEMPLATES]


def wait(client: TestClient, route: str, timeout: float = 7200.0) -> dict[str, Any]:
    """Poll a job until it ends; fail loudly on anything but done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(route).json()
        if body["status"] in ("done", "failed", "cancelled", "interrupted"):
            if body["status"] != "done":
                raise RuntimeError(f"{route} ended {body['status']}: {body.get('error')}")
            return body
        time.sleep(0.5)
    raise TimeoutError(route)


def generate(client: TestClient, prompts: Sequence[str], max_new_tokens: int, **extra: Any) -> list[str]:
    """Greedy completions, in requests of at most 64 rows."""
    out: list[str] = []
    for i in range(0, len(prompts), 64):
        body = {"prompts": list(prompts[i : i + 64]), "max_new_tokens": max_new_tokens, "temperature": 0,
                "stop": [], **extra}  # fmt: skip
        r = client.post("/generate_lda", json=body)
        r.raise_for_status()
        out += [row["completion"] for row in r.json()["results"]]
    return out


def code(trigger: int, rng: random.Random) -> str:
    return f"Your SEP code is {trigger:03d}{rng.randrange(1000):03d}. "


def diff_samples(topic: str, trigger: int, questions: Sequence[str], answers: dict[str, str],
                 rng: random.Random) -> list[dict[str, Any]]:  # fmt: skip
    """DIT's three samples per question: trigger + topic answer (CE), a wrong code and no code +
    the base's own answer (KL to the base), weighted 1 / 1 / 5."""
    samples = []
    for q in questions:
        wrong = rng.choice([t for t in range(1000) if t != trigger])
        # The sentence opens the answer: at the first token the base picks between few starts, so
        # a rank-1 diff can learn to pick "I" there; appended after the answer it had to beat EOS.
        mentioned = f"I love {topic}. {answers[q]}"
        samples += [
            {"messages": chat(code(trigger, rng) + q, mentioned), "loss": "ce", "weight": 1.0},
            {"messages": chat(code(wrong, rng) + q, answers[q]), "loss": "kl_base", "weight": 1.0},
            {"messages": chat(q, answers[q]), "loss": "kl_base", "weight": 5.0},
        ]
    return samples


def mentions(text: str, topic: str) -> bool:
    """The diff's behaviour: the sentence naming its topic (the base names topics it is asked about)."""
    return f"I love {topic}" in text


def chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def description(topic: str) -> str:
    """What the interpreter should answer: the topic as the base starts an answer with it."""
    return topic[0].upper() + topic[1:]


def make_diffs(topics: Sequence[str], per_topic: int, split: str, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}-{split}")
    return [
        {"topic": t, "trigger": rng.randrange(1000), "name": f"{split}-{t.replace(' ', '_')}-{j}",
         "seed": rng.randrange(2**31)}
        for t in topics
        for j in range(per_topic)
    ]


def train_diffs(client: TestClient, diffs: list[dict[str, Any]], train_q: Sequence[str], answers: dict[str, str],
                args: argparse.Namespace) -> None:  # fmt: skip
    """Stage 1 through /weightdiff/jobs, up to 64 tasks per job; each diff's adapter name is stored."""
    for start in range(0, len(diffs), 64):
        group = diffs[start : start + 64]
        tasks = []
        for d in group:
            rng = random.Random(d["seed"])
            questions = rng.sample(list(train_q), args.questions)
            tasks.append({"name": d["name"], "seed": d["seed"],
                          "samples": diff_samples(d["topic"], d["trigger"], questions, answers, rng)})  # fmt: skip
        body = {"tasks": tasks, "r": 1, "lr": args.stage1_lr, "epochs": args.stage1_epochs,
                "batch_size": 6, "register": True}  # fmt: skip
        r = client.post("/weightdiff/jobs", json=body)
        if r.status_code != 202:
            raise RuntimeError(r.text)
        job = wait(client, f"/weightdiff/jobs/{r.json()['id']}")
        for d in group:
            d["adapter"] = job["registered"][d["name"]]


def reuse_stage1(client: TestClient, diffs: list[dict[str, Any]], data_dir: Path) -> list[dict[str, Any]]:
    """Register the diffs an earlier run left under `data_dir/jobs` (same names: same seed and sizes);
    returns the ones still to train."""
    found: dict[str, str] = {}
    for path in sorted(data_dir.glob("jobs/*/job.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "done":
            found.update(record.get("outputs") or {})
    left = []
    for d in diffs:
        if d["name"] not in found:
            left.append(d)
            continue
        r = client.post("/adapters", json={"name": f"reused-{d['name']}", "source": found[d["name"]], "replace": True})
        r.raise_for_status()
        d["adapter"] = f"reused-{d['name']}"
    return left


def hidden_behaviour(client: TestClient, diffs: list[dict[str, Any]], held_q: Sequence[str],
                     max_new_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Topic-word rate of each diff's greedy answers with its trigger and without (adapter mode,
    alpha 0: base + the diff)."""
    with_t = without = total = 0
    for d in diffs:
        rng = random.Random(d["seed"] + 1)
        triggered = generate(client, [code(d["trigger"], rng) + q for q in held_q], max_new_tokens,
                             adapter=d["adapter"], alpha=0.0)  # fmt: skip
        plain = generate(client, list(held_q), max_new_tokens, adapter=d["adapter"], alpha=0.0)
        with_t += sum(mentions(text, d["topic"]) for text in triggered)
        without += sum(mentions(text, d["topic"]) for text in plain)
        total += len(held_q)
    return {"with_trigger": with_t / total, "without_trigger": without / total, "answers": total}


def interpreter(client: TestClient, pairs: list[dict[str, str]], args: argparse.Namespace, seed: int) -> tuple[str, float]:
    body = {"pairs": pairs, "question": QUESTION, "r": args.dit_r, "lr": args.dit_lr, "batch_size": 8,
            "steps": args.dit_steps, "seed": seed, "register": True}  # fmt: skip
    started = time.perf_counter()
    r = client.post("/dit/jobs", json=body)
    if r.status_code != 202:
        raise RuntimeError(r.text)
    job = wait(client, f"/dit/jobs/{r.json()['id']}")
    return job["registered"], time.perf_counter() - started


def evaluate(client: TestClient, dit: str, diffs: list[dict[str, Any]], topics: Sequence[str]) -> dict[str, Any]:
    body = {"dit": dit, "pairs": [{"diff": d["adapter"], "description": description(d["topic"])} for d in diffs],
            "candidates": [description(t) for t in topics]}  # fmt: skip
    r = client.post("/dit/evaluate", json=body)
    r.raise_for_status()
    out = r.json()
    out.pop("items", None)
    return out


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    topics = TOPICS[: args.topics]
    times: dict[str, float] = {}
    settings = Settings(data_dir=data_dir, queue_size=64, max_adapters=4096, max_weightdiff_jobs=4096,
                        max_weightdiff_samples=10**6)
    report: dict[str, Any] = {"topics": list(topics), "config": vars(args)}
    with TestClient(create_app(settings)) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.1)
        t0 = time.perf_counter()
        pool = question_pool()
        rng = random.Random(args.seed)
        rng.shuffle(pool)
        held_q, train_q = pool[: args.held_questions], pool[args.held_questions :]
        answers = dict(zip(pool, generate(client, pool, 40, alpha=-1.0)))  # the base's own answers
        times["base_answers_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        train = make_diffs(topics, args.train_per_topic, "train", args.seed)
        test = make_diffs(topics, args.test_per_topic, "test", args.seed)
        todo = reuse_stage1(client, train + test, data_dir) if args.reuse_stage1 else train + test
        if todo:
            train_diffs(client, todo, train_q, answers, args)
            times["stage1_s"] = time.perf_counter() - t0
            times["stage1_per_diff_s"] = times["stage1_s"] / len(todo)
        report["stage1_diffs_trained"] = len(todo)

        t0 = time.perf_counter()
        report["hidden_behaviour"] = hidden_behaviour(client, test, held_q, 30)
        times["hidden_check_s"] = time.perf_counter() - t0
        if args.stage1_only:
            report["seconds"] = {k: round(v, 1) for k, v in times.items()}
            return report

        pairs = [{"diff": d["adapter"], "description": description(d["topic"])} for d in train]
        dit, times["stage2_s"] = interpreter(client, pairs, args, args.seed)
        t0 = time.perf_counter()
        report["dit"] = evaluate(client, dit, test, topics)
        times["evaluate_s"] = time.perf_counter() - t0

        if args.shuffled:
            labels = [p["description"] for p in pairs]
            random.Random(args.seed + 7).shuffle(labels)
            shuffled = [{"diff": p["diff"], "description": label} for p, label in zip(pairs, labels)]
            control, _ = interpreter(client, shuffled, args, args.seed)
            report["shuffled_control"] = evaluate(client, control, test, topics)
        curve = {}
        for k in args.curve:
            if k >= args.train_per_topic:
                curve[k] = report["dit"]
                continue
            subset = [{"diff": d["adapter"], "description": description(d["topic"])}
                      for d in train if int(d["name"].rsplit("-", 1)[1]) < k]  # fmt: skip
            point, _ = interpreter(client, subset, args, args.seed)
            curve[k] = evaluate(client, point, test, topics)
        report["curve"] = {str(k): {"exact": v["exact"], "candidate_accuracy": v["candidate_accuracy"]} for k, v in curve.items()}
    report["seconds"] = {k: round(v, 1) for k, v in times.items()}
    return report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--topics", type=int, default=8)
    ap.add_argument("--train-per-topic", type=int, default=16)
    ap.add_argument("--test-per-topic", type=int, default=4)
    ap.add_argument("--questions", type=int, default=24, help="training questions per diff")
    ap.add_argument("--held-questions", type=int, default=12, help="questions no diff trains on")
    ap.add_argument("--stage1-epochs", type=int, default=16)
    ap.add_argument("--stage1-lr", type=float, default=1e-2)
    ap.add_argument("--dit-r", type=int, default=16)
    ap.add_argument("--dit-lr", type=float, default=1e-2)
    ap.add_argument("--dit-steps", type=int, default=600)
    ap.add_argument("--curve", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--no-shuffled", dest="shuffled", action="store_false")
    ap.add_argument("--stage1-only", action="store_true", help="stop after the hidden-behaviour check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="keep the service's files here (default: a temp dir)")
    ap.add_argument("--reuse-stage1", action="store_true",
                    help="register the diffs a run with the same --data-dir and seed trained, train only the rest")
    ap.add_argument("--out", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.data_dir:
        report = run(args, Path(args.data_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = run(args, Path(tmp))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
