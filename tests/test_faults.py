"""Injected faults: an out-of-memory error fails only its request (503), weights stay exact."""

from __future__ import annotations

import pytest
import torch

from lda.source import ModelSource
from lda.static import StaticPool
from tests.test_amplification_api import config, setup  # noqa: F401  (setup: the app with adapters)
from tests.test_amplification_merge import digests


@pytest.fixture
def oom_on_third_forward(monkeypatch):
    """A test hook standing in for CUDA running out of memory part-way through a decode: the third
    forward, eager (`ModelSource`) or a static-cache step (`StaticPool`, under COMPILE=on)."""
    calls = {"n": 0}

    def inject(cls, name):
        real = getattr(cls, name)

        def flaky(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, flaky)

    inject(ModelSource, "_forward")
    inject(StaticPool, "step")
    return calls


@pytest.mark.parametrize("route, body", [
    ("/generate_lda", {"prompt": "Hello world", "max_new_tokens": 8}),
    ("/generate", {"prompt": "Hello world", "max_new_tokens": 8}),
    ("/amplification/generate", {"prompt": "Hello world", "configs": [config(weight=4.0)], "max_new_tokens": 8}),
])
def test_oom_fails_only_that_request(setup, route, body, oom_on_third_forward):
    client = setup[0]
    before = digests(client.app.state.pair.before.model)
    after = digests(client.app.state.pair.after.model)
    r = client.post(route, json=body)
    assert r.status_code == 503 and r.json()["error"]["type"] == "out_of_memory", r.text
    assert digests(client.app.state.pair.before.model) == before
    assert digests(client.app.state.pair.after.model) == after
    assert client.post(route, json=body).status_code == 200  # the server keeps serving
    assert oom_on_third_forward["n"] > 3
