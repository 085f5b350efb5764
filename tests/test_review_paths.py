"""Path errors never show real paths or the allowed roots, and never tell "outside" from "missing"
(issue 25, the path part of item 8).

Adapter and config-path errors used to show the resolved path and the list of roots, and answered
differently for a path outside the roots ("outside the allowed roots") and a path where nothing
exists ("not found"): a file-existence oracle for the whole disk. Both are now the one message
"no adapter at 'x' under the allowed folders" (or "no config at ..."), with the path as given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from amplification import AdapterError, AdapterRegistry
from lda.paths import Unreachable, reach
from tests.test_amplification_api import config
from tests.test_amplification_merge import fresh_base, make_adapter
from tests.test_api import make_settings, wait_ready

from app.main import create_app


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory, tokenizer):
    data = tmp_path_factory.mktemp("paths")
    outside = tmp_path_factory.mktemp("secret")
    make_adapter(tokenizer, outside / "evil", seed=5)  # a real adapter: only its place is wrong
    (outside / "cfg.yaml").write_text(json.dumps(config()))
    (data / "empty").mkdir()
    (data / "link").symlink_to(outside / "evil", target_is_directory=True)
    with TestClient(create_app(make_settings(tiny_dirs, data))) as c:
        wait_ready(c)
        yield c, data, outside


def pairs(data: Path, outside: Path) -> list[tuple[str, str]]:
    """(outside the roots but existing, missing) path pairs of each spelling."""
    return [
        (str(outside / "evil"), str(outside / "nothing")),
        (str(data / "link"), str(data / "nolink")),
        (f"{data}/../{outside.name}/evil", f"{data}/../{outside.name}/nothing"),
        ("/etc", "/nonexistent-dir"),
    ]


def test_reach_answers_one_error_for_missing_outside_and_unresolvable(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    for path in (tmp_path, tmp_path / "missing", root / "loop", "bad\0name", root / ("x" * 300)):
        with pytest.raises(Unreachable) as info:
            reach(path, [root], "config", given="as-given")
        assert str(info.value) == "no config at 'as-given' under the allowed folders"


def test_registry_says_the_same_for_outside_and_missing(setup, tokenizer):
    _, data, outside = setup
    registry = AdapterRegistry([data], hub_enabled=False)
    for there, missing in pairs(data, outside):
        answers = []
        for source in (there, missing):
            with pytest.raises(AdapterError) as info:
                registry.load("x", source, fresh_base(tokenizer))
            answers.append(str(info.value).replace(repr(source), "PATH"))
        assert answers[0] == answers[1] == "no adapter at PATH under the allowed folders"


def test_adapter_contents_errors_name_the_source_as_given(setup, tokenizer):
    _, data, _ = setup
    with pytest.raises(AdapterError) as info:
        AdapterRegistry([data], hub_enabled=False).load("x", "empty", fresh_base(tokenizer))
    assert str(info.value) == "'empty' has no adapter_config.json: not a PEFT adapter directory"


@pytest.mark.parametrize("route", ["/adapters", "/v1/load_lora_adapter"])
def test_adapter_routes_say_the_same_for_outside_and_missing(setup, route):
    client, data, outside = setup
    for there, missing in pairs(data, outside):
        answers = []
        for source in (there, missing):
            body = {"name": "x", "source": source} if route == "/adapters" else {"lora_name": "x", "lora_path": source}
            r = client.post(route, json=body)
            assert r.status_code in (400, 422), r.text
            answers.append(r.json()["error"]["message"].replace(repr(source), "PATH"))
        assert answers[0] == answers[1] == "no adapter at PATH under the allowed folders"


@pytest.mark.parametrize("route", ["/amplification/compile", "/v1/compile_and_load_amplification"])
def test_config_paths_say_the_same_for_outside_and_missing(setup, route):
    client, data, outside = setup
    (data / "cfglink.yaml").symlink_to(outside / "cfg.yaml")
    try:
        for there, missing in [
            (str(outside / "cfg.yaml"), str(outside / "none.yaml")),
            (str(data / "cfglink.yaml"), str(data / "nolink.yaml")),
            ("/etc/passwd", "/etc/no-such-file"),
        ]:
            answers = []
            for path in (there, missing):
                r = client.post(route, json={"config_path": path})
                assert r.status_code == 422, r.text
                answers.append(r.json()["error"]["message"].replace(repr(path), "PATH"))
            assert answers[0] == answers[1] == "config_path: no config at PATH under the allowed folders"
    finally:
        (data / "cfglink.yaml").unlink()


def test_a_config_naming_an_adapter_by_path_says_the_same(setup):
    client, data, outside = setup
    answers = []
    for source in (str(outside / "evil"), str(outside / "nothing")):
        r = client.post("/amplification/compile", json={"config": config(adapter=source)})
        assert r.status_code == 422, r.text
        answers.append(r.json()["error"]["message"].replace(repr(source), "PATH"))
    assert answers[0] == answers[1] == "adapters[0].variant: no adapter at PATH under the allowed folders"


def test_paths_inside_the_roots_still_work(setup, tokenizer):
    client, data, outside = setup
    shutil.copytree(outside / "evil", data / "good")
    (data / "cfg.yaml").write_text(json.dumps(config(adapter="good")))
    assert client.post("/adapters", json={"name": "good", "source": "good"}).status_code == 201
    assert client.post("/amplification/compile", json={"config_path": str(data / "cfg.yaml")}).status_code == 200
