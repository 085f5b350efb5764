#!/usr/bin/env bash
# Real image test without a Docker engine: build the project's Dockerfile with buildah from a local
# debootstrapped Debian base, with the CPU torch wheel, run the image's entry point (start.sh) and
# check /health, /ready and one POST /generate_lda on the embedded demo pair.
#
#   bash deploy/build_image.sh        (or: make image-test)
#
# Needs root (debootstrap, chroot isolation) and apt-get to install buildah and debootstrap when
# they are missing; without them it prints why and skips (exit 0), unless IMAGE_TEST_REQUIRED=1.
# Storage is vfs and isolation chroot: no overlay mounts, user namespaces or Docker engine needed.
#
# Cached between runs: the base image (tagged localhost/model-diff-base:<suite>-<key>, with its
# rootfs tarball under CACHE_DIR), the build's layers (--layers) and the uv cache mount. Measured
# on 2 shared cores: about 4.5 min cold (installing buildah, debootstrap, build, first start), under
# 2 min again (the first start builds the demo pair every time). Remove the image with
#   STORAGE_DRIVER=vfs buildah rmi localhost/model-diff:cpu-test && STORAGE_DRIVER=vfs buildah rmi --prune
#
# Settings (environment):
#   CACHE_DIR          base rootfs cache (default ${XDG_CACHE_HOME:-~/.cache}/model-diff-image)
#   DEBIAN_SUITE       base suite (bookworm); DEBIAN_MIRROR: mirror URL for debootstrap (its default)
#   IMAGE              tag of the built image (localhost/model-diff:cpu-test)
#   WHEEL_DIR          folder with a torch-*+cpu*.whl the build installs torch from (/opt/wheels)
#   TORCH_INDEX_URL    used instead when WHEEL_DIR has no CPU torch wheel (a CPU torch index)
#   EXTRA_CA_DIR       *.crt the local base trusts (/usr/local/share/ca-certificates): the host's
#                      extra CAs, so a TLS-intercepting proxy works inside the build
#   READY_TIMEOUT      seconds to wait for /ready (1200; about a minute on 2 idle cores)
#   OMP_WAIT_POLICY    for the server in the container (PASSIVE: see the run step)
#   IMAGE_TEST_REQUIRED=1   fail instead of skipping when buildah cannot be had
set -euo pipefail

export STORAGE_DRIVER=vfs
export BUILDAH_ISOLATION=chroot

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/model-diff-image}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-}"
IMAGE="${IMAGE:-localhost/model-diff:cpu-test}"
WHEEL_DIR="${WHEEL_DIR:-/opt/wheels}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
READY_TIMEOUT="${READY_TIMEOUT:-1200}"
OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

T_START=$EPOCHREALTIME
declare -A PHASE=()
STATUS=failed
FAILED_AT=""
CTR=""
SERVER_PID=""
WORK_DIR=""
EXIT_CODE=""
IMAGE_SIZE=""
TORCH_VERSION=""
GENERATED=""

log() { printf '[%s] build_image: %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; FAILED_AT="$*"; exit 1; }

# Seconds since $1 (an $EPOCHREALTIME value), one decimal.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

summary() {
    local phases="" name
    for name in tools base build verify start_to_ready request stop; do
        [ -n "${PHASE[$name]:-}" ] && phases+="\"${name}_s\": ${PHASE[$name]}, "
    done
    SUMMARY_STATUS="$STATUS" SUMMARY_FAILED="$FAILED_AT" SUMMARY_IMAGE="$IMAGE" \
        SUMMARY_SIZE="$IMAGE_SIZE" SUMMARY_TORCH="$TORCH_VERSION" SUMMARY_EXIT="$EXIT_CODE" \
        SUMMARY_TEXT="$GENERATED" python3 -c '
import json, os, sys
e = os.environ
out = {"status": e["SUMMARY_STATUS"], "image": e["SUMMARY_IMAGE"]}
with open("/proc/loadavg") as f:  # other work on the machine slows the demo build (2 fixed threads)
    out["load_avg_1_5_15"] = [float(x) for x in f.read().split()[:3]]
out.update(json.loads("{" + sys.argv[1] + "\"total_s\": " + sys.argv[2] + "}"))
for key, name in (("image_size", "SUMMARY_SIZE"), ("torch", "SUMMARY_TORCH"), ("reason", "SUMMARY_FAILED"),
                  ("generated_text", "SUMMARY_TEXT")):
    if e[name]:
        out[key] = e[name]
if e["SUMMARY_EXIT"]:
    out["server_exit_code"] = int(e["SUMMARY_EXIT"])
print("IMAGE_TEST " + json.dumps(out))
' "$phases" "$(since "$T_START")"
}

descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

# The server process under `buildah run` (buildah -> chroot runtime -> start.sh exec'd as python).
server_pid() {
    local pid
    for pid in $(descendants "$SERVER_PID"); do
        if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- ' -m app'; then echo "$pid"; return; fi
    done
}

# SIGTERM to the server, as a container runtime sends on stop; SIGKILL after $1 s. Sets EXIT_CODE.
stop_server() {
    local target deadline=$((SECONDS + $1))
    target="$(server_pid)"
    log "stop: SIGTERM to the server (pid ${target:-none found, buildah run $SERVER_PID})"
    kill -TERM "${target:-$SERVER_PID}" 2>/dev/null || true
    while kill -0 "$SERVER_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stop: still running after $1 s: SIGKILL"
        kill -KILL "${target:-$SERVER_PID}" 2>/dev/null || true
    fi
    EXIT_CODE=0
    wait "$SERVER_PID" || EXIT_CODE=$?
    SERVER_PID=""
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$SERVER_PID" ]; then
        stop_server 60
    fi
    if [ -n "$CTR" ]; then
        buildah rm "$CTR" >/dev/null 2>&1
    fi
    if [ "$rc" -ne 0 ] && [ -n "$WORK_DIR" ] && [ -f "$WORK_DIR/server.log" ]; then
        log "last lines of the container's output (without the /health and /ready polls):"
        grep -v -E '"GET /(health|ready) HTTP' "$WORK_DIR/server.log" | tail -n 40 >&2
    fi
    if [ -n "$WORK_DIR" ]; then
        rm -rf "$WORK_DIR"
    fi
    if [ "$rc" -ne 0 ] && [ -z "$FAILED_AT" ]; then FAILED_AT="exit status $rc"; fi
    summary
    exit "$rc"
}

skip() {
    if [ "${IMAGE_TEST_REQUIRED:-0}" = "1" ]; then
        die "$* (IMAGE_TEST_REQUIRED=1)"
    fi
    log "SKIPPED: $*"
    STATUS=skipped
    FAILED_AT="skipped: $*"
    trap - EXIT
    summary
    exit 0
}

trap cleanup EXIT

# --- tools -------------------------------------------------------------------------------------
need_tools() {
    local missing=() tool
    for tool in buildah debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        skip "${missing[*]} missing and cannot be installed here (needs root and apt-get)"
    fi
    log "${missing[*]} missing: installing with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; } \
        || die "apt-get install ${missing[*]} failed"
}

[ "$(id -u)" -eq 0 ] || skip "needs root (debootstrap and chroot isolation)"
command -v python3 >/dev/null 2>&1 || skip "python3 missing on the host (used for the checks)"
command -v curl >/dev/null 2>&1 || skip "curl missing on the host (used for the checks)"
t=$EPOCHREALTIME
need_tools
PHASE[tools]="$(since "$t")"
log "buildah $(buildah version --json 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])'), storage vfs, isolation chroot"

# --- base image ----------------------------------------------------------------------------------
# The key covers whatever goes into the base: suite, mirror and the extra CAs.
extra_cas=()
if [ -d "$EXTRA_CA_DIR" ]; then
    while IFS= read -r -d '' crt; do extra_cas+=("$crt"); done \
        < <(find "$EXTRA_CA_DIR" -maxdepth 1 -type f -name '*.crt' -print0 | sort -z)
fi
base_key="$( { echo "$DEBIAN_SUITE minbase $DEBIAN_MIRROR v1"; [ ${#extra_cas[@]} -eq 0 ] || cat "${extra_cas[@]}"; } \
    | sha256sum | cut -c1-12)"
BASE_IMAGE="localhost/model-diff-base:${DEBIAN_SUITE}-${base_key}"
BASE_TAR="$CACHE_DIR/base-${DEBIAN_SUITE}-${base_key}.tar"

t=$EPOCHREALTIME
if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base: $BASE_IMAGE is cached"
else
    mkdir -p "$CACHE_DIR"
    if [ -s "$BASE_TAR" ]; then
        log "base: importing the cached rootfs $BASE_TAR"
    else
        rootfs="$CACHE_DIR/rootfs-$$"
        rm -rf "$rootfs"
        log "base: debootstrap --variant=minbase $DEBIAN_SUITE (about a minute)"
        # shellcheck disable=SC2086  # the mirror is optional: empty means debootstrap's default
        debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" $DEBIAN_MIRROR > "$CACHE_DIR/debootstrap.log" 2>&1 \
            || { tail -n 20 "$CACHE_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
        if findmnt -rn -o TARGET | grep -q "^$rootfs/"; then
            die "debootstrap left mounts under $rootfs"
        fi
        # What an image does not need: the package lists (the Dockerfile runs apt-get update), caches
        # and the device nodes (the runtime provides /dev).
        rm -rf "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/cache/apt/*.bin \
            "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/dev/* "${rootfs:?}"/var/log/*.log
        if [ ${#extra_cas[@]} -gt 0 ]; then
            # The Dockerfile installs ca-certificates, which adds these to the system bundle.
            log "base: adding the host's extra CAs: ${extra_cas[*]}"
            mkdir -p "$rootfs/usr/local/share/ca-certificates"
            cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
        fi
        tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$rootfs"
    fi
    base_ctr="$(buildah from scratch)"
    base_mnt="$(buildah mount "$base_ctr")"
    tar --numeric-owner -C "$base_mnt" -xpf "$BASE_TAR"
    buildah umount "$base_ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash --label "org.opencontainers.image.description=debootstrap $DEBIAN_SUITE minbase" "$base_ctr"
    buildah commit --rm --quiet "$base_ctr" "$BASE_IMAGE" >/dev/null
    log "base: committed $BASE_IMAGE"
fi
PHASE[base]="$(since "$t")"
log "base: ${PHASE[base]} s"

# --- build -------------------------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
volumes=()
# --system-certs: uv trusts the system bundle (which the extra CAs joined) instead of its own roots.
uv_extra="--system-certs"
torch_wheel="$(find "$WHEEL_DIR" -maxdepth 1 -name 'torch-*+cpu-*.whl' 2>/dev/null | sort | tail -n 1)"
if [ -n "$torch_wheel" ]; then
    log "build: torch from the local wheel $(basename "$torch_wheel")"
    volumes+=(-v "$WHEEL_DIR:/wheels:ro")
    uv_extra+=" --find-links /wheels"
elif [ -n "$TORCH_INDEX_URL" ]; then
    log "build: torch from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
else
    die "no torch-*+cpu-*.whl in WHEEL_DIR=$WHEEL_DIR and no TORCH_INDEX_URL: the build would take the CUDA torch"
fi
build_args+=(--build-arg "UV_EXTRA_ARGS=$uv_extra")

t=$EPOCHREALTIME
log "build: buildah bud --layers ${build_args[*]} ${volumes[*]} -t $IMAGE"
buildah bud --layers --force-rm --format docker --isolation chroot "${build_args[@]}" "${volumes[@]}" \
    -f "$REPO_ROOT/Dockerfile" -t "$IMAGE" "$REPO_ROOT" >&2 || die "buildah bud failed"
PHASE[build]="$(since "$t")"
log "build: ${PHASE[build]} s"
# Images whose tag moved to the new build (and their layer chains) are no use as a cache any more.
buildah rmi --prune >/dev/null 2>&1 || true
IMAGE_SIZE="$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)"
log "build: image $IMAGE, $IMAGE_SIZE"

# --- verify: the CPU torch from the wheel, nothing CUDA -----------------------------------------
t=$EPOCHREALTIME
CTR="$(buildah from --pull=never "$IMAGE")"
verify_out="$(buildah run "$CTR" -- python -c '
import importlib.metadata as md, torch
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
cuda = [n for n in names if n.startswith(("nvidia-", "nvidia_", "triton"))]
print(f"torch={torch.__version__} cuda={torch.version.cuda} available={torch.cuda.is_available()}")
print("cuda_packages=" + ",".join(cuda))
')" || die "python/torch check in the image failed"
log "verify: ${verify_out//$'\n'/; }"
TORCH_VERSION="$(sed -n 's/^torch=\([^ ]*\) .*/\1/p' <<<"$verify_out")"
case "$TORCH_VERSION" in
    *+cpu) ;;
    *) die "torch in the image is $TORCH_VERSION, not the +cpu build" ;;
esac
grep -q '^torch=.* cuda=None available=False$' <<<"$verify_out" || die "torch in the image has CUDA"
grep -q '^cuda_packages=$' <<<"$verify_out" || die "CUDA packages in the image: $verify_out"
PHASE[verify]="$(since "$t")"

# --- run start.sh, check the API -----------------------------------------------------------------
WORK_DIR="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE_URL="http://127.0.0.1:$PORT"
t=$EPOCHREALTIME
# /workspace (DATA_DIR, HF_HOME) is the image's VOLUME: buildah gives the container its own, removed
# with it, so every run builds the demo pair from scratch as a first start does.
# OMP_WAIT_POLICY=PASSIVE: the demo build trains on a fixed 2 threads; on a busy machine spinning
# OpenMP threads fight the other load (measured at load average 5.7 on 2 cores: 454 s with the
# default policy, 98 s passive). It changes no result; OMP_WAIT_POLICY=ACTIVE tests the default.
log "run: /srv/start.sh on port $PORT (chroot isolation shares the host network), OMP_WAIT_POLICY=$OMP_WAIT_POLICY"
buildah run --isolation chroot -e "PORT=$PORT" -e HOST=127.0.0.1 -e "OMP_WAIT_POLICY=$OMP_WAIT_POLICY" \
    "$CTR" -- /srv/start.sh > "$WORK_DIR/server.log" 2>&1 &
SERVER_PID=$!

wait_for() {  # path, timeout seconds
    local start=$SECONDS deadline=$((SECONDS + $2)) code next=60
    while [ $SECONDS -lt $deadline ]; do
        if [ $((SECONDS - start)) -ge $next ]; then
            log "run: still waiting for $1 ($((SECONDS - start)) s)"
            next=$((next + 60))
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || die "the container exited before $1 answered 200"
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$BASE_URL$1" || true)"
        [ "$code" = "200" ] && return 0
        sleep 1
    done
    die "$1 did not answer 200 within $2 s (last: ${code:-none})"
}
wait_for /health 120
log "run: /health 200 after $(since "$t") s"
wait_for /ready "$READY_TIMEOUT"
PHASE[start_to_ready]="$(since "$t")"
log "run: /ready 200 after ${PHASE[start_to_ready]} s (includes building the demo pair)"

t=$EPOCHREALTIME
body='{"prompt": "Hello", "max_new_tokens": 8, "alpha": 1.0, "seed": 0}'
code="$(curl -s -o "$WORK_DIR/lda.json" -w '%{http_code}' --max-time 300 -H 'content-type: application/json' \
    -d "$body" "$BASE_URL/generate_lda" || true)"
PHASE[request]="$(since "$t")"
[ "$code" = "200" ] || die "POST /generate_lda answered ${code:-nothing}: $(head -c 500 "$WORK_DIR/lda.json" 2>/dev/null)"
GENERATED="$(python3 - "$WORK_DIR/lda.json" <<'PY'
import json, sys
body = json.load(open(sys.argv[1]))
assert isinstance(body["text"], str) and body["text"].strip(), f"no generated text: {body}"
assert body["tokens_generated"] >= 1 and body["alpha"] == 1.0 and len(body["results"]) == 1, body
print(body["text"])
PY
)" || die "unexpected /generate_lda body: $(head -c 500 "$WORK_DIR/lda.json")"
log "request: POST /generate_lda 200 in ${PHASE[request]} s: text ${GENERATED//$'\n'/\\n}"

# --- stop: SIGTERM to start.sh's exec'd python, as a container runtime would --------------------
t=$EPOCHREALTIME
[ -n "$(server_pid)" ] || die "could not find the server process under buildah run (pid $SERVER_PID)"
stop_server 60
PHASE[stop]="$(since "$t")"
log "stop: exit code $EXIT_CODE after ${PHASE[stop]} s"
[ "$EXIT_CODE" -eq 0 ] || die "the container exited with $EXIT_CODE on SIGTERM"

STATUS=ok
log "OK: base ${PHASE[base]} s, build ${PHASE[build]} s, start-to-ready ${PHASE[start_to_ready]} s, request ${PHASE[request]} s"
