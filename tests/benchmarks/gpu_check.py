"""`make gpu-check`: the CUDA tests and the three benchmarks on a ~1B pair, as one JSON report.

    python -m tests.benchmarks.gpu_check [--out gpu_check.json] [--budget 450] [--size auto|tiny|1b]
    python -m tests.benchmarks.gpu_check --download-wheels .whl   # `make gpu-wheels`
    python -m tests.benchmarks.gpu_check --pick-wheels .whl       # used by deploy/gpu_check.sh

`deploy/gpu_check.sh` (`make gpu-check`) picks the Python, then runs this. With CUDA (`--size 1b`):
the `gpu`-marked tests of tests/test_gpu.py, then `bench_lda` (1, 8 and 64 rows against `generate`),
`bench_amplification` (apply+restore against PEFT merge+unmerge and a reload; adapter-mode against
two-model LDA), `bench_weightdiff` (T = 8 and 16 against one-at-a-time PEFT), `bench_repro`
(token agreement of rows batched vs alone) and `bench_dit` (an interpreter step against a stage-1
step; describe of 64 diffs against one) on a ~0.95B random Llama pair in bf16, built on the
device. Without CUDA (`--size tiny`): the same benchmarks on tiny
CPU models, so CI keeps this script working; the GPU tests are skipped, and `skipped` says so.

Each section runs in its own process group under its own time limit, clipped to what is left of
`--budget`; one that fails or runs out of time is recorded with its error and the next one runs.
The report is rewritten after every section (a killed run keeps the finished ones), logs go beside
it (`gpu_check_<section>.log`), and it is printed at the end. Exit status: 0 when every section
passed or was skipped, 3 when one did not, 4 when SIGTERM ended the run (the report was printed in
all three cases).

This module imports only the standard library at the top: `--pick-wheels` runs before the wheels
it picks are installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"

# requirements.lock minus what the borrowed GPU image's `python3` already holds (its package list:
# torch with CUDA, transformers, accelerate, peft, safetensors, tokenizers, numpy, httpx, jinja2,
# pyyaml, prometheus-client, pytest, anyio, click, h11, idna, annotated-doc, ...). Left out on
# purpose: httpx2, httpcore2 and truststore, which only huggingface_hub 2.x needs (the image brings
# its own hub).
GPU_IMAGE_LACKS = (
    "annotated-types",
    "fastapi",
    "opentelemetry-api",  # fastapi imports it
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "starlette",
    "typing-inspection",
    "uvicorn",
)
# Present in the image, but maybe older than these wheels need (pydantic-core and anyio want
# typing-extensions >= 4.16): installed only where the image's copy is older.
GPU_IMAGE_FLOORS = ("anyio", "typing-extensions")
# Never shadowed from a wheel folder: the image's CUDA stack stays as it is.
NEVER_REPLACE = re.compile(r"^(torch|torchvision|torchaudio|triton|numpy|nvidia-.*|cuda-.*)$")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[normalize(name)] = version.strip()
    return pins


def version_key(version: str) -> tuple[int, ...]:
    """Numeric release parts (`2.14.3` -> (2, 14, 3)); enough to tell older from newer pins."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4])


def download_wheels(folder: Path) -> int:
    """`make gpu-wheels`: the locked versions of the packages the GPU image lacks, cp312 manylinux."""
    pins = locked_versions()
    names = [*GPU_IMAGE_LACKS, *GPU_IMAGE_FLOORS]
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"not pinned in {LOCK.name}: {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in folder.glob("*.whl"):  # one version of each: two would stop the install
        name, version = wheel.name.split("-")[:2]
        if normalize(name) in names and version != pins[normalize(name)]:
            wheel.unlink()
    python_version = os.environ.get("GPU_WHEELS_PYTHON", "3.12")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(folder)]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(cmd + [f"{n}=={pins[n]}" for n in names], check=True)
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels in {folder}, {size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def pick_wheels(folder: Path) -> list[Path]:
    """The wheels in `folder` this interpreter needs: a package it lacks, or holds in an older version.

    One wheel per package (the locked version when there are several); never torch or its CUDA stack.
    """
    pins = locked_versions() if LOCK.exists() else {}
    by_name: dict[str, list[tuple[str, Path]]] = {}
    for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        name, version = wheel.name.split("-")[:2]
        by_name.setdefault(normalize(name), []).append((version, wheel))
    picked = []
    for name, versions in sorted(by_name.items()):
        if NEVER_REPLACE.match(name):
            continue
        locked = [v for v in versions if v[0] == pins.get(name)]
        version, wheel = locked[0] if locked else max(versions, key=lambda v: version_key(v[0]))
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            picked.append(wheel)
            continue
        if version_key(have) < version_key(version):
            picked.append(wheel)
    return picked


# --- the check ----------------------------------------------------------------------------------

# Each benchmark's arguments and time limit (seconds) on a GPU, and in the tiny CPU mode.
GPU_SECTIONS: dict[str, tuple[str, int]] = {
    # eager and compiled (static cache, CUDA graphs) LDA against the seed loop and the bandwidth limit
    "bench_lda": ("--size 1b --device cuda --dtype bf16 --tokens 64 --rows 1 8 64 --repeats 2", 240),
    # token agreement of rows batched vs alone in bf16 (what a GPU's kernels change with batch shape)
    "bench_repro": ("--size 1b --device cuda --dtype bf16 --prompts 24 --tokens 32", 150),
    "bench_amplification": (
        "--size 1b --device cuda --dtype bf16 --tokens 32 --rows 8 --repeats 3 --no-rss",
        130,
    ),
    "bench_weightdiff": (
        "--size 1b --device cuda --dtype bf16 --tasks 8 16 --steps 5 --seq-len 64 --repeats 1",
        100,
    ),
    # DIT's interpreter step over a stage-1 step (goal <= 1.3), describe of 64 diffs over 1 (<= 3)
    "bench_dit": ("--size 1b --device cuda --dtype bf16 --tasks 8 --describe 64 --steps 3 --repeats 2", 90),
    # a logit-diff mining pass over two plain forwards (goal <= 1.2), an ADL pass, RSS as samples grow
    "bench_diffing": ("--size 1b --device cuda --dtype bf16 --samples 256 --n 64 --batch 16 --grow 4 --repeats 2", 90),
}
TINY_SECTIONS: dict[str, tuple[str, int]] = {
    "bench_lda": ("--size tiny --device cpu --tokens 8 --rows 1 4 --repeats 1", 180),
    "bench_amplification": (
        "--size tiny --device cpu --tokens 8 --rows 2 --repeats 1 --no-rss --threads 1",
        120,
    ),
    "bench_weightdiff": (
        "--size tiny --device cpu --tasks 2 4 --steps 2 --seq-len 16 --repeats 1 --threads 1 --no-memory",
        120,
    ),
    # fp32 on a CPU: every row must agree (the suite's exact claim), so the tiny run checks the script
    "bench_repro": ("--size tiny --device cpu --dtype fp32 --prompts 6 --tokens 6", 120),
    "bench_dit": ("--size tiny --device cpu --tasks 2 --describe 4 --steps 1 --repeats 1 --threads 1", 120),
    "bench_diffing": (
        "--size tiny --device cpu --samples 16 --n 16 --batch 8 --top-k 10 --grow 2 --repeats 1 --threads 1",
        120,
    ),
}
GPU_TESTS_LIMIT = 150
REQUIRED_SECTIONS = ("environment", "gpu_tests", *GPU_SECTIONS)
# Report these versions beside the pins: the GPU image brings its own.
REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "tokenizers",
    "safetensors",
    "numpy",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-settings",
    "uvicorn",
    "httpx",
    "pytest",
)


def child_env(cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore::FutureWarning",
    )
    if cpu:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # spin-waiting OpenMP threads crawl on shared cores
    return env


class Terminated(Exception):
    """SIGTERM (the whole run's `timeout`): stop the section running now, still print the report."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def run_section(cmd: list[str], limit: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `cmd` in its own process group; kill the group at `limit` seconds or on any interruption.

    A process group, not a session: a machine that ends a command's processes when it returns
    still ends these.
    """
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=out, text=True, process_group=0
        )
        try:
            stdout, _ = proc.communicate(timeout=max(limit, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            timed_out = True
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        out.write("\n--- stdout ---\n" + stdout)
    seconds = round(time.monotonic() - started, 1)
    report: dict[str, Any] = {"seconds": seconds, "returncode": proc.returncode, "stdout": stdout}
    if timed_out:
        report.update(status="timeout", error=f"killed after its {limit:.0f} s limit")
    elif proc.returncode != 0:
        report.update(status="error", error=tail(log))
    else:
        report["status"] = "ok"
    return report


def tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace")
    return text[-chars:]


def last_json(text: str) -> Any:
    """The last JSON object in `text` that starts at the beginning of a line."""
    for match in reversed(list(re.finditer(r"^\{", text, re.M))):
        try:
            return json.JSONDecoder().raw_decode(text, match.start())[0]
        except ValueError:
            continue
    return None


def bench_section(
    name: str, argv: list[str], limit: float, env: dict[str, str], logs: Path
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", f"tests.benchmarks.{name}", *argv]
    report = run_section(cmd, limit, env, logs / f"gpu_check_{name}.log")
    result = last_json(report.pop("stdout"))
    if report["status"] == "ok" and result is None:
        report.update(status="error", error="no JSON on stdout")
    report["command"] = " ".join(["python", "-m", f"tests.benchmarks.{name}", *argv])
    if result is not None:
        report["result"] = result
    return report


def junit_results(path: Path) -> dict[str, Any]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    tests: dict[str, Any] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        entry: dict[str, Any] = {"outcome": "passed", "seconds": round(float(case.get("time", 0)), 2)}
        for child in case:
            if child.tag in ("failure", "error"):
                entry.update(outcome="failed", message=(child.get("message") or "")[:800])
            elif child.tag == "skipped":
                entry.update(outcome="skipped", message=child.get("message") or "")
            elif child.tag == "properties":
                entry["properties"] = {p.get("name"): p.get("value") for p in child}
        counts[entry["outcome"]] += 1
        tests[case.get("name", "?")] = entry
    return {**counts, "tests": tests}


def gpu_tests_section(limit: float, env: dict[str, str], logs: Path) -> dict[str, Any]:
    junit = logs / "gpu_check_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    report = run_section(cmd, limit, env, logs / "gpu_check_gpu_tests.log")
    report.pop("stdout")
    if junit.exists():
        report |= junit_results(junit)
        if report["status"] == "error" and report["failed"]:
            report["status"] = "failed"  # pytest's exit 1: some test failed, named under `tests`
    report["command"] = "python -m pytest -m gpu tests/test_gpu.py"
    return report


def environment(cuda_probe: bool) -> dict[str, Any]:
    import platform

    import torch

    pins = locked_versions()
    packages = {}
    for name in REPORTED_PACKAGES:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        packages[name] = {"installed": have, "locked": pins.get(normalize(name))}
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "python_source": os.environ.get("GPU_CHECK_PYTHON_SOURCE", "this interpreter (run directly)"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": packages,
    }
    if cuda_probe and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_bytes": props.total_memory,
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "matmul_bf16_tflops": bf16_matmul_tflops(torch),
        }
    return env


def bf16_matmul_tflops(torch: Any, n: int = 8192, repeats: int = 10) -> float:
    """A quick sanity figure for the device: bf16 n x n x n products, mean of `repeats` after warm-up."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n**3 / seconds / 1e12, 1)


def headline(sections: dict[str, Any]) -> dict[str, Any]:
    """Every ratio (`*_over_*`) and exactness flag of the benchmarks, flat, for a quick read."""
    out = {}
    for name, section in sections.items():
        result = section.get("result") or {}
        for key, value in result.items():
            if "_over_" in key or key.endswith(("_exact", "_same_tokens")):
                out[f"{name}.{key}"] = value
    return out


class Report:
    def __init__(self, path: Path, mode: str, size: str) -> None:
        self.path = path
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "gpu_check": 1,
            "mode": mode,
            "size": size,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": False,
            "ok": None,
            "skipped": [],
            "sections": {},
        }

    def section(self, name: str, value: dict[str, Any]) -> None:
        self.data["sections"][name] = value
        status = value.get("status", "?")
        print(f"gpu-check: {name}: {status} ({value.get('seconds', 0)} s)", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def check(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.budget
    out = Path(args.out).resolve()
    logs = out.parent
    report = Report(out, "pending", args.size)
    started = time.monotonic()
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - a broken torch is a finding, not a crash
        report.section("environment", {"status": "error", "error": repr(exc)})
        cuda = False
    size = args.size if args.size != "auto" else ("1b" if cuda else "tiny")
    mode = "gpu" if cuda else "cpu"
    report.data.update(mode=mode, size=size)
    if not cuda:
        report.data["skipped"].append("gpu tests: skipped, no CUDA (torch.cuda.is_available() is false)")
    if size == "tiny":
        why = "--size tiny" if cuda else "no CUDA"
        report.data["skipped"].append(f"~1B benchmarks: run on tiny CPU models instead ({why})")
    if "environment" not in report.data["sections"]:
        try:
            env = environment(cuda_probe=cuda) | {"status": "ok"}
        except Exception as exc:  # noqa: BLE001
            env = {"status": "error", "error": repr(exc)}
        env["seconds"] = round(time.monotonic() - started, 1)
        report.section("environment", env)

    def left() -> float:
        return deadline - time.monotonic()

    sections = TINY_SECTIONS if size == "tiny" else GPU_SECTIONS
    names = list(sections)
    terminated = False
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if cuda:
            limit = min(GPU_TESTS_LIMIT, left())
            report.section("gpu_tests", gpu_tests_section(limit, child_env(False), logs))
        else:
            report.section("gpu_tests", {"status": "skipped", "reason": "no CUDA", "seconds": 0.0})
        for i, name in enumerate(names):
            argv, limit = sections[name]
            # Leave the sections still to come a minute each, but take at least a fair share.
            later = len(names) - i - 1
            allowed = min(limit, max(left() - 60.0 * later, left() / (later + 1)))
            if allowed < 5:
                report.section(name, {"status": "timeout", "error": "no time left in the budget"})
                continue
            report.section(name, bench_section(name, argv.split(), allowed, child_env(not cuda), logs))
    except Terminated:
        terminated = True
        for name in ("gpu_tests", *names):
            report.data["sections"].setdefault(
                name, {"status": "timeout", "error": "the whole run's time limit ended it (SIGTERM)"}
            )
    failed = [n for n, s in report.data["sections"].items() if s.get("status") not in ("ok", "skipped")]
    report.data.update(
        complete=not terminated,
        ok=not failed,
        failed_sections=failed,
        headline=headline(report.data["sections"]),
    )
    report.save()
    print(out.read_text(), end="", flush=True)
    return 4 if terminated else 3 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default_out = (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    )
    ap.add_argument("--out", default=str(default_out), help="the report file (logs go beside it)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    ap.add_argument(
        "--size", choices=["auto", "tiny", "1b"], default="auto", help="auto: 1b with CUDA, else tiny"
    )
    ap.add_argument("--download-wheels", type=Path, metavar="DIR")
    ap.add_argument("--pick-wheels", type=Path, metavar="DIR")
    args = ap.parse_args()
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if args.pick_wheels:
        for wheel in pick_wheels(args.pick_wheels):
            print(wheel)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
