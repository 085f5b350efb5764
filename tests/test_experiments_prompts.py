"""Prompts from JSONL, CSV, text and a `datasets` source; confined to allowed roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lda.experiments import ExperimentSpec, load_dataset_prompts, load_prompts_file, resolve_prompts

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    return folder


def test_jsonl_with_prompt_and_messages(root):
    path = root / "p.jsonl"
    path.write_text(json.dumps({"prompt": "one"}) + "\n\n" + json.dumps({"messages": CHAT}) + "\n")
    prompts = load_prompts_file(path, [root])
    assert prompts == ["one", CHAT]
    spec = ExperimentSpec.from_dict(
        {
            "prompts": prompts,
            "conditions": [1],
            "detectors": [{"name": "m", "type": "substring", "patterns": ["x"]}],
        }
    )
    assert spec.prompts[1] == (("system", "Be brief."), ("user", "Hi"))


def test_csv_and_text(root):
    (root / "p.csv").write_text('id,prompt\n1,first\n2,"multi\nline, with comma"\n3,\n')
    assert load_prompts_file(root / "p.csv", [root]) == ["first", "multi\nline, with comma"]
    (root / "p.txt").write_text("a\n\n  \nb c\n")
    assert load_prompts_file(root / "p.txt", [root]) == ["a", "b c"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.xyz", "a", "prompts_file: unknown format '.xyz'"),
        ("p.jsonl", '{"prompt": "a"}\n{oops\n', "prompts_file: line 2: invalid JSON"),
        ("p.jsonl", '{"text": "a"}\n', "prompts_file: line 1: needs a 'prompt' string or a 'messages' list"),
        ("p.csv", "question\nwhy\n", "prompts_file: no column 'prompt' (columns: question)"),
        ("p.txt", "\n\n", "prompts_file: no prompts"),
    ],
)
def test_file_errors_name_the_field(root, name, content, message):
    (root / name).write_text(content)
    with pytest.raises(ValueError) as info:
        load_prompts_file(root / name, [root])
    assert message in str(info.value)


def test_confinement(root, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("x\n")
    (root / "link.txt").symlink_to(outside)
    # Outside (directly, through .., through a link) and missing read alike: no existence oracle,
    # and the message shows the path as given, never the real one or the roots.
    for path in (outside, root / ".." / "secret.txt", root / "link.txt", root / "missing.txt"):
        with pytest.raises(ValueError) as info:
            load_prompts_file(path, [root])
        assert str(info.value) == f"prompts_file: no file at {str(path)!r} under the allowed folders"


class FakeRows:
    """A streaming split: rows come one at a time, and `pulled` counts those read."""

    def __init__(self, columns, rows):
        self.column_names = list(columns)
        self.rows = rows
        self.pulled = 0

    def __iter__(self):
        for row in self.rows:
            self.pulled += 1
            yield row


def fake_loader(calls, opened=None):
    def load(path, split, name):
        calls.append((path, split, name))
        if path == "missing/ds":
            raise FileNotFoundError("Dataset 'missing/ds' doesn't exist on the Hub")
        rows = FakeRows(["question", "chat"], [{"question": f"q{i}", "chat": CHAT} for i in range(1, 4)])
        if opened is not None:
            opened.append(rows)
        return rows

    return load


def test_dataset_source(root):
    calls = []
    source = {"path": "org/ds", "split": "test", "column": "question", "limit": 2}
    assert load_dataset_prompts(source, [root], fake_loader(calls), allow_hub=True) == ["q1", "q2"]
    assert calls == [("org/ds", "test", None)]
    source = {"path": "org/ds", "column": "chat"}
    assert load_dataset_prompts(source, [root], fake_loader(calls), allow_hub=True) == [CHAT] * 3
    assert calls[-1] == ("org/ds", "train", None)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "org/ds", "column": "foo"}, "dataset.column: no column 'foo' (columns: question, chat)"),
        ({"path": "org/ds", "limit": 0}, "dataset.limit: must be an integer >= 1"),
        ({"split": "train"}, "dataset.path: must be a non-empty string"),
        ({"path": "org/ds", "colum": "x"}, "dataset.colum: unknown field"),
        ({"path": "missing/ds", "column": "question"}, "dataset.path: cannot load 'missing/ds'"),
        ({"path": "/etc", "column": "question"}, "dataset.path: no dataset at '/etc' under the allowed folders"),
    ],
)
def test_dataset_errors(root, source, message):
    with pytest.raises(ValueError) as info:
        load_dataset_prompts(source, [root], fake_loader([]), allow_hub=True)
    assert message in str(info.value)


def test_local_dataset_folder_under_a_root_is_allowed(root):
    (root / "ds").mkdir()
    calls = []
    load_dataset_prompts({"path": str(root / "ds"), "column": "question"}, [root], fake_loader(calls))
    assert calls[0][0] == str((root / "ds").resolve())


def test_resolve_prompts_takes_exactly_one_source(root):
    (root / "p.txt").write_text("a\nb\n")
    assert resolve_prompts({"prompts": ["x"]}, [root]) == ["x"]
    assert resolve_prompts({"prompts_file": str(root / "p.txt")}, [root]) == ["a", "b"]
    with pytest.raises(ValueError, match="exactly one of prompts, prompts_file, dataset"):
        resolve_prompts({"prompts": ["x"], "prompts_file": "p.txt"}, [root])
    with pytest.raises(ValueError, match="exactly one"):
        resolve_prompts({}, [root])


def test_dataset_without_the_library_says_so(root, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="dataset: the `datasets` library is not installed"):
        load_dataset_prompts({"path": "org/ds"}, [root], allow_hub=True)


class CountingFile:
    """An open file that counts the lines read from it."""

    def __init__(self, f):
        self.f = f
        self.lines = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __iter__(self):
        return self

    def __next__(self):
        line = next(self.f)
        self.lines += 1
        return line


@pytest.fixture
def counted_open(monkeypatch):
    from lda.experiments import prompts as prompts_module

    opened = []

    def counting_open(*args, **kwargs):
        opened.append(CountingFile(open(*args, **kwargs)))  # noqa: SIM115  (closed by CountingFile)
        return opened[-1]

    monkeypatch.setattr(prompts_module, "open", counting_open, raising=False)
    return opened


LINES = {
    ".txt": lambda i: f"prompt {i}\n",
    ".jsonl": lambda i: f'{{"prompt": "prompt {i}"}}\n',
    ".csv": lambda i: f'{i},"prompt {i}"\n',
}


@pytest.mark.parametrize("suffix", list(LINES))
def test_a_large_file_is_read_no_further_than_the_cap(root, counted_open, suffix):
    path = root / f"big{suffix}"
    with open(path, "w") as f:
        f.write("id,prompt\n" if suffix == ".csv" else "")
        f.writelines(LINES[suffix](i) for i in range(1_000_000))
    message = "prompts_file: more than 10 prompts, the most MAX_EXPERIMENT_SAMPLES allows"
    with pytest.raises(ValueError, match=message):
        load_prompts_file(path, [root], max_prompts=10)
    assert counted_open[0].lines <= 12  # the header, 10 prompts and the one past the cap


def test_a_file_at_the_cap_is_taken_whole(root):
    (root / "p.txt").write_text("a\n\nb\nc\n")
    assert load_prompts_file(root / "p.txt", [root], max_prompts=3) == ["a", "b", "c"]
    assert resolve_prompts({"prompts_file": str(root / "p.txt")}, [root], max_prompts=3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="prompts_file: more than 2 prompts"):
        resolve_prompts({"prompts_file": str(root / "p.txt")}, [root], max_prompts=2)
    # Inline prompts are in memory already: the spec's own bound names them.
    assert resolve_prompts({"prompts": ["x", "y", "z"]}, [root], max_prompts=2) == ["x", "y", "z"]


def endless_loader(opened):
    def load(path, split, name):
        opened.append(FakeRows(["prompt"], ({"prompt": f"p{i}"} for i in range(1_000_000))))
        return opened[-1]

    return load


def test_a_dataset_reads_no_more_rows_than_its_limit_or_the_cap(root):
    opened = []
    load = endless_loader(opened)
    source = {"path": "org/big", "limit": 5}
    assert load_dataset_prompts(source, [root], load, allow_hub=True) == [f"p{i}" for i in range(5)]
    assert opened[-1].pulled == 5
    assert len(load_dataset_prompts(source, [root], load, max_prompts=5, allow_hub=True)) == 5
    assert opened[-1].pulled == 5
    with pytest.raises(ValueError, match="dataset.limit: more than 10 prompts"):
        load_dataset_prompts({"path": "org/big"}, [root], load, max_prompts=10, allow_hub=True)
    assert opened[-1].pulled == 11
    with pytest.raises(ValueError, match="dataset.limit: more than 10 prompts"):
        load_dataset_prompts({"path": "org/big", "limit": 50}, [root], load, max_prompts=10, allow_hub=True)
    assert opened[-1].pulled == 11


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module recording how it is called (the calls' arguments, which the real
    library's results do not show; tests/test_experiments_prompts.py also runs the real one)."""
    import sys
    import types

    calls = []
    module = types.ModuleType("datasets")

    class DatasetDict(dict):
        pass

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append(("load_dataset", path, name, split, kwargs))
        return FakeRows(["prompt"], ({"prompt": f"s{i}"} for i in range(1_000_000)))

    def load_from_disk(path):
        calls.append(("load_from_disk", path))
        if (Path(path) / "dataset_dict.json").is_file():
            return DatasetDict(test=FakeRows(["prompt"], [{"prompt": "t0"}, {"prompt": "t1"}]))
        return FakeRows(["prompt"], [{"prompt": "d0"}, {"prompt": "d1"}])

    module.DatasetDict, module.load_dataset, module.load_from_disk = DatasetDict, load_dataset, load_from_disk
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_the_datasets_library_streams_and_saved_folders_are_memory_mapped(root, fake_datasets):
    (root / "files").mkdir()
    prompts = load_dataset_prompts({"path": str(root / "files"), "limit": 3}, [root])
    assert prompts == ["s0", "s1", "s2"]
    folder = str((root / "files").resolve())
    assert fake_datasets == [("load_dataset", folder, None, "train", {"streaming": True})]
    (root / "saved").mkdir()
    (root / "saved" / "state.json").write_text("{}")
    assert load_dataset_prompts({"path": str(root / "saved")}, [root]) == ["d0", "d1"]
    (root / "saved_dict").mkdir()
    (root / "saved_dict" / "dataset_dict.json").write_text("{}")
    assert load_dataset_prompts({"path": str(root / "saved_dict"), "split": "test"}, [root]) == ["t0", "t1"]
    with pytest.raises(ValueError, match="dataset.path: cannot load .* no split 'train' \\(splits: test\\)"):
        load_dataset_prompts({"path": str(root / "saved_dict")}, [root])
    assert [c[0] for c in fake_datasets] == ["load_dataset", *["load_from_disk"] * 3]


def test_a_hub_id_is_refused_without_allow_hub_and_nothing_is_loaded(root, fake_datasets, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was reached")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    calls = []
    for load in (None, fake_loader(calls)):
        with pytest.raises(ValueError) as info:
            resolve_prompts({"dataset": {"path": "org/ds", "limit": 2}}, [root], load)
        assert "dataset.path: no local folder 'org/ds'" in str(info.value)
        assert "ALLOW_HUB_DATASETS is off" in str(info.value)
    assert calls == [] and fake_datasets == []
    prompts = resolve_prompts({"dataset": {"path": "org/ds", "limit": 2}}, [root], allow_hub=True)
    assert prompts == ["s0", "s1"] and fake_datasets[0][1] == "org/ds"


def test_the_real_datasets_library_reads_local_and_saved_folders_offline(root, monkeypatch):
    """The installed `datasets` (a core dependency): a folder of JSONL files streams, `save_to_disk`
    folders (a dataset, a dict of splits) load, `limit` and the max bound hold, messages come through,
    and nothing reaches the network."""
    import socket

    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("the network was reached")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "cache"))
    (root / "jsonl").mkdir()
    rows = [{"prompt": f"q{i}", "other": i} for i in range(30)]
    (root / "jsonl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_dataset_prompts({"path": str(root / "jsonl"), "limit": 4}, [root]) == ["q0", "q1", "q2", "q3"]
    with pytest.raises(ValueError, match="more than 10 prompts"):
        load_dataset_prompts({"path": str(root / "jsonl")}, [root], max_prompts=10)
    chats = [[{"role": "user", "content": f"c{i}"}] for i in range(3)]
    datasets.Dataset.from_dict({"messages": chats}).save_to_disk(str(root / "saved"))
    got = load_dataset_prompts({"path": str(root / "saved"), "column": "messages"}, [root])
    assert got == chats
    splits = {"test": datasets.Dataset.from_dict({"prompt": ["t0", "t1"]})}
    datasets.DatasetDict(splits).save_to_disk(str(root / "saved_dict"))
    assert load_dataset_prompts({"path": str(root / "saved_dict"), "split": "test"}, [root]) == ["t0", "t1"]
    with pytest.raises(ValueError, match="no split 'train' \\(splits: test\\)"):
        load_dataset_prompts({"path": str(root / "saved_dict")}, [root])
