#!/usr/bin/env bash
# Container entry point: serve at once on all interfaces, optionally with sshd.
#   PUBLIC_KEY     set -> sshd with that key only (no passwords), for RunPod/Vast ssh access
#   START_SERVER   false -> do not serve; keep the container alive (as the seed image did)
# Paths are overridable (SSH_HOME, SSHD_CONFIG_DIR, SSHD_BIN, ENV_FILE) so tests can run it in a
# temporary root.
set -euo pipefail

log() { echo "start.sh: $*"; }

SSH_HOME="${SSH_HOME:-/root/.ssh}"
SSHD_CONFIG_DIR="${SSHD_CONFIG_DIR:-/etc/ssh}"
SSHD_BIN="${SSHD_BIN:-/usr/sbin/sshd}"
ENV_FILE="${ENV_FILE:-/etc/profile.d/container-env.sh}"

start_sshd() {
    mkdir -p "$SSH_HOME" "$SSHD_CONFIG_DIR"
    chmod 700 "$SSH_HOME"
    printf '%s\n' "$PUBLIC_KEY" > "$SSH_HOME/authorized_keys"
    chmod 600 "$SSH_HOME/authorized_keys"
    if ! ls "$SSHD_CONFIG_DIR"/ssh_host_*_key >/dev/null 2>&1; then
        ssh-keygen -q -t ed25519 -N "" -f "$SSHD_CONFIG_DIR/ssh_host_ed25519_key"
    fi
    cat > "$SSHD_CONFIG_DIR/sshd_config.d-container.conf" <<CONF
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile $SSH_HOME/authorized_keys
HostKey $SSHD_CONFIG_DIR/ssh_host_ed25519_key
CONF
    "$SSHD_BIN" -f "$SSHD_CONFIG_DIR/sshd_config.d-container.conf"
    log "sshd started (key login only)"
}

# ssh sessions (ours, or the platform's own sshd on Vast) do not inherit the container's
# environment: write it where login shells read it, so `python -m app.regression` etc. see the config.
mkdir -p "$(dirname "$ENV_FILE")"
export -p | grep -vE ' (PUBLIC_KEY|API_KEY|HOSTNAME|HOME|PWD|SHLVL|_)=' > "$ENV_FILE" || true
log "container environment written to $ENV_FILE for ssh sessions"

if [ -n "${PUBLIC_KEY:-}" ]; then
    start_sshd
else
    log "PUBLIC_KEY not set: no sshd"
fi

if [ "${START_SERVER:-true}" = "false" ]; then
    log "START_SERVER=false: not serving; keeping the container alive"
    exec sleep infinity
fi

export HOST="${HOST:-0.0.0.0}"
export PORT="${PORT:-8000}"
log "serving on ${HOST}:${PORT}${PORT_HEALTH:+ (health checks also on ${PORT_HEALTH})} (after=${MODEL_AFTER_ID:-demo}, before=${MODEL_BEFORE_ID:-demo})"
exec "${PYTHON:-python}" -m app
