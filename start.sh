#!/usr/bin/env bash
# Container entry point: serve at once on all interfaces. (sshd, RunPod/Vast specifics and
# START_SERVER come with the deployment work.)
set -euo pipefail
export HOST="${HOST:-0.0.0.0}"
export PORT="${PORT:-8000}"
echo "start.sh: serving on ${HOST}:${PORT} (after=${MODEL_AFTER_ID:-demo}, before=${MODEL_BEFORE_ID:-demo})"
exec python -m app
