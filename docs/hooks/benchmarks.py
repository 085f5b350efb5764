"""MkDocs hook: the benchmarks page's figures, drawn at build time from the benchmark results
committed under tests/benchmarks/results/ (tests/benchmarks/plots.py), so a figure cannot show
other numbers than the runs the page's tables quote. They are added to the build as generated
files under assets/benchmarks/ (never written into docs/), so --strict checks the page's links
to them. The page's `<!-- bench-table NAME -->` markers become the tables of the same results
(`tests.benchmarks.plots.TABLES`)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FOLDER = "assets/benchmarks"
TABLE = re.compile(r"<!-- bench-table ([a-z_]+) -->")
_tmp: tempfile.TemporaryDirectory[str] | None = None


def _import_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    global _tmp
    _import_path()
    from tests.benchmarks.plots import RESULTS, render

    _tmp = tempfile.TemporaryDirectory(prefix="bench-plots-")
    src = Path(_tmp.name)
    for path in render(RESULTS, src / FOLDER):
        name = f"{FOLDER}/{path.name}"
        files.append(File(name, str(src), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    _import_path()
    from tests.benchmarks.plots import TABLES, table

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_path}: no benchmark table {name!r} (known: {sorted(TABLES)})")
        return table(name)

    return TABLE.sub(replace, markdown)
