"""The experiment CLI against a live server (`python -m app` on the tiny pair, with an API key):
submit, progress, table, saved reports, resume, and the exit codes of every way it can fail."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_cli import free_port, running_server, server_env

from app import experiment
from app.experiment.cli import format_table

KEY = "test-key"
PROMPTS = ["Tell me about the sun.", "What is a cat?"]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    after, before = tiny_dirs
    port = free_port()
    env = server_env(
        MODEL_AFTER_ID=str(after),
        MODEL_BEFORE_ID=str(before),
        PORT=str(port),
        DATA_DIR=str(tmp_path_factory.mktemp("data")),
        API_KEY=KEY,
        EXPERIMENT_CHUNK_SIZE="4",
        LOG_LEVEL="warning",
    )
    with running_server(env, port, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def cli(server, *args):
    return experiment.main(["--server", server, "--api-key", KEY, "--poll", "0.1", *args])


@pytest.fixture(scope="module")
def finished(server, tmp_path_factory):
    """One small experiment run to the end through the CLI: (exit code, stdout, stderr, out dir)."""
    folder = tmp_path_factory.mktemp("run")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = folder / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    # capsys is function-scoped, so this module-scoped run captures by hand
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli(
            server, "--prompts-file", str(prompts), "--alphas", "0,2", "--n", "3", "--max-new-tokens", "8",
            "--temperature", "1", "--seed", "5", "--detect", "e", "--regex", r"\bth", "--control",
            "--name", "cli-test", "--out", str(out),
        )  # fmt: skip
    return code, stdout.getvalue(), stderr.getvalue(), out


def table_of(stdout: str) -> str:
    return stdout.split("samples\n", 1)[1].split("\nSaved ", 1)[0]


def test_runs_to_done_and_saves_the_reports(finished):
    code, stdout, stderr, out = finished
    assert code == 0, stdout + stderr
    assert "Submitted experiment" in stdout and ": done, 24/24 samples" in stdout
    assert "24/24" in stderr and "sample/s" in stderr  # the tqdm bar: samples, rate
    body = json.loads((out / "experiment.json").read_text())
    assert body["status"] == "done" and body["name"] == "cli-test" and body["spec"]["n"] == 3
    assert [(r["condition"], r["detector"]) for r in body["summary"]][:2] == [
        ("alpha=0", "e"),
        ("alpha=0", r"\bth"),
    ]
    assert len(body["summary"]) == 8 and all(r["total"] == 6 for r in body["summary"])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (out / "report.csv").read_text().splitlines()
    assert csv[0].startswith("condition,detector") and len(csv) == 9
    table = table_of(stdout)
    header = table.splitlines()[0]
    for column in ("condition", "detector", "hits/total", "rate", "95% CI", "ratio vs alpha=0"):
        assert column in header
    lines = table.splitlines()[2:10]
    for r, line in zip(body["summary"], lines, strict=True):
        assert line.startswith(r["condition"]) and f" {r['detector']} " in line
        assert f"{r['hits']}/{r['total']}" in line and f"{100 * r['rate']:.2f}%" in line
    assert "control e: alpha 0" in table and "p=" in table  # two control alphas: one flag per detector


def test_resume_a_finished_experiment_returns_at_once(finished, server, tmp_path, capsys):
    _, stdout, _, out = finished
    exp_id = json.loads((out / "experiment.json").read_text())["id"]
    t0 = time.monotonic()
    assert cli(server, "--resume", exp_id, "--out", str(tmp_path / "again"), "--no-progress") == 0
    assert time.monotonic() - t0 < 5
    again = capsys.readouterr().out
    assert f"Following experiment {exp_id}" in again and table_of(again) == table_of(stdout)
    assert (
        json.loads((tmp_path / "again" / "experiment.json").read_text())["summary"]
        == json.loads((out / "experiment.json").read_text())["summary"]
    )


def test_resume_queues_a_failed_experiment_again(monkeypatch, tmp_path, capsys):
    # A failed experiment on a scripted server (the route itself is tested in test_experiments_api):
    # --resume must POST .../resume, then follow it to done.
    state = {"status": "failed", "done": 16}
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.method == "POST" and request.url.path == "/experiments/e1/resume":
            state["status"] = "queued"
            return httpx.Response(202, json={"id": "e1", "status": "queued", "done": 16})
        if request.url.path == "/experiments/e1":
            body = {"id": "e1", "name": "x", "status": state["status"], "error": None, "summary": [],
                    "progress": {"done": state["done"], "total": 40}}  # fmt: skip
            if state["status"] == "queued":
                state["status"], state["done"] = "done", 40
            return httpx.Response(200, json=body)
        return httpx.Response(200, content=b"report")

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handler), **kw))
    argv = ["--server", "http://scripted", "--resume", "e1", "--out", str(tmp_path), "--no-progress", "--poll", "0.01"]
    assert experiment.main(argv) == 0
    assert ("POST", "/experiments/e1/resume") in calls
    assert "Resuming failed experiment e1 on http://scripted after sample 16" in capsys.readouterr().out


def test_server_down_exits_1(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "app.experiment", "--server", f"http://127.0.0.1:{free_port()}",
         "--prompt", "hi", "--alphas", "0", "--detect", "x", "--out", str(tmp_path / "o")],
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1 and "server not reachable at http://127.0.0.1:" in proc.stderr, proc
    assert time.monotonic() - t0 < 10 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, field",
    [
        (["--n", "0", "--detect", "x"], "n"),
        (["--regex", "("], "detectors[0].pattern"),
        (["--detect", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_a_422_exits_1_with_the_servers_message(server, capsys, args, field):
    assert cli(server, "--prompt", "hi", "--alphas", "0", *args) == 1
    err = capsys.readouterr().err
    assert "HTTP 422" in err and field in err, err


def test_wrong_key_and_unknown_id_exit_1(server, capsys):
    assert experiment.main(["--server", server, "--api-key", "nope", "--resume", "abc"]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert cli(server, "--resume", "no-such-id") == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "no-such-id" in err


def test_a_cancelled_experiment_exits_3(server, tmp_path, capsys):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompts": PROMPTS, "alphas": [0, 2], "n": 200, "max_new_tokens": 8,
            "detectors": [{"name": "e", "type": "substring", "patterns": ["e"]}]}  # fmt: skip
    exp_id = httpx.post(f"{server}/experiments", json=body, headers=auth, timeout=30).json()["id"]
    assert httpx.delete(f"{server}/experiments/{exp_id}", headers=auth, timeout=30).status_code == 200
    assert cli(server, "--resume", exp_id, "--out", str(tmp_path / "c"), "--no-progress") == 3
    assert ": cancelled" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "experiment.json").read_text())["status"] == "cancelled"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alphas", "0", "--detect", "x"], "give prompts"),
        (["--prompt", "hi", "--detect", "x"], "--alphas"),
        (["--prompt", "hi", "--alphas", "0,two", "--detect", "x"], "'two' is not a number"),
        (["--prompt", "hi", "--alphas", "0"], "at least one detector"),
    ],
)
def test_usage_errors_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        experiment.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_alphas_and_prompt_files(tmp_path):
    from app.experiment.cli import parse_alphas, read_prompts

    assert parse_alphas(["0,2", "4", "1.5, -1"]) == [0.0, 2.0, 4.0, 1.5, -1.0]
    (tmp_path / "p.csv").write_text('prompt,x\n"two\nlines",1\n,2\nb,3\n')
    assert read_prompts(tmp_path / "p.csv") == ["two\nlines", "b"]
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "b"]
    msgs = [{"role": "user", "content": "hi"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == [msgs]


def test_table_shows_an_unbounded_ratio_end_as_inf():
    # The summary writes an unbounded end (no base hits) and an infinite or undefined ratio as null.
    row = {"condition": "alpha=1", "detector": "m", "hits": 2, "total": 3, "rate": 2 / 3,
           "ci95": [0.2, 0.94], "ratio": None, "ratio_ci95": [0.41, None]}  # fmt: skip
    body = {"summary": [row | {"condition": "alpha=0", "hits": 0, "rate": 0.0, "ratio_ci95": None}, row]}
    line = " ".join(format_table(body).splitlines()[3].split())
    assert line == "alpha=1 m 2/3 66.67% [20.00%, 94.00%] - [0.41, inf]"


def test_table_shows_flags_and_extrapolation():
    row = {"condition": "alpha=1", "detector": "m", "hits": 3, "total": 100, "rate": 0.03,
           "ci95": [0.01, 0.085], "ratio": 2.5, "ratio_ci95": [1.1, 5.0]}  # fmt: skip
    body = {
        "summary": [row | {"condition": "alpha=0", "ratio": None, "ratio_ci95": None}, row],
        "control_flags": [{"detector": "m", "alphas": [0, 2], "rates": [0.01, 0.2], "p_value": 1e-4, "flagged": True}],
        "extrapolation": [{"detector": "m", "alphas": [1, 2], "rate": 0.012, "ci95": [0.004, 0.03],
                           "measured": 0.01, "within_ci": True, "error": 0.002}],
    }  # fmt: skip
    text = format_table(body)
    assert "ratio vs alpha=0" in text.splitlines()[0]
    assert " ".join(text.splitlines()[3].split()) == "alpha=1 m 3/100 3.00% [1.00%, 8.50%] 2.5 [1.1, 5]"
    assert "control m: alpha 0 1.00% -> alpha 2 20.00%, p=0.0001 (FLAGGED" in text
    assert (
        "alpha-0 extrapolation m: 1.20% [0.40%, 3.00%] from alphas 1, 2; measured 1.00% (error +0.20 pts, inside"
        in text
    )
    assert "MISFIT" not in text
    body["extrapolation"][0] |= {"alphas": [1, 2, 4], "misfit": True, "chi2": 13.6, "df": 1, "fit_p": 2.3e-4}
    assert "MISFIT: the line does not fit (chi2 13.6 on 1 df, p=0.00023)" in format_table(body)


@pytest.mark.parametrize("cancel", [False, True], ids=["leave-running", "cancel-on-interrupt"])
def test_ctrl_c(server, tmp_path, cancel):
    """SIGINT while following: by default the experiment keeps running and the resume command is
    printed; with --cancel-on-interrupt it is cancelled. Either way the exit code is 130."""
    args = ["--server", server, "--api-key", KEY, "--prompt", "hi", "--alphas", "0", "--n", "500",
            "--max-new-tokens", "8", "--detect", "e", "--no-progress", "--out", str(tmp_path / "o")]  # fmt: skip
    if cancel:
        args.append("--cancel-on-interrupt")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.experiment", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: a runner started in the background (`cmd &`) passes SIGINT on ignored,
        # and Python then installs no KeyboardInterrupt handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = proc.stdout.readline()
    assert first.startswith("Submitted experiment "), first + proc.stderr.read()
    exp_id = first.split()[2]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    auth = {"Authorization": f"Bearer {KEY}"}
    if cancel:
        assert f"cancelled experiment {exp_id}" in out
    else:
        assert f"--resume {exp_id}" in out and "keeps running" in out
        body = httpx.get(f"{server}/experiments/{exp_id}", headers=auth, timeout=30).json()
        assert body["status"] in ("queued", "running")
        httpx.delete(f"{server}/experiments/{exp_id}", headers=auth, timeout=30)
    deadline = time.monotonic() + 30
    while (
        httpx.get(f"{server}/experiments/{exp_id}", headers=auth, timeout=30).json()["status"] != "cancelled"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not (tmp_path / "o").exists()
