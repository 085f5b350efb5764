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
        # The platform's own sshd (Vast) still gets the container's environment for its sessions.
        assert "MODEL_AFTER_ID" in (tmp_path / "profile" / "env.sh").read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_port_health_answers_ping_on_its_own_port(tmp_path, tiny_dirs):
    """RunPod serverless probes /ping on PORT_HEALTH: 204 while loading, then 200; nothing else there."""
    port, health_port = free_port(), free_port()
    proc, log = start(tmp_path, tiny_dirs, PORT=str(port), PORT_HEALTH=str(health_port))
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        while 200 not in seen and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                seen.add(httpx.get(f"http://127.0.0.1:{health_port}/ping", timeout=1).status_code)
            except httpx.HTTPError:
                time.sleep(0.1)
        assert 200 in seen and seen <= {200, 204}, (seen, log.read_text())
        assert httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=5).json() == {"status": "ok"}
        # Only health checks on that port: the API stays on PORT.
        assert httpx.post(f"http://127.0.0.1:{health_port}/generate_lda", json={"prompt": "x"}).status_code == 404
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def test_vast_onstart_starts_the_server_in_the_background(tmp_path, tiny_dirs):
    """Vast's ssh launch mode runs the on-start script instead of the entry point: it must leave a
    serving server behind, without our sshd (Vast runs its own), and say the mapped public URL."""
    port = free_port()
    fake_sshd = tmp_path / "sshd"
    fake_sshd.write_text(f"#!/bin/sh\ntouch {tmp_path}/sshd.ran\n")
    fake_sshd.chmod(0o755)
    after, before = tiny_dirs
    env = server_env(
        START_SH=str(ROOT / "start.sh"), LOG_FILE=str(tmp_path / "ws" / "server.log"), PORT=str(port),
        PYTHON=sys.executable, PUBLIC_KEY="ssh-ed25519 AAAAtest", SSHD_BIN=str(fake_sshd),
        SSH_HOME=str(tmp_path / "ssh"), SSHD_CONFIG_DIR=str(tmp_path / "etc_ssh"),
        ENV_FILE=str(tmp_path / "profile" / "env.sh"), MODEL_AFTER_ID=str(after), MODEL_BEFORE_ID=str(before),
        DATA_DIR=str(tmp_path / "data"), HOST="127.0.0.1", PUBLIC_IPADDR="203.0.113.7",
        **{f"VAST_TCP_PORT_{port}": "41234"},
    )
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "vast" / "onstart.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    server_pid = None
    try:
        assert out.returncode == 0, out.stdout + out.stderr + (tmp_path / "ws" / "server.log").read_text()
        server_pid = int(out.stdout.split("(pid ")[1].split(")")[0])
        assert "public URL: http://203.0.113.7:41234" in out.stdout and "ready after" in out.stdout
        r = httpx.post(f"http://127.0.0.1:{port}/generate_lda", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=30)
        assert r.status_code == 200
        assert not (tmp_path / "sshd.ran").exists()
        assert "PUBLIC_KEY not set: no sshd" in (tmp_path / "ws" / "server.log").read_text()
    finally:
        if server_pid:
            os.kill(server_pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(server_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
