"""Hub loads check before they download, and what requests can pile up is bounded (issue 25, item 7).

A hub adapter load used to download first and check afterwards: no check that the repo is an
adapter, no size cap, and any caller could make the server fetch a 70B repo (or a gated one with the
server's HF_TOKEN). Now hub loads are off unless ALLOW_HUB_ADAPTERS is set; when on, the registry
fetches `adapter_config.json` alone, checks it (a plain LoRA for modules this base has), looks up
the weights file's size at that same commit against MAX_ADAPTER_BYTES, and only then downloads that
one file. MAX_ADAPTERS bounds registered adapters, MAX_WEIGHTDIFF_JOBS the job folders on disk.

No test reaches the network: huggingface_hub's functions are replaced by fakes that serve a local
"snapshot" and record every call.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from fastapi.testclient import TestClient

from amplification import AdapterError, AdapterRegistry
from tests.test_amplification_api import config
from tests.test_amplification_merge import fresh_base, make_adapter
from tests.test_api import make_settings, wait_ready

from app.main import create_app

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class EntryNotFoundError(Exception):
    """Stands for huggingface_hub's (whose constructor wants an HTTP response)."""


class FakeHub:
    """hf_hub_download / get_paths_info over a local snapshot folder, recording each call in order."""

    def __init__(self, snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.snapshot, self.calls = snapshot, []
        hub = self

        def hf_hub_download(repo_id, filename, revision=None, **kw):
            hub.calls.append(("download", filename, revision))
            path = snapshot / filename
            if not path.exists():
                raise EntryNotFoundError(f"{filename} not found in {repo_id}")
            return str(path)

        def get_paths_info(self, repo_id, paths, revision=None, **kw):
            hub.calls.append(("paths_info", tuple(paths), revision))
            return [SimpleNamespace(path=p, size=(snapshot / p).stat().st_size) for p in paths if (snapshot / p).exists()]

        def never(name):
            def call(*args, **kw):
                hub.calls.append((name,))
                raise AssertionError(f"{name} must not be called")

            return call

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", get_paths_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", never("snapshot_download"))
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", never("model_info"))

    @property
    def downloads(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "download"]


@pytest.fixture
def snapshot(tmp_path, tokenizer) -> Path:
    """A hub cache snapshot of a plain LoRA adapter for the tiny base (snapshots/<commit>/)."""
    return make_adapter(tokenizer, tmp_path / "hub" / "snapshots" / COMMIT, seed=1)


@pytest.fixture
def roots(tmp_path) -> list[Path]:
    (tmp_path / "adapters").mkdir()
    return [tmp_path / "adapters"]


def edit_config(snapshot: Path, **changes) -> None:
    path = snapshot / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_with_hub_loads_off_no_hub_function_is_called(roots, snapshot, monkeypatch, tokenizer):
    hub = FakeHub(snapshot, monkeypatch)
    registry = AdapterRegistry(roots, hub_enabled=False, hub_off="set ALLOW_HUB_ADAPTERS=true to allow them")
    with pytest.raises(AdapterError, match="'org/name'.*set ALLOW_HUB_ADAPTERS=true"):
        registry.load("hub", "org/name", fresh_base(tokenizer))
    assert hub.calls == []


def test_a_hub_adapter_is_checked_before_its_weights_are_downloaded(roots, snapshot, monkeypatch, tokenizer):
    hub = FakeHub(snapshot, monkeypatch)
    registry = AdapterRegistry(roots, hub_enabled=True, max_adapter_bytes=10**6)
    adapter = registry.load("hub", "org/name", fresh_base(tokenizer))
    assert hub.calls == [
        ("download", "adapter_config.json", None),
        ("paths_info", ("adapter_model.safetensors", "adapter_model.bin"), COMMIT),
        ("download", "adapter_model.safetensors", COMMIT),  # the config's commit, checked above
    ]
    assert adapter.source == "org/name" and adapter.revision == COMMIT and len(adapter.factors) == 14
    assert registry.files_of(adapter) == snapshot


@pytest.mark.parametrize(
    "case, match",
    [
        ("no-config", "cannot fetch adapter_config.json of hub adapter 'org/name': EntryNotFoundError"),
        ("ia3", "peft_type 'IA3'; only LORA adapters"),
        ("dora", "use_dora=True"),
        ("other-base", r"targets \['c_attn'\], which match no Linear in the base model's decoder layers"),
        ("oversize", r"adapter 'org/name' is \d+ bytes, more than the 1000 bytes allowed"),
        ("pickle", "holds only adapter_model.bin"),
        ("no-weights", "has no adapter_model.safetensors"),
    ],
)
def test_a_bad_hub_adapter_never_downloads_its_weights(roots, snapshot, monkeypatch, tokenizer, case, match):
    hub = FakeHub(snapshot, monkeypatch)
    if case == "no-config":
        (snapshot / "adapter_config.json").unlink()
    elif case == "ia3":
        edit_config(snapshot, peft_type="IA3")
    elif case == "dora":
        edit_config(snapshot, use_dora=True)
    elif case == "other-base":
        edit_config(snapshot, target_modules=["c_attn"])  # GPT-2's attention: another architecture
    elif case == "pickle":
        (snapshot / "adapter_model.safetensors").rename(snapshot / "adapter_model.bin")
    elif case == "no-weights":
        (snapshot / "adapter_model.safetensors").unlink()
    registry = AdapterRegistry(roots, hub_enabled=True, max_adapter_bytes=1000 if case == "oversize" else 10**6)
    with pytest.raises(AdapterError, match=match):
        registry.load("hub", "org/name", fresh_base(tokenizer))
    assert "adapter_model.safetensors" not in hub.downloads and "adapter_model.bin" not in hub.downloads
    assert "hub" not in registry
    if case in ("ia3", "dora", "other-base", "no-config"):  # refused on the config alone
        assert [c[0] for c in hub.calls] == ["download"]


def test_local_adapters_are_capped_too(roots, tokenizer):
    make_adapter(tokenizer, roots[0] / "local", seed=1)
    size = (roots[0] / "local" / "adapter_model.safetensors").stat().st_size
    with pytest.raises(AdapterError, match=f"adapter 'local' is {size} bytes, more than the {size - 1} bytes"):
        AdapterRegistry(roots, hub_enabled=False, max_adapter_bytes=size - 1).load("x", "local", fresh_base(tokenizer))
    assert AdapterRegistry(roots, hub_enabled=False, max_adapter_bytes=size).load("x", "local", fresh_base(tokenizer))


# --- over HTTP: the settings ------------------------------------------------------------------------


def serve(tiny_dirs, data: Path, **settings) -> TestClient:
    return TestClient(create_app(make_settings(tiny_dirs, data, **settings)))


def test_hub_ids_are_refused_by_default_saying_how_to_enable(tiny_dirs, tmp_path, snapshot, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: only the setting keeps the hub out
    hub = FakeHub(snapshot, monkeypatch)
    with serve(tiny_dirs, tmp_path) as c:
        wait_ready(c)
        r = c.post("/adapters", json={"name": "hub", "source": "org/name"})
        assert r.status_code == 422 and "ALLOW_HUB_ADAPTERS=true" in r.json()["error"]["message"], r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "hub", "lora_path": "org/name"})
        assert r.status_code == 400 and "ALLOW_HUB_ADAPTERS=true" in r.json()["error"]["message"], r.text
        r = c.post("/amplification/compile", json={"config": config(adapter="org/name")})
        assert r.status_code == 422 and "ALLOW_HUB_ADAPTERS=true" in r.json()["error"]["message"], r.text
    assert hub.calls == []


def test_hub_ids_load_when_allowed(tiny_dirs, tmp_path, snapshot, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = FakeHub(snapshot, monkeypatch)
    with serve(tiny_dirs, tmp_path, allow_hub_adapters=True) as c:
        wait_ready(c)
        r = c.post("/adapters", json={"name": "hub", "source": "org/name"})
        assert r.status_code == 201, r.text
        # The compiled folder links the snapshot's files (no second look-up on the hub).
        r = c.post("/v1/compile_and_load_amplification", json={"config": config(adapter="hub")})
        assert r.status_code == 200, r.text
        linked = (Path(r.json()["lora_path"]) / "adapter_model.safetensors").resolve()
        assert linked == (snapshot / "adapter_model.safetensors").resolve()
    assert hub.downloads == ["adapter_config.json", "adapter_model.safetensors"]


def test_hub_offline_keeps_hub_loads_off_even_when_allowed(tiny_dirs, tmp_path, snapshot, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = FakeHub(snapshot, monkeypatch)
    with serve(tiny_dirs, tmp_path, allow_hub_adapters=True) as c:
        wait_ready(c)
        r = c.post("/adapters", json={"name": "hub", "source": "org/name"})
        assert r.status_code == 422 and "HF_HUB_OFFLINE" in r.json()["error"]["message"], r.text
    assert hub.calls == []


def test_registered_adapters_are_bounded(tiny_dirs, tmp_path, tokenizer):
    for name in ("a", "b"):
        make_adapter(tokenizer, tmp_path / "adapters" / name, seed=1)
    with serve(tiny_dirs, tmp_path, max_adapters=1, adapters=f"a={tmp_path / 'adapters' / 'a'}") as c:
        wait_ready(c)
        r = c.post("/adapters", json={"name": "b", "source": "adapters/b"})
        assert r.status_code == 422 and "limit of 1 (MAX_ADAPTERS)" in r.json()["error"]["message"], r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "adapters/b"})
        assert r.status_code == 400 and "MAX_ADAPTERS" in r.json()["error"]["message"], r.text
        # Replacing one is not one more; adapters configs name by path have their own bound.
        r = c.post("/adapters", json={"name": "a", "source": "adapters/b", "replace": True})
        assert r.status_code == 201, r.text
        assert c.post("/amplification/compile", json={"config": config(adapter="adapters/b")}).status_code == 200
        # A weight-diff job that would register more is refused before it starts.
        job = {"tasks": [{"samples": ["a b c"]}], "steps": 1, "register": True}
        r = c.post("/weightdiff/jobs", json=job)
        assert r.status_code == 422 and "MAX_ADAPTERS" in r.json()["error"]["message"], r.text
        assert c.get("/weightdiff/jobs").json()["jobs"] == []
        assert c.delete("/adapters/a").status_code == 200
        assert c.post("/adapters", json={"name": "b", "source": "adapters/b"}).status_code == 201


def wait_final(client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/weightdiff/jobs/{job_id}").json()
        if body["status"] in ("done", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['status']}")


def test_weightdiff_job_folders_are_bounded_and_purgeable(tiny_dirs, tmp_path):
    job = {"tasks": [{"samples": ["a b c d"]}], "steps": 1, "register": True}
    with serve(tiny_dirs, tmp_path, max_weightdiff_jobs=1) as c:
        wait_ready(c)
        first = c.post("/weightdiff/jobs", json=job).json()["id"]
        r = c.post("/weightdiff/jobs", json=job)
        assert r.status_code == 409, r.text
        assert "the limit is 1 (MAX_WEIGHTDIFF_JOBS" in r.json()["error"]["message"]
        assert "?purge=true" in r.json()["error"]["message"]
        assert wait_final(c, first)["status"] == "done"
        adapter = f"wd-{first}-task0"
        assert c.get(f"/adapters/{adapter}").status_code == 200
        # A plain DELETE of a finished job changes nothing; purge deletes it, its folder and its adapter.
        assert c.delete(f"/weightdiff/jobs/{first}").json()["cancelling"] is False
        r = c.delete(f"/weightdiff/jobs/{first}", params={"purge": True})
        assert r.status_code == 200 and r.json() == {"id": first, "status": "done", "deleted": True}, r.text
        assert not (tmp_path / "jobs" / first).exists()
        assert c.get(f"/weightdiff/jobs/{first}").status_code == 404
        assert c.get(f"/adapters/{adapter}").status_code == 404
        assert c.delete(f"/weightdiff/jobs/{first}", params={"purge": True}).status_code == 404
        second = c.post("/weightdiff/jobs", json=job)
        assert second.status_code == 202, second.text
        assert wait_final(c, second.json()["id"])["status"] == "done"


def test_a_running_job_cannot_be_purged(tiny_dirs, tmp_path):
    with serve(tiny_dirs, tmp_path) as c:
        wait_ready(c)
        job_id = c.post("/weightdiff/jobs", json={"tasks": [{"samples": ["a b c d"]}], "steps": 100000}).json()["id"]
        r = c.delete(f"/weightdiff/jobs/{job_id}", params={"purge": True})
        assert r.status_code == 422 and "cancel it first" in r.json()["error"]["message"], r.text
        assert c.delete(f"/weightdiff/jobs/{job_id}").json()["cancelling"] is True
        assert wait_final(c, job_id)["status"] == "cancelled"
        assert c.delete(f"/weightdiff/jobs/{job_id}", params={"purge": True}).status_code == 200
        assert c.get("/weightdiff/jobs").json()["jobs"] == []
