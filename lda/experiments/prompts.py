"""Prompts from a file (JSONL, CSV, text) or a `datasets` source, as JSON-ready values.

Returned prompts are strings or chat message lists, exactly what `ExperimentSpec.from_dict` takes
under `prompts`: the route resolves the source once and stores the prompts themselves in the spec,
so a resumed experiment never re-reads a file or dataset that may have changed meanwhile.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from amplification.paths import OutsideRoots, confined

JsonPrompt = str | list[dict[str, Any]]
# (path, split, name) -> a table with `column_names` and `table[column] -> list` (datasets.Dataset).
DatasetLoader = Callable[[str, str, str | None], Any]

FORMATS = (".jsonl", ".csv", ".txt")


def load_prompts_file(
    path: str | Path, roots: Sequence[Path], where: str = "prompts_file"
) -> list[JsonPrompt]:
    """Prompts from a file under one of `roots`; the format follows the suffix.

    .jsonl: one object per line with `prompt` (a string) or `messages` (chat messages);
    .csv: a `prompt` column; .txt: one prompt per line. Blank lines are skipped.
    """
    real = _confined(path, roots, where)
    suffix = real.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{where}: unknown format {suffix or real.name!r} (use {', '.join(FORMATS)})")
    try:
        text = real.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read {str(path)!r}: {exc}") from None
    if suffix == ".jsonl":
        prompts = _from_jsonl(text, where)
    elif suffix == ".csv":
        prompts = _from_csv(text, where)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{where}: no prompts in {str(path)!r}")
    return prompts


def load_dataset_prompts(
    source: Mapping[str, Any],
    roots: Sequence[Path],
    load: DatasetLoader | None = None,
    where: str = "dataset",
) -> list[JsonPrompt]:
    """Prompts from `{path, split="train", column="prompt", limit=None, name=None}`.

    `path` is a hub id or a local dataset folder; a local one must lie under `roots`. The column
    holds strings (prompts) or chat message lists. `load` defaults to `datasets.load_dataset`.
    """
    unknown = sorted(set(source) - {"path", "split", "column", "limit", "name"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field")
    path, split = source.get("path"), source.get("split", "train")
    column, limit, name = source.get("column", "prompt"), source.get("limit"), source.get("name")
    for key, value in (("path", path), ("split", split), ("column", column)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where}.limit: must be an integer >= 1, got {limit!r}")
    if path.startswith((".", "/", "~")) or Path(path).exists():
        path = str(_confined(Path(path).expanduser(), roots, f"{where}.path"))
    table = _load(load, path, split, name, where)
    if column not in table.column_names:
        raise ValueError(f"{where}.column: no column {column!r} (columns: {', '.join(table.column_names)})")
    values = list(table[column][:limit] if limit else table[column])
    for i, value in enumerate(values):
        if not isinstance(value, str | list):
            raise ValueError(f"{where}.column: row {i} is {type(value).__name__}, not a prompt or messages")
    if not values:
        raise ValueError(f"{where}: split {split!r} of {path!r} is empty")
    return values


def resolve_prompts(
    body: Mapping[str, Any], roots: Sequence[Path], load: DatasetLoader | None = None
) -> list[JsonPrompt]:
    """The prompts of a request with exactly one of `prompts`, `prompts_file`, `dataset`."""
    given = [key for key in ("prompts", "prompts_file", "dataset") if body.get(key) is not None]
    if len(given) != 1:
        raise ValueError(
            f"prompts: give exactly one of prompts, prompts_file, dataset (got {given or 'none'})"
        )
    if given[0] == "prompts":
        return list(body["prompts"])
    if given[0] == "prompts_file":
        if not isinstance(body["prompts_file"], str):
            raise ValueError(f"prompts_file: must be a path string, got {body['prompts_file']!r}")
        return load_prompts_file(body["prompts_file"], roots)
    if not isinstance(body["dataset"], Mapping):
        raise ValueError(
            f"dataset: must be an object {{path, split, column, limit}}, got {body['dataset']!r}"
        )
    return load_dataset_prompts(body["dataset"], roots, load)


def _confined(path: str | Path, roots: Sequence[Path], where: str) -> Path:
    try:
        return confined(path, roots)
    except OutsideRoots:
        raise ValueError(f"{where}: {str(path)!r} is outside the allowed folders") from None
    except FileNotFoundError:
        raise ValueError(f"{where}: no file at {str(path)!r}") from None
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{where}: cannot resolve {str(path)!r}: {exc}") from None


def _from_jsonl(text: str, where: str) -> list[JsonPrompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: line {number}: invalid JSON ({exc.msg})") from None
        if isinstance(item, Mapping) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, Mapping) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise ValueError(f"{where}: line {number}: needs a 'prompt' string or a 'messages' list")
    return prompts


def _from_csv(text: str, where: str) -> list[JsonPrompt]:
    reader = csv.DictReader(io.StringIO(text))  # keeps quoted multi-line prompts whole
    columns = reader.fieldnames or []
    if "prompt" not in columns:
        raise ValueError(f"{where}: no column 'prompt' (columns: {', '.join(columns) or 'none'})")
    return [row["prompt"] for row in reader if (row["prompt"] or "").strip()]


def _load(load: DatasetLoader | None, path: str, split: str, name: str | None, where: str) -> Any:
    if load is None:
        try:
            import datasets
        except ImportError:
            raise ValueError(
                f"{where}: the `datasets` library is not installed on this server; "
                "use prompts or prompts_file"
            ) from None

        def load(path: str, split: str, name: str | None) -> Any:
            return datasets.load_dataset(path, name, split=split)

    try:
        return load(path, split, name)
    except Exception as exc:  # the library's own errors (not found, offline, bad split) name the cause
        raise ValueError(f"{where}.path: cannot load {path!r} split {split!r}: {exc}") from None
