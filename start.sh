#!/usr/bin/env bash
# Container entry point: serve at once on all interfaces, optionally with sshd.
#   PUBLIC_KEY     set -> sshd with that key only (no passwords), for RunPod/Vast ssh access
#   START_SERVER   false -> do not serve; keep the container alive (as the seed image did)
#   SERVER_USER    the user the server runs as (app, uid 1000, in the image). The entry point
#                  starts as root because sshd needs it, then drops to this user for the server:
#                  the process that answers the internet holds no root. `root` keeps root (with a
#                  warning); started as non-root (`docker run --user`), it serves as that user.
#   EXPORT_SECRETS_TO_SHELL  1 -> ssh sessions' environment file keeps the secrets too (see below)
# Paths are overridable (SSH_HOME, SSHD_CONFIG_DIR, SSHD_BIN, ENV_FILE) so tests can run it in a
# temporary root.
set -euo pipefail

log() { echo "start.sh: $*"; }

SSH_HOME="${SSH_HOME:-/root/.ssh}"
SSHD_CONFIG_DIR="${SSHD_CONFIG_DIR:-/etc/ssh}"
SSHD_BIN="${SSHD_BIN:-/usr/sbin/sshd}"
ENV_FILE="${ENV_FILE:-/etc/profile.d/container-env.sh}"
SERVER_USER="${SERVER_USER:-app}"

start_sshd() {
    mkdir -p "$SSH_HOME" "$SSHD_CONFIG_DIR"
    chmod 700 "$SSH_HOME"
    printf '%s\n' "$PUBLIC_KEY" > "$SSH_HOME/authorized_keys"
    chmod 600 "$SSH_HOME/authorized_keys"
    # The image holds no host key (a baked one would be every pod's, and its private half anyone's
    # who pulls the image): each container makes its own on first start and keeps it after.
    local host_key="$SSHD_CONFIG_DIR/ssh_host_ed25519_key"
    if [ ! -s "$host_key" ]; then
        rm -f "$host_key" "$host_key.pub"
        ssh-keygen -q -t ed25519 -N "" -f "$host_key"
        log "ssh host key generated: $(ssh-keygen -l -f "$host_key.pub")"
    fi
    cat > "$SSHD_CONFIG_DIR/sshd_config.d-container.conf" <<CONF
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile $SSH_HOME/authorized_keys
HostKey $host_key
CONF
    "$SSHD_BIN" -f "$SSHD_CONFIG_DIR/sshd_config.d-container.conf"
    log "sshd started (key login only)"
}

# Names whose values are credentials: any `_`-separated word of the name is one of these
# (HF_TOKEN, RUNPOD_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, SMTP_PASS, ...). Whole words, so
# the server's TOKENIZER_CLASS_AFTER and MAX_NEW_TOKENS_LIMIT are settings, not secrets.
is_secret() {
    local word words
    IFS=_ read -ra words <<<"${1^^}"
    for word in "${words[@]}"; do
        case "$word" in
            TOKEN | KEY | KEYS | SECRET | SECRETS | PASSWORD | PASSWORDS | PASSWD | PASS | CREDENTIAL | CREDENTIALS)
                return 0 ;;
        esac
    done
    return 1
}

# ssh sessions (ours, or the platform's own sshd on Vast) do not inherit the container's
# environment: write it where login shells read it, so `python -m app.regression` etc. see the config.
# The file is root's alone (0600) and holds no secret unless EXPORT_SECRETS_TO_SHELL=1: anything
# else on the machine that reads /etc/profile.d must not learn HF_TOKEN or the API key from it.
write_env_file() {
    local name tmp kept=0 dropped=()
    # mktemp creates the file 0600 whatever the umask, before any content is in it; the rename
    # then replaces a file left by an earlier start (which may be 0644) in one step.
    if ! mkdir -p "$(dirname "$ENV_FILE")" 2>/dev/null || ! tmp="$(mktemp "$ENV_FILE.XXXXXX" 2>/dev/null)"; then
        log "cannot write $ENV_FILE (started as uid $(id -u)?): ssh sessions will not see the settings"
        return 0
    fi
    while IFS= read -r name; do
        case "$name" in
            PUBLIC_KEY | HOSTNAME | HOME | PWD | OLDPWD | SHLVL | _) continue ;;
        esac
        if is_secret "$name" && [ "${EXPORT_SECRETS_TO_SHELL:-0}" != "1" ]; then
            dropped+=("$name")
            continue
        fi
        # declare -p quotes any value (newlines included) so that sourcing gives it back exactly.
        declare -p "$name" >> "$tmp"
        kept=$((kept + 1))
    done < <(compgen -e)
    chmod 600 "$tmp"
    mv -f "$tmp" "$ENV_FILE"
    log "container environment ($kept variables) written to $ENV_FILE (mode 0600) for ssh sessions"
    if [ ${#dropped[@]} -gt 0 ]; then
        log "left out of it as secrets: ${dropped[*]} (EXPORT_SECRETS_TO_SHELL=1 keeps them)"
    fi
}

# Root hands the server's writable places to SERVER_USER: a volume mounted over /workspace (or one
# written by an older image running as root) belongs to root. Only entries owned by someone else
# are changed, so a warm model cache costs a walk, not a rewrite.
give_data_dirs() {
    local dir
    for dir in "${DATA_DIR:-data}" "${HF_HOME:-}"; do
        [ -n "$dir" ] || continue
        mkdir -p "$dir"
        if ! find "$dir" ! -user "$SERVER_USER" -exec chown -h "$SERVER_USER:" {} + 2>/dev/null; then
            log "warning: could not give all of $dir to $SERVER_USER (read-only mount?)"
        fi
    done
}

# exec's the server (so SIGTERM reaches it), as SERVER_USER when started as root.
exec_server() {
    local python="${PYTHON:-python}"
    if [ "$(id -u)" -ne 0 ]; then
        exec "$python" -m app
    fi
    if [ "$SERVER_USER" = "root" ]; then
        log "warning: SERVER_USER=root: the server runs as root"
        exec "$python" -m app
    fi
    if ! id -u "$SERVER_USER" >/dev/null 2>&1; then
        log "error: no user $SERVER_USER to run the server as (create it, or set SERVER_USER=root)"
        exit 1
    fi
    give_data_dirs
    local home
    home="$(getent passwd "$SERVER_USER" | cut -d: -f6)"
    log "server runs as $SERVER_USER (uid $(id -u "$SERVER_USER")), not root"
    # --no-new-privs: no setuid binary can take the server back to root.
    exec setpriv --reuid="$SERVER_USER" --regid="$(id -g "$SERVER_USER")" --init-groups --no-new-privs \
        env HOME="$home" USER="$SERVER_USER" LOGNAME="$SERVER_USER" "$python" -m app
}

write_env_file

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
exec_server
