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


def test_the_vast_onstart_script_is_in_the_image_where_the_docs_say():
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/vast/onstart.sh ./vast-onstart.sh" in text and "WORKDIR /srv" in text
    assert "bash /srv/vast-onstart.sh" in (ROOT / "docs" / "deploy.md").read_text()


def test_the_workflow_publishes_both_cuda_variants_the_probe_and_templates_name():
    """CUDA 13 as latest, CUDA 12 (torch 2.13's cu126) under its own tags and cache, by build args only."""
    import yaml

    from app.gpu_probe import CUDA12_TAG, CUDA12_VERSION, MIN_DRIVER

    job = yaml.safe_load((ROOT / ".github" / "workflows" / "docker.yml").read_text())["jobs"]["image"]
    variants = {v["variant"]: v for v in job["strategy"]["matrix"]["include"]}
    assert len(variants) == 2 and job["strategy"]["fail-fast"] is False
    default, cuda12 = variants["cu130"], variants[CUDA12_TAG]
    assert (default["moving-tag"], default["suffix"], default["build-args"]) == ("latest", "", "")
    assert (cuda12["moving-tag"], cuda12["suffix"]) == (CUDA12_TAG, f"-{CUDA12_TAG}")
    assert cuda12["auto-latest"] == "false"  # a version tag must not move :latest to the CUDA 12 image
    args = dict(line.split("=", 1) for line in cuda12["build-args"].split())
    assert set(args) == {"BASE_IMAGE", "TORCH_INDEX_URL"}
    # The base image's CUDA matches the torch build the index serves (12.6.x <-> cu126).
    assert args["BASE_IMAGE"].startswith(f"nvidia/cuda:{CUDA12_VERSION}.")
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/{CUDA12_TAG}")

    steps = {s.get("uses", "").split("@")[0]: s.get("with", {}) for s in job["steps"]}
    build, meta = steps["docker/build-push-action"], steps["docker/metadata-action"]
    assert build["build-args"] == "${{ matrix.build-args }}"
    assert "scope=${{ matrix.variant }}" in build["cache-from"]
    assert "scope=${{ matrix.variant }}" in build["cache-to"]
    assert "suffix=${{ matrix.suffix }}" in meta["tags"] and "latest=${{ matrix.auto-latest }}" in meta["flavor"]

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:13\.0\.", dockerfile, re.M)  # the default: CUDA 13.0
    for name, value in args.items():  # the Dockerfile's own example builds the same variant
        assert f"--build-arg {name}={value}" in dockerfile
    deploy_page = (ROOT / "docs" / "deploy.md").read_text()  # the site's Deploy page
    for name, value in args.items():
        assert f"--build-arg {name}={value}" in deploy_page
    for name in ("template.json", "serverless.json"):
        text = json.loads((ROOT / "deploy" / "runpod" / name).read_text())["readme"]
        assert ":latest" in text and f":{CUDA12_TAG}" in text
        assert f">= {MIN_DRIVER[13]}" in text and f">= {MIN_DRIVER[12]}" in text


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def run_with(text: str) -> str:
    runs = [i for i in instructions((ROOT / "Dockerfile").read_text()) if i.startswith("RUN ") and text in i]
    assert len(runs) == 1, runs
    return runs[0]


def test_the_image_holds_no_ssh_host_key():
    """Issue 25 item 5: `apt-get install openssh-server` generates host keys; kept in the image,
    every pod shares them and anyone who pulls the image holds the private halves. They must go in
    the layer that made them (a later RUN would only hide them under a layer that still has them)."""
    run = run_with("openssh-server")
    assert "rm -f /etc/ssh/ssh_host_*" in run
    assert run.index("rm -f /etc/ssh/ssh_host_*") > run.index("apt-get install")
    start = (ROOT / "start.sh").read_text()
    assert "ssh-keygen -q -t ed25519" in start and "HostKey $host_key" in start
    # Nothing in the build context could bring one back.
    assert not [p for p in ROOT.rglob("ssh_host_*") if ".venv" not in p.parts and ".git" not in p.parts]


def test_the_server_runs_as_a_fixed_unprivileged_user():
    """Issue 25 item 8: the container served as root. The image has `app` (uid/gid 1000) owning
    /workspace; the entry point stays root for sshd and exec's the server through setpriv."""
    run = run_with("useradd")
    assert "groupadd --gid 1000 app" in run and "useradd --uid 1000 --gid 1000" in run
    assert "chown -R app:app /workspace" in run and "setpriv --version" in run
    assert run.index("userdel --remove ubuntu") < run.index("useradd")  # Ubuntu bases hold uid 1000
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s+SERVER_USER=app$", dockerfile, re.M)
    # No USER line: sshd (PUBLIC_KEY on RunPod) needs root; start.sh drops for the server.
    assert not [i for i in instructions(dockerfile) if i.startswith("USER ")]
    start = (ROOT / "start.sh").read_text()
    assert 'SERVER_USER="${SERVER_USER:-app}"' in start
    assert "exec setpriv --reuid=\"$SERVER_USER\"" in start and "--no-new-privs" in start
