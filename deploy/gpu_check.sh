#!/usr/bin/env bash
# `make gpu-check`: pick a Python, then run tests/benchmarks/gpu_check.py, which prints one JSON report
# (also written to $GPU_CHECK_OUT, else $OUT/gpu_check.json when OUT is set, else ./gpu_check.json).
#   1. `python3` (or $PYTHON) already imports a CUDA torch, as on a GPU image: use it. The locked
#      packages it lacks (or holds older) come from the wheel folder $GPU_WHEELS (default .whl, made by
#      `make gpu-wheels` where a package index is reachable), installed with --no-index --no-deps into
#      a folder put first on PYTHONPATH. Its torch and CUDA packages are never replaced.
#   2. Else, on a machine with an NVIDIA GPU and a reachable package index: a venv, .venv-gpu, with the
#      locked packages (pip's default torch on Linux x86_64 is a CUDA build; TORCH_INDEX_URL picks
#      another index for torch).
#   3. Else (a CPU machine, CI): the project's .venv (`make install`); everything runs at tiny sizes
#      on the CPU, the GPU tests are reported as skipped.
# GPU_CHECK_PYTHON skips the choice. GPU_CHECK_TIMEOUT (default 480 s) bounds the whole run; the JSON is
# printed even when a section fails or the run is killed. Exit status 0 only when every section passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 \
    PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.whl}
TIMEOUT=${GPU_CHECK_TIMEOUT:-480}
REPORT=${GPU_CHECK_OUT:-${OUT:+$OUT/gpu_check.json}}
REPORT=${REPORT:-gpu_check.json}
started=$SECONDS

log() { echo "gpu-check: $*" >&2; }
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
index_reachable() { timeout 20 "$PYTHON" -m pip index versions pip >/dev/null 2>&1; }

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    py=$GPU_CHECK_PYTHON
    source="GPU_CHECK_PYTHON"
elif command -v "$PYTHON" >/dev/null && has_cuda "$PYTHON"; then
    py=$(command -v "$PYTHON")
    source="$py with its CUDA torch"
    mapfile -t wheels < <("$py" -m tests.benchmarks.gpu_check --pick-wheels "$WHEELS")
    if ((${#wheels[@]})); then
        site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
        if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${wheels[@]}" >&2; then
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            source+=", ${#wheels[@]} wheels from $WHEELS: $(basename -a "${wheels[@]}" | tr '\n' ' ')"
        else
            source+=", installing the wheels from $WHEELS failed"
        fi
    elif ! "$py" -c 'import fastapi, pydantic_settings, uvicorn' 2>/dev/null; then
        source+=", without fastapi/pydantic-settings/uvicorn (no wheels in $WHEELS: run make gpu-wheels)"
    fi
elif has_gpu && index_reachable; then
    py=.venv-gpu/bin/python
    source=".venv-gpu from the package index"
    [ -x "$py" ] || "$PYTHON" -m venv .venv-gpu
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        torch_pin=$(grep -i '^torch==' requirements.lock)
        "$py" -m pip install -q --index-url "$TORCH_INDEX_URL" "$torch_pin" >&2
    fi
    "$py" -m pip install -q -r requirements.lock >&2 && "$py" -m pip install -q --no-deps -e . >&2
else
    make --no-print-directory install >&2
    py=.venv/bin/python
    source="project .venv"
fi
log "python: $py ($source)"
export GPU_CHECK_PYTHON_SOURCE="$source"

rm -f "$REPORT"
left=$((TIMEOUT - (SECONDS - started)))
timeout --preserve-status -k 10 "$left" "$py" -m tests.benchmarks.gpu_check --out "$REPORT" --budget $((left - 20))
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ] && [ "$rc" -ne 4 ]; then
    # Killed or crashed before printing: print what the finished sections left, or say why.
    log "gpu_check.py exited with status $rc"
    if [ -s "$REPORT" ]; then
        cat "$REPORT"
    else
        printf '{"gpu_check": 1, "complete": false, "ok": false, "error": "gpu_check.py exited with status %s before writing a report", "python_source": "%s"}\n' \
            "$rc" "${source//\"/}" | tee "$REPORT"
    fi
fi
[ "$rc" -eq 0 ]
