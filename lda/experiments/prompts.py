"""Prompts from a file (JSONL, CSV, text) or a `datasets` source, as JSON-ready values.

Returned prompts are strings or chat message lists, exactly what `ExperimentSpec.from_dict` takes
under `prompts`: the route resolves the source once and stores the prompts themselves in the spec,
so a resumed experiment never re-reads a file or dataset that may have changed meanwhile.

Files and datasets are read as streams and no further than needed: a dataset's `limit` rows, and
`max_prompts` + 1 prompts at most (one past the cap proves the source too large), so a source far
larger than an experiment may take is refused without being read whole. A hub dataset is
loaded only when the caller allows it (`allow_hub`); local folders never touch the network.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lda.paths import Unreachable, reach

JsonPrompt = str | list[dict[str, Any]]
# (path, split, name) -> the split's rows as {column: value}, read lazily as they are iterated
# (a streaming `datasets.IterableDataset`, or a memory-mapped `datasets.Dataset`).
DatasetLoader = Callable[[str, str, str | None], Iterable[Mapping[str, Any]]]

FORMATS = (".jsonl", ".csv", ".txt")
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write: such folders need `load_from_disk`.
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def load_prompts_file(
    path: str | Path, roots: Sequence[Path], where: str = "prompts_file", max_prompts: int | None = None
) -> list[JsonPrompt]:
    """Prompts from a file under one of `roots`; the format follows the suffix.

    .jsonl: one object per line with `prompt` (a string) or `messages` (chat messages);
    .csv: a `prompt` column; .txt: one prompt per line. Blank lines are skipped. The file is read
    line by line and no further than `max_prompts` + 1 prompts: more than `max_prompts` is an error.
    """
    real = _confined(path, roots, where)
    suffix = real.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{where}: unknown format {suffix or real.name!r} (use {', '.join(FORMATS)})")
    try:
        # newline="" lets the csv module see quoted line breaks inside a prompt as they are.
        with open(real, encoding="utf-8", newline="" if suffix == ".csv" else None) as f:
            prompts = _at_most(_parse(f, suffix, where), max_prompts, where)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read {str(path)!r}: {exc}") from None
    if not prompts:
        raise ValueError(f"{where}: no prompts in {str(path)!r}")
    return prompts


def load_dataset_prompts(
    source: Mapping[str, Any],
    roots: Sequence[Path],
    load: DatasetLoader | None = None,
    where: str = "dataset",
    max_prompts: int | None = None,
    allow_hub: bool = False,
) -> list[JsonPrompt]:
    """Prompts from `{path, split="train", column="prompt", limit=None, name=None}`.

    `path` is a local dataset folder under `roots` (data files, or a `save_to_disk` folder), or a
    hub id, which is refused unless `allow_hub`. The column holds strings (prompts) or chat message
    lists. Rows stream: at most `limit` are read, and at most `max_prompts` + 1 (more than
    `max_prompts` is an error). `load` defaults to the `datasets` library (streaming).
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
        path = str(_confined(Path(path).expanduser(), roots, f"{where}.path", "dataset"))
    elif not allow_hub:
        raise ValueError(
            f"{where}.path: no local folder {path!r}, and this server loads no hub datasets "
            "(ALLOW_HUB_DATASETS is off): give a dataset folder under DATA_DIR or CONFIG_ROOTS"
        )
    rows = _load(load, path, split, name, where)
    try:
        values = _at_most(_column(rows, column, limit, where), max_prompts, f"{where}.limit")
    except ValueError:
        raise  # ours, naming the field
    except Exception as exc:  # the library failing mid-stream (a bad shard, a lost connection)
        raise ValueError(f"{where}.path: cannot read {path!r} split {split!r}: {exc}") from None
    if not values:
        raise ValueError(f"{where}: split {split!r} of {path!r} is empty")
    return values


def resolve_prompts(
    body: Mapping[str, Any],
    roots: Sequence[Path],
    load: DatasetLoader | None = None,
    max_prompts: int | None = None,
    allow_hub: bool = False,
) -> list[JsonPrompt]:
    """The prompts of a request with exactly one of `prompts`, `prompts_file`, `dataset`.

    `max_prompts` bounds what a file or dataset may hold (read no further than one past it);
    inline prompts are already in memory and left to the spec's own sample bound. `allow_hub`:
    whether `dataset.path` may be a hub id.
    """
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
        return load_prompts_file(body["prompts_file"], roots, max_prompts=max_prompts)
    if not isinstance(body["dataset"], Mapping):
        raise ValueError(
            f"dataset: must be an object {{path, split, column, limit}}, got {body['dataset']!r}"
        )
    return load_dataset_prompts(body["dataset"], roots, load, max_prompts=max_prompts, allow_hub=allow_hub)


def _confined(path: str | Path, roots: Sequence[Path], where: str, what: str = "file") -> Path:
    # One message for missing, outside and unresolvable alike, naming the path as given: a caller
    # learns neither the real path nor the roots, nor whether a file exists outside them.
    try:
        return reach(path, roots, what)
    except Unreachable as exc:
        raise ValueError(f"{where}: {exc}") from None


def _at_most(prompts: Iterable[JsonPrompt], max_prompts: int | None, where: str) -> list[JsonPrompt]:
    """The prompts, pulled one at a time; one more than `max_prompts` stops the reading with an error."""
    taken = list(itertools.islice(prompts, None if max_prompts is None else max_prompts + 1))
    if max_prompts is not None and len(taken) > max_prompts:
        raise ValueError(
            f"{where}: more than {max_prompts} prompts, the most MAX_EXPERIMENT_SAMPLES allows "
            "at these conditions and n"
        )
    return taken


def _parse(f: IO[str], suffix: str, where: str) -> Iterator[JsonPrompt]:
    if suffix == ".jsonl":
        return _from_jsonl(f, where)
    if suffix == ".csv":
        return _from_csv(f, where)
    return (line.rstrip("\n") for line in f if line.strip())


def _from_jsonl(lines: Iterable[str], where: str) -> Iterator[JsonPrompt]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: line {number}: invalid JSON ({exc.msg})") from None
        if isinstance(item, Mapping) and isinstance(item.get("prompt"), str):
            yield item["prompt"]
        elif isinstance(item, Mapping) and isinstance(item.get("messages"), list):
            yield item["messages"]
        else:
            raise ValueError(f"{where}: line {number}: needs a 'prompt' string or a 'messages' list")


def _from_csv(f: IO[str], where: str) -> Iterator[JsonPrompt]:
    reader = csv.DictReader(f)  # keeps quoted multi-line prompts whole
    columns = reader.fieldnames or []
    if "prompt" not in columns:
        raise ValueError(f"{where}: no column 'prompt' (columns: {', '.join(columns) or 'none'})")
    return (row["prompt"] for row in reader if (row["prompt"] or "").strip())


def _column(
    rows: Iterable[Mapping[str, Any]], column: str, take: int | None, where: str
) -> Iterator[JsonPrompt]:
    """The `column` of the first `take` rows (all with None), checked as they stream by."""
    names = getattr(rows, "column_names", None)  # known up front for most datasets; else per row
    if isinstance(names, list) and column not in names:
        raise ValueError(f"{where}.column: no column {column!r} (columns: {', '.join(names)})")
    for i, row in enumerate(itertools.islice(rows, take)):
        if column not in row:
            raise ValueError(f"{where}.column: no column {column!r} (columns: {', '.join(row)})")
        value = row[column]
        if not isinstance(value, str | list):
            raise ValueError(f"{where}.column: row {i} is {type(value).__name__}, not a prompt or messages")
        yield value


def _load(load: DatasetLoader | None, path: str, split: str, name: str | None, where: str) -> Any:
    if load is None:
        try:
            import datasets  # noqa: F401  (only to say so here when it is missing)
        except ImportError:
            raise ValueError(
                f"{where}: the `datasets` library is not installed on this server; "
                "use prompts or prompts_file"
            ) from None
        load = _stream_rows
    try:
        return load(path, split, name)
    except Exception as exc:  # the library's own errors (not found, offline, bad split) name the cause
        raise ValueError(f"{where}.path: cannot load {path!r} split {split!r}: {exc}") from None


def _stream_rows(path: str, split: str, name: str | None) -> Iterable[Mapping[str, Any]]:
    """The split's rows through `datasets`, read as they are iterated, never the whole split.

    A `save_to_disk` folder is memory-mapped (`load_from_disk`; a saved single dataset is its only
    split); anything else streams (`streaming=True`), which for a local folder reads its data
    files and nothing over the network.
    """
    import datasets

    if any((Path(path) / marker).is_file() for marker in SAVED_MARKERS):
        saved = datasets.load_from_disk(path)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"no split {split!r} (splits: {', '.join(saved)})")
            return saved[split]
        return saved
    return datasets.load_dataset(path, name, split=split, streaming=True)
