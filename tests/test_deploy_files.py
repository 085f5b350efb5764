"""The RunPod templates and the Dockerfile agree with the settings the server really reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KNOWN_OUTSIDE_SETTINGS = {"HF_TOKEN", "HF_HOME", "PUBLIC_KEY", "START_SERVER"}


@pytest.mark.parametrize("name", ["template.json", "serverless.json"])
def test_runpod_template_names_real_settings(name):
    t = json.loads((ROOT / "deploy" / "runpod" / name).read_text())
    settings = {f.upper() for f in Settings.model_fields}
    env = {e["key"]: e["value"] for e in t["env"]}
    assert set(env) <= settings | KNOWN_OUTSIDE_SETTINGS, set(env) - settings - KNOWN_OUTSIDE_SETTINGS
    assert f"{env['PORT']}/http" in t["ports"].split(",")
    assert t["containerDiskInGb"] >= 20  # the CUDA image alone is ~10 GB unpacked
    if t["isServerless"]:
        assert env["PORT_HEALTH"]  # RunPod's balancer probes /ping there
    else:
        assert t["volumeMountPath"] == "/workspace" and "22/tcp" in t["ports"]


def test_dockerfile_matches_the_runpod_volume_and_ports():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"HF_HOME=/workspace/", text) and re.search(r"DATA_DIR=/workspace/", text)
    assert re.search(r"^EXPOSE 8000 22$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*--start-period=\d+s", text, re.M)
    assert 'ENTRYPOINT ["/srv/start.sh"]' in text


def test_the_vast_onstart_script_is_in_the_image_where_the_readme_says():
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/vast/onstart.sh ./vast-onstart.sh" in text and "WORKDIR /srv" in text
    assert "bash /srv/vast-onstart.sh" in (ROOT / "README.md").read_text()
