"""Third-party eval harnesses against the live OpenAI routes: Inspect AI and lm-evaluation-harness.

Both run as subprocesses from a separate virtual environment (they pull in datasets, pyarrow,
pandas and scikit-learn, which the service does not need), so the service's own environment stays
lean. The venv is `EVALS_VENV` (default .venv-evals, which `make test` builds from
requirements-evals.lock); without it (or without the harness in
it) the tests skip and say so. Both tasks come from local files and run with HF_HUB_OFFLINE=1.

- Inspect: `inspect eval task.py --model openai-api/local/lda@2` with LOCAL_BASE_URL / LOCAL_API_KEY
  (a chat task, `includes()` scorer); checked: the eval succeeded on every sample, accuracy is a
  number in [0, 1], and each sample's answer is what /v1/chat/completions gives for the same body
  at temperature 0.
- lm-eval: `local-completions` with `tokenizer_backend=remote` (our /tokenizer_info, /tokenize,
  /detokenize) on a multiple-choice task read from a local JSONL (`dataset_path: json`); checked:
  every per-choice loglikelihood equals the sum of the continuation's `token_logprobs` from
  /v1/completions (echo, logprobs, max_tokens 0) on the same token ids.

By default the server is this project's, on the embedded demo pair. OPENAI_HARNESS_BASE_URL
(e.g. http://127.0.0.1:8000) points the tests at a server that is already running instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_cli import free_port, running_server, server_env

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("EVALS_VENV", ROOT / ".venv-evals")).resolve()  # `make test` builds it
MODEL = "lda@2"
TIMEOUT = 300

QA = [
    {"input": "What is the sun?", "target": "star"},
    {"input": "Tell me about snow.", "target": "cold"},
    {"input": "What is a dog?", "target": "animal"},
]
MC = [
    {"question": "The sun is", "choices": ["a star.", "a fish.", "cold."], "label": 0},
    {"question": "Snow is", "choices": ["hot.", "frozen water."], "label": 1},
]


def _tool(name: str) -> Path:
    exe = VENV / "bin" / name
    if not exe.exists():
        pytest.skip(
            f"{exe} missing: the eval harnesses live in their own venv "
            f"(make {VENV.name}/.installed, or python3 -m venv {VENV} && "
            f"{VENV}/bin/pip install -r requirements-evals.lock; or set EVALS_VENV)"
        )
    return exe


def _harness_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LOCAL_", "VIRTUAL_ENV"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(cmd, check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, request):
    """The server root: OPENAI_HARNESS_BASE_URL, or this project's server on the demo pair."""
    if url := os.environ.get("OPENAI_HARNESS_BASE_URL"):
        yield url.rstrip("/")
        return
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"{VENV} missing: no eval harness to run (set EVALS_VENV)")
    data_dir = request.getfixturevalue("demo_data_dir")
    port = free_port()
    env = server_env(PORT=str(port), DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    with running_server(env, port, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def test_inspect_chat_task_from_a_local_file(base_url, tmp_path):
    inspect = _tool("inspect")
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    (tmp_path / "task.py").write_text(
        "from pathlib import Path\n"
        "from inspect_ai import Task, task\n"
        "from inspect_ai.dataset import json_dataset\n"
        "from inspect_ai.scorer import includes\n"
        "from inspect_ai.solver import generate\n\n\n"
        "@task\n"
        "def local_qa():\n"
        "    data = json_dataset(str(Path(__file__).with_name('qa.jsonl')))\n"
        "    return Task(dataset=data, solver=generate(), scorer=includes())\n"
    )
    logs = tmp_path / "logs"
    env = _harness_env(tmp_path, LOCAL_BASE_URL=f"{base_url}/v1", LOCAL_API_KEY="unused")
    cmd = [str(inspect), "eval", "task.py", "--model", f"openai-api/local/{MODEL}", "--log-dir", str(logs),
           "--log-format", "json", "--display", "plain", "--max-tokens", "16", "--temperature", "0",
           "--seed", "1", "--max-connections", "1"]  # fmt: skip
    out = _run(cmd, env, tmp_path)
    [log_file] = logs.glob("*.json")
    log = json.loads(log_file.read_text())
    assert log["status"] == "success", out[-4000:]
    results = log["results"]
    assert results["total_samples"] == results["completed_samples"] == len(QA)
    [score] = results["scores"]
    assert score["name"] == "includes"
    accuracy = score["metrics"]["accuracy"]["value"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert len(log["samples"]) == len(QA)
    for sample in log["samples"]:
        assert sample["scores"]["includes"]["value"] in ("C", "I")
        # Inspect sent {model, messages, max_tokens, temperature, seed}: the same body answers the same.
        body = {"model": MODEL, "messages": [{"role": "user", "content": sample["input"]}],
                "max_tokens": 16, "temperature": 0.0, "seed": 1}  # fmt: skip
        direct = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()
        assert (
            sample["output"]["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        )
    assert accuracy == pytest.approx(
        sum(s["scores"]["includes"]["value"] == "C" for s in log["samples"]) / len(QA)
    )


def test_lm_eval_loglikelihood_task_from_a_local_file(base_url, tmp_path):
    lm_eval = _tool("lm_eval")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    (task_dir / "local_mc.yaml").write_text(
        "task: local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out_dir = tmp_path / "out"
    model_args = (f"model={MODEL},base_url={base_url}/v1/completions,tokenizer_backend=remote,"
                  "num_concurrent=1,max_retries=1,max_length=256")  # fmt: skip
    cmd = [str(lm_eval), "--model", "local-completions", "--model_args", model_args, "--batch_size", "2",
           "--include_path", str(task_dir), "--tasks", "local_mc", "--output_path", str(out_dir),
           "--log_samples"]  # fmt: skip
    out = _run(cmd, _harness_env(tmp_path, OPENAI_API_KEY="unused"), tmp_path)

    [results_file] = out_dir.glob("*/results_*.json")
    acc = json.loads(results_file.read_text())["results"]["local_mc"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0, out[-4000:]
    [samples_file] = out_dir.glob("*/samples_local_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(MC)))

    def ids(text: str) -> list[int]:  # what lm-eval's RemoteTokenizer sends
        r = httpx.post(f"{base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
        return r.json()["tokens"]

    n_right = 0
    for s in samples:
        doc = MC[s["doc_id"]]
        lls = [float(ll) for ll, _greedy in s["filtered_resps"]]
        assert len(lls) == len(doc["choices"])
        for choice, ll in zip(doc["choices"], lls, strict=True):
            context, whole = ids(doc["question"]), ids(f"{doc['question']} {choice}")
            assert whole[: len(context)] == context
            body = {"model": MODEL, "prompt": [whole], "max_tokens": 0, "echo": True, "logprobs": 1,
                    "temperature": 0}  # fmt: skip
            r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
            token_logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert token_logprobs[0] is None
            expected = sum(token_logprobs[len(context) : len(whole)])
            # The same float32 logprobs, from the same unpadded one-prompt scoring, summed in the same
            # order: equal up to float64 summation of ~10 terms (~1e-15 relative), so rel 1e-9 is loose.
            assert math.isfinite(ll) and ll == pytest.approx(expected, rel=1e-9, abs=1e-12)
        right = max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        assert s["acc"] == float(right)
        n_right += right
    assert acc == pytest.approx(n_right / len(MC))
