"""start.sh in a temporary root: serves, sshd only with PUBLIC_KEY (stubbed), START_SERVER=false, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_cli import free_port, server_env

ROOT = Path(__file__).resolve().parents[1]


def start(tmp_path: Path, tiny_dirs, **env: str) -> tuple[subprocess.Popen, Path]:
    fake_sshd = tmp_path / "sshd"
    fake_sshd.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sshd.args\n")
    fake_sshd.chmod(0o755)
    after, before = tiny_dirs
    full = server_env(
        SSH_HOME=str(tmp_path / "ssh"), SSHD_CONFIG_DIR=str(tmp_path / "etc_ssh"), SSHD_BIN=str(fake_sshd),
        ENV_FILE=str(tmp_path / "profile" / "env.sh"), PYTHON=sys.executable, MODEL_AFTER_ID=str(after),
        MODEL_BEFORE_ID=str(before), DATA_DIR=str(tmp_path / "data"), HOST="127.0.0.1", **env,
    )
    log = tmp_path / "out.log"
    proc = subprocess.Popen(["bash", str(ROOT / "start.sh")], env=full, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, log


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(log.read_text())


@pytest.mark.skipif(not os.path.exists("/usr/bin/ssh-keygen"), reason="ssh-keygen not installed")
def test_serves_with_sshd_when_public_key_set_and_sigterm_exits_cleanly(tmp_path, tiny_dirs):
    port = free_port()
    proc, log = start(tmp_path, tiny_dirs, PORT=str(port), PUBLIC_KEY="ssh-ed25519 AAAAtest user@host")
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        assert (tmp_path / "ssh" / "authorized_keys").read_text().strip() == "ssh-ed25519 AAAAtest user@host"
        conf = (tmp_path / "etc_ssh" / "sshd_config.d-container.conf").read_text()
        assert "PasswordAuthentication no" in conf and (tmp_path / "etc_ssh" / "ssh_host_ed25519_key").exists()
        assert (tmp_path / "sshd.args").exists()
        env_file = (tmp_path / "profile" / "env.sh").read_text()
        assert "MODEL_AFTER_ID" in env_file and "PUBLIC_KEY" not in env_file
        r = httpx.post(f"http://127.0.0.1:{port}/generate_lda", json={"prompt": "Hello", "max_new_tokens": 3}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # exec'd: the signal reaches the server itself
        assert proc.wait(30) == 0, log.read_text()


def test_no_sshd_without_public_key_and_start_server_false(tmp_path, tiny_dirs):
    proc, log = start(tmp_path, tiny_dirs, START_SERVER="false", PORT=str(free_port()))
    try:
        time.sleep(1.0)
        assert proc.poll() is None  # kept alive
        out = log.read_text()
        assert "PUBLIC_KEY not set: no sshd" in out and "START_SERVER=false" in out
        assert not (tmp_path / "sshd.args").exists() and not (tmp_path / "ssh").exists()
    finally:
        proc.terminate()
        proc.wait(10)
