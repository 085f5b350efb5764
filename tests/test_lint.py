"""Shell scripts are shellcheck-clean (the linter's pip-installed binary; a finding fails the suite)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["start.sh", ".ci/run"])
def test_shellcheck(script):
    beside_python = Path(sys.executable).parent / "shellcheck"  # the venv's, even when not on PATH
    binary = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    assert binary, "shellcheck missing: `make test` installs requirements-test.lock"
    proc = subprocess.run([binary, str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
