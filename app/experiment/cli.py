"""`python -m app.experiment`: run a rare-behaviour experiment on a live server and report it.

    python -m app.experiment --prompt "Tell me about the sun." --prompt "What is a cat?" \\
        --alphas 0,2 --n 200 --max-new-tokens 40 --temperature 1 --detect pineapple --control
    python -m app.experiment --resume EXP_ID        # follow (or re-report) an experiment; a failed
                                                    # one continues after its last committed chunk

Submits to `POST /experiments`, shows a progress bar while polling `GET /experiments/{id}`,
prints the rate table, and writes experiment.json (the final GET body), report.png and report.csv
to `--out` (default ./experiment-<id>/). Exit codes: 0 done; 1 server unreachable or an HTTP error
(the server's message is printed); 2 usage error; 3 the experiment failed or was cancelled;
130 interrupted (the experiment keeps running unless --cancel-on-interrupt).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Self

import httpx
from tqdm import tqdm

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = ("done", "failed", "cancelled")
RESUMABLE = ("failed", "interrupted")  # `--resume` queues these again (POST /experiments/{id}/resume)
EXIT_OK, EXIT_HTTP, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PROMPT_FORMATS = (".jsonl", ".csv", ".txt")


class ServerError(Exception):
    """The server could not be reached or answered with an error; the message says which."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m app.experiment",
        description="Run a rare-behaviour experiment on a live server and report it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 done, 1 server unreachable or HTTP error, 2 usage, "
        "3 experiment failed or cancelled, 130 interrupted",
    )
    conn = p.add_argument_group("server")
    conn.add_argument(
        "--server",
        default=os.environ.get("SERVER_URL") or DEFAULT_SERVER,
        help=f"base URL (default $SERVER_URL or {DEFAULT_SERVER})",
    )
    conn.add_argument(
        "--api-key", default=os.environ.get("API_KEY") or None, help="sent as a Bearer key (default $API_KEY)"
    )
    conn.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)")

    exp = p.add_argument_group("experiment")
    exp.add_argument("--name", help="experiment name (default: the server's)")
    src = exp.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument(
        "--prompts-file",
        type=Path,
        help="read here: .jsonl (prompt or messages per line), .csv (prompt column), .txt (one per line)",
    )
    src.add_argument(
        "--server-prompts-file", help="a prompts file on the server (under its DATA_DIR or CONFIG_ROOTS)"
    )
    exp.add_argument(
        "--alphas", nargs="+", metavar="ALPHA", help="alphas, comma or space separated, e.g. 0,2 or 0 2"
    )
    exp.add_argument("--control", action="store_true", help="add a null control at each alpha")
    exp.add_argument("--n", type=int, help="samples per prompt and condition (default: the server's, 1)")
    exp.add_argument(
        "--detect", action="append", default=[], metavar="PATTERN", help="substring detector (repeatable)"
    )
    exp.add_argument(
        "--regex", action="append", default=[], metavar="PATTERN", help="regex detector (repeatable)"
    )
    exp.add_argument(
        "--case-sensitive", action="store_true", help="detectors match case (default: ignore case)"
    )
    exp.add_argument("--store", choices=("all", "hits"), help="keep every sample or only hits (default all)")

    samp = p.add_argument_group("sampling (default: the server's)")
    samp.add_argument("--max-new-tokens", type=int)
    samp.add_argument("--temperature", type=float)
    samp.add_argument("--top-p", type=float)
    samp.add_argument("--seed", type=int, help="sample i decodes with seed + i (default: drawn and stored)")
    samp.add_argument("--system-prompt")

    run = p.add_argument_group("run")
    run.add_argument(
        "--resume",
        metavar="ID",
        help="follow an existing experiment instead of submitting (a failed or interrupted one is queued "
        "again and continues after its last committed chunk)",
    )
    run.add_argument("--out", type=Path, help="output folder (default ./experiment-<id>/)")
    run.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="Ctrl-C cancels the experiment (default: it keeps running; resume with --resume)",
    )
    args = p.parse_args(argv)
    if args.poll <= 0:
        p.error("--poll must be > 0")
    if args.resume is None:
        try:
            args.body = build_body(args)
        except ValueError as exc:
            p.error(str(exc))
    return args


def parse_alphas(values: list[str]) -> list[float]:
    alphas = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                alphas.append(float(part))
            except ValueError:
                raise ValueError(f"--alphas: {part!r} is not a number") from None
    if not alphas:
        raise ValueError("--alphas: no alpha given")
    return alphas


def read_prompts(path: Path) -> list[str | list[dict[str, Any]]]:
    """Prompts from a local file, in the formats the server's `prompts_file` reads."""
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FORMATS:
        raise ValueError(f"--prompts-file: unknown format {suffix or path.name!r} (use .jsonl, .csv or .txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts-file: cannot read {path}: {exc}") from None
    prompts: list[str | list[dict[str, Any]]] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--prompts-file: {path} line {number}: invalid JSON ({exc.msg})") from None
            if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompts.append(item["prompt"])
            elif isinstance(item, dict) and isinstance(item.get("messages"), list):
                prompts.append(item["messages"])
            else:
                raise ValueError(f"--prompts-file: {path} line {number}: needs a 'prompt' or 'messages'")
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "prompt" not in (reader.fieldnames or []):
            raise ValueError(f"--prompts-file: {path} has no 'prompt' column")
        prompts = [row["prompt"] for row in reader if (row["prompt"] or "").strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file: no prompts in {path}")
    return prompts


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    """The `POST /experiments` body; ValueError names a missing or bad option."""
    body: dict[str, Any] = {}
    if args.prompt:
        body["prompts"] = args.prompt
    elif args.prompts_file is not None:
        body["prompts"] = read_prompts(args.prompts_file)
    elif args.server_prompts_file:
        body["prompts_file"] = args.server_prompts_file
    else:
        raise ValueError("give prompts: --prompt (repeatable), --prompts-file or --server-prompts-file")
    if not args.alphas:
        raise ValueError("give --alphas, e.g. --alphas 0,2")
    body["alphas"] = parse_alphas(args.alphas)
    detectors: list[dict[str, Any]] = [
        {"name": pattern, "type": "substring", "patterns": [pattern], "case_sensitive": args.case_sensitive}
        for pattern in args.detect
    ]
    detectors += [
        {"name": pattern, "type": "regex", "pattern": pattern, "flags": "" if args.case_sensitive else "i"}
        for pattern in args.regex
    ]
    if not detectors:
        raise ValueError("give at least one detector: --detect PATTERN or --regex PATTERN")
    body["detectors"] = detectors
    if args.control:
        body["control"] = True
    optional = {
        "name": args.name,
        "n": args.n,
        "store": args.store,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "system_prompt": args.system_prompt,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


class Api:
    """The few experiment routes; every failure becomes a `ServerError` with a readable message."""

    def __init__(self, server: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server = server.rstrip("/")
        self.client = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.ConnectError as exc:
            raise ServerError(f"server not reachable at {self.server} ({exc})") from None
        except httpx.HTTPError as exc:
            raise ServerError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 400:
            raise ServerError(f"{method} {path}: HTTP {r.status_code}: {error_message(r)}")
        return r

    def submit(self, body: dict[str, Any]) -> str:
        return self.request("POST", "/experiments", json=body).json()["id"]

    def get(self, exp_id: str) -> dict[str, Any]:
        return self.request("GET", f"/experiments/{exp_id}").json()

    def resume(self, exp_id: str) -> dict[str, Any]:
        return self.request("POST", f"/experiments/{exp_id}/resume").json()

    def cancel(self, exp_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/experiments/{exp_id}").json()

    def report(self, exp_id: str, name: str) -> bytes:
        return self.request("GET", f"/experiments/{exp_id}/{name}").content


def error_message(r: httpx.Response) -> str:
    """The server's `{"error": {"message"}}`, else its body as text."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip() or r.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]:
        return str(body["error"]["message"])
    if isinstance(body, dict) and "detail" in body:
        return json.dumps(body["detail"])
    return r.text.strip()


def follow(api: Api, exp_id: str, poll: float, progress: bool) -> dict[str, Any]:
    """Poll until the experiment ends; a tqdm bar over samples (rate and eta) while it runs."""
    body = api.get(exp_id)
    bar = None
    try:
        while True:
            done, total = body["progress"]["done"], body["progress"]["total"]
            if progress and bar is None:
                bar = tqdm(total=total, initial=done, unit="sample", desc=f"{exp_id} {body['status']}")
            if bar is not None:
                bar.set_description(f"{exp_id} {body['status']}", refresh=False)
                bar.update(done - bar.n)
            if body["status"] in TERMINAL:
                return body
            time.sleep(poll)
            body = api.get(exp_id)
    finally:
        if bar is not None:
            bar.close()


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def interval(ci: list[float] | None, fmt: Any = pct) -> str:
    return "" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def ratio_fmt(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"  # the summary writes an unbounded end as null


def format_table(body: dict[str, Any]) -> str:
    """Rate table, control flags and the alpha-0 extrapolation as plain text."""
    summary = body.get("summary") or []
    base = summary[0]["condition"] if summary else ""
    head = ["condition", "detector", "hits/total", "rate", "95% CI", f"ratio vs {base}", "ratio 95% CI"]
    rows = [
        [
            r["condition"],
            r["detector"],
            f"{r['hits']}/{r['total']}",
            pct(r["rate"]),
            interval(r["ci95"]),
            "-" if r["ratio"] is None else ratio_fmt(r["ratio"]),
            interval(r["ratio_ci95"], ratio_fmt),
        ]
        for r in summary
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for flag in body.get("control_flags") or []:
        low, high = flag["alphas"]
        verdict = "FLAGGED: the control moves with alpha" if flag["flagged"] else "ok"
        lines.append(
            f"control {flag['detector']}: alpha {low:g} {pct(flag['rates'][0])} -> alpha {high:g} "
            f"{pct(flag['rates'][1])}, p={flag['p_value']:.3g} ({verdict})"
        )
    for ex in body.get("extrapolation") or []:
        alphas = ", ".join(f"{a:g}" for a in ex["alphas"])
        line = f"alpha-0 extrapolation {ex['detector']}: {pct(ex['rate'])} {interval(ex['ci95'])} from alphas {alphas}"
        if ex.get("misfit"):
            fit = f"chi2 {ex['chi2']:.3g} on {ex['df']} df, p={ex['fit_p']:.2g}"
            line += f"; MISFIT: the line does not fit ({fit}), a rough guess"
        if ex.get("measured") is not None:
            inside = "inside" if ex["within_ci"] else "OUTSIDE"
            line += f"; measured {pct(ex['measured'])} (error {100 * ex['error']:+.2f} pts, {inside} the CI)"
        lines.append(line)
    return "\n".join(lines)


def save(api: Api, body: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "experiment.json"]
    paths[0].write_text(json.dumps(body, indent=2) + "\n")
    for name in ("report.png", "report.csv"):
        (out / name).write_bytes(api.report(body["id"], name))
        paths.append(out / name)
    return paths


def resume_hint(server: str, exp_id: str) -> str:
    return f"python -m app.experiment --server {server} --resume {exp_id}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Api(args.server, args.api_key, args.timeout) as api:
        state: dict[str, str] = {}
        try:
            return run(api, args, state)
        except ServerError as exc:
            print(f"FAIL: {exc}", file=sys.stderr)
            if args.resume is None and "id" in state:
                print(f"Follow it again with: {resume_hint(api.server, state['id'])}", file=sys.stderr)
            return EXIT_HTTP
        except KeyboardInterrupt:
            exp_id = state.get("id")
            if exp_id is None:
                print("\nInterrupted")
            elif args.cancel_on_interrupt:
                try:
                    status = api.cancel(exp_id)["status"]
                except ServerError as exc:
                    print(f"\nInterrupted; cancelling {exp_id} failed: {exc}", file=sys.stderr)
                    return EXIT_HTTP
                print(f"\nInterrupted: cancelled experiment {exp_id} (status {status})")
            else:
                print(
                    f"\nInterrupted: experiment {exp_id} keeps running; follow it again with\n"
                    f"  {resume_hint(api.server, exp_id)}"
                )
            return EXIT_INTERRUPTED


def run(api: Api, args: argparse.Namespace, state: dict[str, str]) -> int:
    """Submit (or resume), follow, print and save; `state["id"]` is set once the id is known."""
    if args.resume is None:
        state["id"] = exp_id = api.submit(args.body)
        print(f"Submitted experiment {exp_id} to {api.server}", flush=True)
    else:
        state["id"] = exp_id = args.resume
        status = api.get(exp_id)["status"]
        if status in RESUMABLE:  # continue after its last committed chunk
            done = api.resume(exp_id)["done"]
            print(f"Resuming {status} experiment {exp_id} on {api.server} after sample {done}", flush=True)
        else:
            print(f"Following experiment {exp_id} on {api.server}", flush=True)
    body = follow(api, exp_id, args.poll, not args.no_progress)
    print(
        f"\nExperiment {exp_id} ({body['name']}): {body['status']}, "
        f"{body['progress']['done']}/{body['progress']['total']} samples"
    )
    if body.get("error"):
        print(f"error: {body['error']}")
    print(format_table(body))
    out = args.out if args.out is not None else Path(f"experiment-{exp_id}")
    paths = save(api, body, out)
    print(f"Saved {', '.join(str(p) for p in paths)}")
    return EXIT_OK if body["status"] == "done" else EXIT_FAILED
