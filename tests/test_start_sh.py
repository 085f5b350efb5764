"""start.sh in a temporary root: serves, sshd only with PUBLIC_KEY (stubbed), START_SERVER=false, SIGTERM,
a host key per container, the ssh environment file (0600, no secrets), the drop to SERVER_USER."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.test_cli import free_port, server_env

ROOT = Path(__file__).resolve().parents[1]


def start(tmp_path: Path, tiny_dirs, umask: int = 0o022, **env: str) -> tuple[subprocess.Popen, Path]:
    fake_sshd = tmp_path / "sshd"
    fake_sshd.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sshd.args\n")
    fake_sshd.chmod(0o755)
    after, before = tiny_dirs
    full = server_env(
        SSH_HOME=str(tmp_path / "ssh"), SSHD_CONFIG_DIR=str(tmp_path / "etc_ssh"), SSHD_BIN=str(fake_sshd),
        ENV_FILE=str(tmp_path / "profile" / "env.sh"), PYTHON=sys.executable, MODEL_AFTER_ID=str(after),
        MODEL_BEFORE_ID=str(before), DATA_DIR=str(tmp_path / "data"), HOST="127.0.0.1",
        # The tests' models live in root-only temp dirs: serve as whoever runs the tests (the drop to
        # an unprivileged user has its own test below).
        SERVER_USER="root",
    )
    full.update(env)
    log = tmp_path / "out.log"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "start.sh")], env=full, stdout=log.open("w"), stderr=subprocess.STDOUT, umask=umask
    )
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
        DATA_DIR=str(tmp_path / "data"), HOST="127.0.0.1", PUBLIC_IPADDR="203.0.113.7", SERVER_USER="root",
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


def idle(tmp_path: Path, tiny_dirs, umask: int = 0o022, **env: str) -> tuple[subprocess.Popen, Path]:
    """start.sh with START_SERVER=false, once it has done its set-up (sshd, env file) and idles."""
    proc, log = start(tmp_path, tiny_dirs, umask=umask, START_SERVER="false", PORT=str(free_port()), **env)
    deadline = time.monotonic() + 30
    while "START_SERVER=false" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.mark.skipif(not os.path.exists("/usr/bin/ssh-keygen"), reason="ssh-keygen not installed")
def test_every_container_makes_its_own_ssh_host_key(tmp_path, tiny_dirs):
    """Issue 25 item 5: the image held the host keys `apt-get install openssh-server` made, and
    start.sh only made one when none existed, so every pod shared one private host key. Now the
    image holds none (test_deploy_files) and each container makes its own on its first start.
    A key of another type left behind does not stop it: sshd is told to use the ed25519 one."""
    keys = []
    for name in ("pod1", "pod2"):
        root = tmp_path / name
        root.mkdir()
        if name == "pod2":  # a leftover RSA key, as a base image or an older build may hold
            (root / "etc_ssh").mkdir()
            (root / "etc_ssh" / "ssh_host_rsa_key").write_text("stale")
        proc, log = idle(root, tiny_dirs, PUBLIC_KEY="ssh-ed25519 AAAAtest user@host")
        stop(proc)
        key = root / "etc_ssh" / "ssh_host_ed25519_key"
        assert key.exists(), log.read_text()
        assert key.stat().st_mode & 0o777 == 0o600 and "ssh host key generated" in log.read_text()
        conf = (root / "etc_ssh" / "sshd_config.d-container.conf").read_text()
        assert f"HostKey {key}" in conf
        keys.append((root / "etc_ssh" / "ssh_host_ed25519_key.pub").read_text().split()[1])
        # A restart keeps the container's key: clients that trusted it keep trusting it.
        proc, log = idle(root, tiny_dirs, PUBLIC_KEY="ssh-ed25519 AAAAtest user@host")
        stop(proc)
        assert (root / "etc_ssh" / "ssh_host_ed25519_key.pub").read_text().split()[1] == keys[-1]
    assert keys[0] != keys[1]


SECRETS = {
    "HF_TOKEN": "hf_secret_value",
    "RUNPOD_API_KEY": "rp_secret_value",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_value",
    "DB_PASSWORD": "db_secret_value",
    "SMTP_PASS": "smtp_secret_value",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secret/creds.json",
    "API_KEY": "api_secret_value",
    "SSH_PRIVATE_KEY": "-----BEGIN KEY-----\nkey_secret_line\n-----END KEY-----",
}
SETTINGS = {
    "TOKENIZER_CLASS_AFTER": "LlamaTokenizer",  # TOKEN inside a word is not a secret
    "MAX_NEW_TOKENS_LIMIT": "77",
    "SYSTEM_NOTE": "two\nlines with 'quotes' and \"more\" and $HOME",
}


def sourced(env_file: Path, names) -> dict[str, str]:
    """What a login shell gets from the file, one variable per NUL-separated field."""
    script = f"source {env_file}; " + "; ".join(f'printf "%s\\0" "${{{n}-<unset>}}"' for n in names)
    out = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(zip(names, out.stdout.split("\0")))


def test_the_ssh_environment_file_is_root_only_and_holds_no_secret(tmp_path, tiny_dirs):
    """Issue 25 item 6: start.sh wrote HF_TOKEN into a world-readable /etc/profile.d file (only
    API_KEY and PUBLIC_KEY were left out). Now the file is 0600 from its creation, even under umask
    000 and over a 0644 file an earlier start left, and every secret-looking name stays out."""
    env_file = tmp_path / "profile" / "env.sh"
    env_file.parent.mkdir()
    env_file.write_text("stale")
    env_file.chmod(0o644)
    proc, log = idle(tmp_path, tiny_dirs, umask=0, PUBLIC_KEY="ssh-ed25519 AAAAtest", **SECRETS, **SETTINGS)
    stop(proc)
    assert env_file.stat().st_mode & 0o777 == 0o600
    text = env_file.read_text()
    for name, value in SECRETS.items():
        assert name not in text and value.splitlines()[-1] not in text, name
    assert "AAAAtest" not in text
    got = sourced(env_file, [*SETTINGS, *SECRETS, "MODEL_AFTER_ID"])
    assert {n: got[n] for n in SETTINGS} == SETTINGS  # exact, newlines and quotes included
    assert all(got[n] == "<unset>" for n in SECRETS) and got["MODEL_AFTER_ID"] == str(tiny_dirs[0])
    assert "HF_TOKEN" in log.read_text() and "hf_secret_value" not in log.read_text()  # named, not shown
    assert not list(env_file.parent.glob("env.sh.*"))  # no temporary file left


def test_secrets_reach_ssh_sessions_only_when_asked(tmp_path, tiny_dirs):
    env_file = tmp_path / "profile" / "env.sh"
    proc, _ = idle(tmp_path, tiny_dirs, EXPORT_SECRETS_TO_SHELL="1", PUBLIC_KEY="ssh-ed25519 AAAAtest", **SECRETS)
    stop(proc)
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert sourced(env_file, list(SECRETS)) == SECRETS
    assert "AAAAtest" not in env_file.read_text()  # sshd's key is no setting at all


@pytest.fixture
def shared_dir():
    """A temp dir another user can enter (pytest's are root-only), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="start-sh-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_started_as_root_the_server_runs_as_the_unprivileged_user(tmp_path, tiny_dirs, shared_dir):
    """Issue 25 item 8: the container ran the server as root. start.sh starts as root (sshd needs
    it) and exec's the server as SERVER_USER with no way back (no_new_privs), after handing it the
    data dirs a root-owned volume brought. A stand-in for python records who it runs as."""
    data, hf = shared_dir / "data", shared_dir / "hf"
    (hf / "hub").mkdir(parents=True)
    (hf / "hub" / "root-owned").write_text("from an older image")
    report = data / "who"
    stub = shared_dir / "python"
    stub.write_text(
        "#!/bin/sh\n"
        f'{{ id -u; id -g; echo "$HOME"; echo "$*"; grep NoNewPrivs /proc/self/status; }} > {report}\n'
        f"touch {hf}/hub/written-by-the-server\n"
    )
    stub.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    proc, log = start(
        tmp_path, tiny_dirs, SERVER_USER="nobody", PYTHON=str(stub), DATA_DIR=str(data), HF_HOME=str(hf),
        PORT=str(free_port()),
    )
    assert proc.wait(30) == 0, log.read_text()
    uid, gid, home, args, no_new_privs = report.read_text().splitlines()
    assert (int(uid), int(gid), home, args) == (nobody.pw_uid, nobody.pw_gid, nobody.pw_dir, "-m app")
    assert no_new_privs.split() == ["NoNewPrivs:", "1"]
    assert (hf / "hub" / "written-by-the-server").exists()
    for path in (data, hf, hf / "hub", hf / "hub" / "root-owned"):
        assert path.stat().st_uid == nobody.pw_uid, path
    assert "server runs as nobody" in log.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has a user to drop to")
def test_a_missing_server_user_stops_the_start_with_the_reason(tmp_path, tiny_dirs):
    proc, log = start(tmp_path, tiny_dirs, SERVER_USER="no-such-user-here", PYTHON="true", PORT=str(free_port()))
    assert proc.wait(30) == 1
    assert "no user no-such-user-here" in log.read_text() and "SERVER_USER=root" in log.read_text()
