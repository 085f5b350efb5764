"""Untrusted files: code shipped with a checkpoint runs only when the operator says so, and no
request can say so.

Adapter pickles, path confinement and traversal are covered in test_amplification_merge.py and
test_amplification_api.py; config-file confinement in test_amplification_api.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from lda.loading import LoadConfig, load_model
from tests.test_api import make_settings, wait_ready

CUSTOM_CODE = '''
import pathlib
pathlib.Path(__file__).with_name("CODE_RAN").write_text("yes")
from transformers import LlamaConfig as _Base
class EvilConfig(_Base):
    model_type = "evil_llama"
'''


@pytest.fixture
def remote_code_model(tiny_dirs, tmp_path):
    """A checkpoint whose config asks for its own Python code (auto_map), which leaves a marker."""
    model = tmp_path / "evil"
    shutil.copytree(tiny_dirs[0], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil_code.py").write_text(CUSTOM_CODE)
    return model


def test_checkpoint_code_does_not_run_without_trust_remote_code(remote_code_model):
    from transformers.utils import HF_MODULES_CACHE

    before = set(Path(HF_MODULES_CACHE).rglob("CODE_RAN"))
    # transformers either ignores the auto_map (loading the plain architecture) or refuses; it never
    # imports the shipped file unless the operator set TRUST_REMOTE_CODE.
    try:
        load_model(str(remote_code_model), LoadConfig(device="cpu"))
    except ValueError as exc:
        assert "trust_remote_code" in str(exc)
    # Shipped code is copied into the modules cache and imported from there: no marker anywhere.
    assert not list(remote_code_model.parent.rglob("CODE_RAN"))
    assert set(Path(HF_MODULES_CACHE).rglob("CODE_RAN")) == before


@pytest.mark.parametrize(
    "route, body",
    [
        ("/generate_lda", {"prompt": "x", "trust_remote_code": True}),
        ("/generate", {"prompt": "x", "trust_remote_code": True}),
        ("/adapters", {"name": "a", "source": "x", "trust_remote_code": True}),
        ("/amplification/generate", {"prompt": "x", "include_base": True, "trust_remote_code": True}),
        ("/weightdiff/jobs", {"tasks": [{"samples": ["x"]}], "trust_remote_code": True}),
    ],
)
def test_no_request_can_turn_on_remote_code(tiny_dirs, tmp_path_factory, route, body, request):
    client = request.getfixturevalue("untrusted_client")
    r = client.post(route, json=body)
    assert r.status_code == 422 and "trust_remote_code" in r.json()["error"]["message"], r.text


@pytest.fixture(scope="module")
def untrusted_client(tiny_dirs, tmp_path_factory):
    with TestClient(create_app(make_settings(tiny_dirs, tmp_path_factory.mktemp("untrusted")))) as c:
        wait_ready(c)
        yield c
