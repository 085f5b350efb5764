#!/usr/bin/env bash
# Vast on-start script. Vast's ssh and jupyter launch modes replace the image's entry point with
# their own (sshd, jupyter) and run the template's "on-start script" field instead; put there:
#     bash /srv/vast-onstart.sh
# It starts the server in the background (start.sh, logging to LOG_FILE), prints the public URL
# from Vast's port mapping, and waits until the models are loaded. In the "entrypoint" launch mode
# this script is not needed: start.sh runs as the entry point.
set -euo pipefail

log() { echo "vast-onstart: $*"; }

START_SH="${START_SH:-/srv/start.sh}"
LOG_FILE="${LOG_FILE:-/workspace/server.log}"
WAIT_S="${WAIT_S:-1800}"
export PORT="${PORT:-8000}"

# Vast's own sshd owns port 22 in these launch modes; ours must not start beside it.
unset PUBLIC_KEY

mkdir -p "$(dirname "$LOG_FILE")"
nohup bash "$START_SH" >>"$LOG_FILE" 2>&1 &
pid=$!
log "server started (pid $pid), logging to $LOG_FILE"

# Docker options `-p 8000:8000` map the container's port to a random public one; Vast names it in
# VAST_TCP_PORT_<container port> and the address in PUBLIC_IPADDR.
mapped="VAST_TCP_PORT_${PORT}"
log "public URL: http://${PUBLIC_IPADDR:-<instance ip>}:${!mapped:-<mapped port>} (container port ${PORT})"

for ((i = 0; i < WAIT_S; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
        log "the server exited; last lines of $LOG_FILE:"
        tail -n 20 "$LOG_FILE"
        exit 1
    fi
    if "${PYTHON:-python}" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PORT}/ready', timeout=2)" 2>/dev/null; then
        log "ready after ${i}s"
        exit 0
    fi
    sleep 1
done
log "not ready after ${WAIT_S}s (large models still loading?); the server keeps starting, see $LOG_FILE"
