"""MkDocs hook: the benchmarks page's figures, drawn at build time from the benchmark results
committed under tests/benchmarks/results/ (tests/benchmarks/plots.py), so a figure cannot show
other numbers than the runs the page's tables quote. They are added to the build as generated
files under assets/benchmarks/ (never written into docs/), so --strict checks the page's links
to them."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FOLDER = "assets/benchmarks"
_tmp: tempfile.TemporaryDirectory[str] | None = None


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    global _tmp
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.benchmarks.plots import RESULTS, render

    _tmp = tempfile.TemporaryDirectory(prefix="bench-plots-")
    src = Path(_tmp.name)
    for path in render(RESULTS, src / FOLDER):
        name = f"{FOLDER}/{path.name}"
        files.append(File(name, str(src), config["site_dir"], config["use_directory_urls"]))
    return files
