"""Every shell example in the pages and the README runs against a live demo server (issue 22).

One real server for the module: uvicorn in a background thread on the app built over a temporary
DATA_DIR holding a copy of the session's demo pair. Every ```bash (sh, shell, console) block of README.md and docs/*.md
(README first, then the pages in the site's nav order) is split into commands (backslash
continuations and quoted newlines kept, comments apart), and each command that talks to the server
(`curl ... localhost:8000 ...`, or `python -m app.experiment`, which reads SERVER_URL) runs in page
order through `bash -c` with `set -o pipefail`, the address rewritten to the test server and
`--fail-with-body` added to curl so an HTTP error fails the command.

Conventions the pages follow:

- a command followed by `# -> {... "key": "UPPER_NAME" ...}` captures that key of its JSON output,
  and UPPER_NAME is replaced by it in the later commands of the page and of later pages; when the
  command submitted a job (POST .../jobs or /experiments), a later command that uses the id first
  waits until GET <route>/<id> says done; the top-level keys such a comment shows (`{"n", "exact",
  ...}` lists keys) must be in the response, and a status code it starts with (`# -> 202 {...}`)
  must be the response's;
- a block right after `<!-- not tested: REASON -->` is skipped (docker, pip install, clusters, GPUs,
  hub downloads, minutes of run time); an unmarked block with no runnable command fails the test
  unless all its commands are harmless (`export`), so a new example cannot go untested silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
NOT_TESTED = re.compile(r"<!--\s*not tested:\s*(.+?)\s*-->\s*$")
ADDRESS = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000")
CAPTURE = re.compile(r'"(\w+)":\s*"([A-Z][A-Z0-9_]*)"')
JOB_ROUTES = re.compile(r"(/experiments|/(?:weightdiff|diffing|dit)/jobs)(?=[\s'\"]|$)")
HARMLESS = re.compile(r"^(export|cd|echo|true)\b")
JOB_TIMEOUT = 120.0
SHOWN_STATUS = re.compile(r"(\d{3})\b")  # `# -> 202 {...}`: the status code the page shows
STATUS_LINE = re.compile(r"\nHTTP_STATUS (\d{3})\n$")
CLIENTS = ("python -m app.experiment ", "python -m app.regression ")  # the server's own clients


@dataclass
class Command:
    text: str
    line: int
    captures: dict[str, str] = field(default_factory=dict)  # UPPER_NAME -> key of the JSON output
    shown: str = ""  # the `# -> ...` comment after it (and its continuation lines), "" if none


@dataclass
class Block:
    page: str
    line: int
    text: str
    skip: str | None
    commands: list[Command]


def split(text: str, first_line: int = 1) -> list[tuple[str, int, str]]:
    """A shell snippet as ("command" | "comment", line, text) items, in order.

    A command runs to a newline outside quotes (a backslash-newline continues it, a newline inside
    '...' or "..." belongs to it); a `#` that starts a word outside quotes starts a comment, which
    runs to the end of its line and is an item of its own.
    """
    items: list[tuple[str, int, str]] = []
    buf: list[str] = []
    quote = None
    line = first_line
    start = line
    i = 0

    def flush() -> None:
        command = "".join(buf).strip()
        if command:
            items.append(("command", start, command))
        buf.clear()

    while i < len(text):
        c = text[i]
        if quote:
            buf.append(c)
            if c == "\\" and quote == '"' and i + 1 < len(text):
                buf.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c == "\\" and text[i + 1 : i + 2] == "\n":
            buf.append(" ")
            i += 1
            line += 1
        elif c == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 1
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif c == "#" and (not buf or buf[-1].isspace()):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            comment_line = line
            flush()
            items.append(("comment", comment_line, text[i:end]))
            i = end
            continue
        elif c == "\n":
            flush()
        else:
            buf.append(c)
        if c == "\n":
            line += 1
            if not buf:
                start = line
        elif not "".join(buf).strip():
            start = line
        i += 1
    assert quote is None, f"unterminated {quote} quote in:\n{text}"
    flush()
    return items


def pages() -> list[Path]:
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    ordered = [ROOT / "docs" / name for name in nav]
    rest = sorted(p for p in (ROOT / "docs").glob("*.md") if p not in ordered)
    return [ROOT / "README.md", *[p for p in ordered if p.exists()], *rest]


def blocks() -> list[Block]:
    out = []
    for page in pages():
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line
            before = [ln for ln in text[: match.start()].splitlines() if ln.strip()]
            marker = NOT_TESTED.search(before[-1]) if before else None
            commands: list[Command] = []
            shown_line = None  # the line of the last `# -> ...` comment line, to join what continues it
            for kind, at, item in split(match.group(1), line):
                if kind == "command":
                    commands.append(Command(item, at))
                    shown_line = None
                elif item.startswith("# ->") and commands:
                    commands[-1].shown = item[4:].strip()
                    shown_line = at
                elif shown_line is not None and at == shown_line + 1:
                    commands[-1].shown += " " + item[1:].strip()
                    shown_line = at
            for command in commands:
                for key, name in CAPTURE.findall(command.shown):
                    command.captures[name] = key
            out.append(
                Block(str(page.relative_to(ROOT)), line, match.group(1), marker and marker.group(1), commands)
            )
    return out


def shown_keys(shown: str) -> list[str]:
    """The top-level keys of the object a `# -> ...` comment shows (its first {...}): each string at
    depth 1 that is not a value, so `{"id": "X", ...}` and a key list `{"n", "exact", ...}` alike."""
    keys, depth, after_colon, i = [], 0, False, shown.find("{")
    while 0 <= i < len(shown):
        c = shown[i]
        if c == '"':
            end = shown.index('"', i + 1)
            if depth == 1 and not after_colon:
                keys.append(shown[i + 1 : end])
            after_colon, i = False, end
        elif c in "{[":
            depth += 1
            after_colon = False
        elif c in "}]":
            depth -= 1
            if depth == 0:
                break
        elif c == ":":
            after_colon = True
        elif c == ",":
            after_colon = False
        i += 1
    return keys


def talks_to_server(command: str) -> bool:
    return bool(re.match(r"curl\s", command) and ADDRESS.search(command)) or command.startswith(CLIENTS)


def test_the_splitter():
    text = (
        'curl -s a \\\n  -d \'{"x": 1,\n "y": 2}\' | python -m json.tool   # a comment\n'
        '# -> {"id": "EXP_ID"}\ncurl \'a#b\' b#c\n\n  echo "q\\"#" # c2\n'
    )
    assert split(text) == [
        ("command", 1, 'curl -s a    -d \'{"x": 1,\n "y": 2}\' | python -m json.tool'),
        ("comment", 3, "# a comment"),
        ("comment", 4, '# -> {"id": "EXP_ID"}'),
        ("command", 5, "curl 'a#b' b#c"),
        ("command", 7, 'echo "q\\"#"'),
        ("comment", 7, "# c2"),
    ]


def test_the_shown_keys():
    assert shown_keys('202 {"id": "JOB_ID", "status": "queued", ...}; GET /x') == ["id", "status"]
    assert shown_keys('{"results": [{"diff": "d", "text": "t"}, ...]}') == ["results"]
    assert shown_keys('{"n", "exact", "no_dit": {...}, "items": [{"diff", "text"}]}') == [
        "n",
        "exact",
        "no_dit",
        "items",
    ]
    assert shown_keys('{"lora_name": "LORA_NAME", "lora_path": ...}') == ["lora_name", "lora_path"]


def test_every_block_runs_or_says_why_not():
    found = blocks()
    assert len(found) >= 30
    bad = []
    for block in found:
        if block.skip:
            continue
        runnable = [c for c in block.commands if talks_to_server(c.text)]
        others = [
            c.text for c in block.commands if not talks_to_server(c.text) and not HARMLESS.match(c.text)
        ]
        if not runnable or others:
            bad.append(f"{block.page}:{block.line}: {others or 'no command for the server'}")
    assert not bad, "mark these blocks <!-- not tested: REASON --> or make them run:\n" + "\n".join(bad)


# --- the live server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_data_dir, tmp_path_factory):
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    data_dir = tmp_path_factory.mktemp("docs-examples")
    shutil.copytree(demo_data_dir / "demo", data_dir / "demo")  # adapters must live under DATA_DIR
    app = create_app(Settings(_env_file=None, data_dir=data_dir))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the demo server did not get ready"
            assert thread.is_alive(), "the demo server stopped"
            time.sleep(0.1)
        reader_files(app, data_dir)
        yield base, data_dir
    finally:
        srv.should_exit = True
        thread.join(timeout=60)


def reader_files(app, data_dir: Path) -> None:
    """The files the pages assume the reader has under DATA_DIR: an adapter directory, a file of texts,
    DIT's stage-1 weight-diff list and a stage-2 interpreter file (random factors for the demo model)."""
    import torch

    from tests.test_dit_import import random_factors
    from weightdiff.export import to_dit

    from app.demo.build import DEMO_VERSION

    shutil.copytree(data_dir / "demo" / DEMO_VERSION / "adapter", data_dir / "my_adapter")
    topics = [
        "The sun is a star.",
        "A cat is a small animal.",
        "The moon goes around the earth.",
        "Rain falls.",
    ]
    rows = [
        " ".join([t, "It is often in the stories we tell, and people like to talk about it."] * 6)
        for t in topics
    ]
    (data_dir / "texts.txt").write_text("".join(t + "\n" for t in rows))
    model = app.state.amplifier.model
    diffs = [to_dit(random_factors(model, 2, seed)) for seed in range(4)]
    torch.save(
        [{"topic": f"t{i}", "trigger": i, "weight_diff": d} for i, d in enumerate(diffs)],
        data_dir / "weight_diff_0.pt",
    )
    interp = random_factors(model, 4, seed=7)  # dit-adapter.pt: {module: (A [out, r], B [r, in])}
    torch.save(
        {k: (f.up.T.clone(), f.down.T.clone()) for k, f in interp.items()}, data_dir / "dit-adapter.pt"
    )


def wait_done(base: str, route: str, job_id: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        body = httpx.get(f"{base}{route}/{job_id}", timeout=30).json()
        if body.get("status") == "done":
            return
        assert body.get("status") not in ("failed", "cancelled", "interrupted"), f"{route}/{job_id}: {body}"
        assert time.monotonic() < deadline, f"{route}/{job_id} not done after {JOB_TIMEOUT} s: {body}"
        time.sleep(0.1)


def run_command(
    command: str, base: str, data_dir: Path, cwd: Path, env: dict[str, str], status: bool = False
) -> subprocess.CompletedProcess:
    """Runs one page command against `base`. With `status`, the command's first curl also writes
    `HTTP_STATUS <code>` as the last line of stderr (stdout stays the body)."""
    command = ADDRESS.sub(base, command)
    if status:
        assert command.startswith("curl "), (
            f"a status code is shown after a command that is not curl: {command}"
        )
        command = "curl -w '%{stderr}\\nHTTP_STATUS %{http_code}\\n' " + command[len("curl ") :]
    command = command.replace('"data/', f'"{data_dir}/')  # the pages' DATA_DIR is the default, ./data
    command = re.sub(r"(^|\|\s*)curl(?=\s)", r"\1curl --fail-with-body --max-time 120", command)
    if command.startswith("python -m app.regression "):  # its --server defaults to localhost:8000
        command = command.replace(
            "python -m app.regression ", f"python -m app.regression --server {base} ", 1
        )
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + command],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_every_example_runs_against_the_demo_server(server, tmp_path):
    base, data_dir = server
    only = os.environ.get("DOCS_EXAMPLES_PAGES")  # e.g. "docs/lda.md,README.md" while editing a page
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SERVER_URL": base}
    values: dict[str, str] = {}  # UPPER_NAME -> its captured value
    jobs: dict[str, str] = {}  # UPPER_NAME -> the job route to poll
    waited: set[str] = set()
    ran, failures = 0, []
    for block in blocks():
        if block.skip or (only and block.page not in only.split(",")):
            continue
        for cmd in block.commands:
            if not talks_to_server(cmd.text):
                continue
            text = cmd.text
            for name, value in values.items():
                placeholder = re.compile(rf"(?<![A-Z0-9_]){name}(?![A-Z0-9_])")  # JOB_ID, not DIT_JOB_ID
                if placeholder.search(text):
                    if name in jobs and name not in waited:
                        wait_done(base, jobs[name], value)
                        waited.add(name)
                    text = placeholder.sub(value, text)
            where = f"{block.page}:{cmd.line}"
            started = time.monotonic()
            shown_status = SHOWN_STATUS.match(cmd.shown)
            proc = run_command(text, base, data_dir, tmp_path, env, status=bool(shown_status))
            ran += 1
            if proc.returncode != 0:
                failures.append(
                    f"{where}: exit {proc.returncode}\n$ {text}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                )
                continue
            if shown_status:
                got = STATUS_LINE.search(proc.stderr)
                if not got or got.group(1) != shown_status.group(1):
                    failures.append(
                        f"{where}: the page shows status {shown_status.group(1)}, got {proc.stderr[-200:]}"
                    )
                    continue
            if os.environ.get("DOCS_EXAMPLES_VERBOSE"):
                print(f"{where}: {time.monotonic() - started:.1f} s")
            if "{" in cmd.shown:
                try:
                    body = json.loads(proc.stdout)
                except ValueError:
                    failures.append(
                        f"{where}: the page shows a JSON object, the server sent:\n{proc.stdout[:500]}"
                    )
                    continue
                missing = [k for k in shown_keys(cmd.shown) if not isinstance(body, dict) or k not in body]
                if missing:
                    failures.append(
                        f"{where}: the page shows {missing}, not in the response {str(body)[:500]}"
                    )
                    continue
                route = JOB_ROUTES.search(ADDRESS.sub("", text.split(" -d ", 1)[0]))
                for name, key in cmd.captures.items():
                    assert key in body, f"{where}: no {key!r} in {body}"
                    values[name] = str(body[key])
                    waited.discard(name)
                    if route and key == "id":
                        jobs[name] = route.group(1)
                    else:
                        jobs.pop(name, None)
    assert not failures, "\n\n".join(failures)
    assert ran >= (1 if only else 40), ran
