"""Prompts from JSONL, CSV, text and a `datasets` source; confined to allowed roots."""

from __future__ import annotations

import json

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
    with pytest.raises(ValueError, match="prompts_file: .* is outside the allowed folders"):
        load_prompts_file(outside, [root])
    with pytest.raises(ValueError, match="outside the allowed folders"):
        load_prompts_file(root / ".." / "secret.txt", [root])
    (root / "link.txt").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the allowed folders"):
        load_prompts_file(root / "link.txt", [root])
    with pytest.raises(ValueError, match="prompts_file: no file at"):
        load_prompts_file(root / "missing.txt", [root])


class FakeTable:
    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]


def fake_loader(calls):
    def load(path, split, name):
        calls.append((path, split, name))
        if path == "missing/ds":
            raise FileNotFoundError("Dataset 'missing/ds' doesn't exist on the Hub")
        return FakeTable({"question": ["q1", "q2", "q3"], "chat": [CHAT, CHAT, CHAT]})

    return load


def test_dataset_source(root):
    calls = []
    source = {"path": "org/ds", "split": "test", "column": "question", "limit": 2}
    assert load_dataset_prompts(source, [root], fake_loader(calls)) == ["q1", "q2"]
    assert calls == [("org/ds", "test", None)]
    assert (
        load_dataset_prompts({"path": "org/ds", "column": "chat"}, [root], fake_loader(calls)) == [CHAT] * 3
    )
    assert calls[-1] == ("org/ds", "train", None)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "org/ds", "column": "foo"}, "dataset.column: no column 'foo' (columns: question, chat)"),
        ({"path": "org/ds", "limit": 0}, "dataset.limit: must be an integer >= 1"),
        ({"split": "train"}, "dataset.path: must be a non-empty string"),
        ({"path": "org/ds", "colum": "x"}, "dataset.colum: unknown field"),
        ({"path": "missing/ds", "column": "question"}, "dataset.path: cannot load 'missing/ds'"),
        ({"path": "/etc", "column": "question"}, "dataset.path: '/etc' is outside the allowed folders"),
    ],
)
def test_dataset_errors(root, source, message):
    with pytest.raises(ValueError) as info:
        load_dataset_prompts(source, [root], fake_loader([]))
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
        load_dataset_prompts({"path": "org/ds"}, [root])
