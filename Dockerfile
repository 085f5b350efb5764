# syntax=docker/dockerfile:1
# GPU image: serves /generate_lda the moment the container starts.
#   docker build -t model-diff .
#   docker run --gpus all -p 8000:8000 -e MODEL_AFTER_ID=... -e MODEL_BEFORE_ID=... model-diff
# With no model ids it serves the embedded demo pair.
#
# BASE_IMAGE: any Debian/Ubuntu image whose apt has python3 >= 3.11 (the CUDA runtime by default;
#   the local test build uses a debootstrapped Debian, see deploy/build_image.sh).
# TORCH_INDEX_URL: empty takes PyPI's torch, the CUDA 13.0 build on x86_64 (its CUDA libraries come
#   as pip packages; the host driver must be >= 580); a PyTorch index for an older CUDA suits older
#   drivers, the CPU index gives a small CPU-only image. The index is searched together with PyPI
#   (uv's unsafe-best-match): it also mirrors common packages at older versions than the lock's.
# The two published variants (.github/workflows/docker.yml), built from this file by arguments only:
#   :latest  defaults: CUDA 13.0 base and PyPI's torch; driver >= 580; Turing (sm_75) to Blackwell
#   :cu126   torch 2.13's CUDA 12 build; driver >= 525 (Maxwell to Hopper, no Blackwell):
#     docker build -t model-diff:cu126 --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   The nvidia/cuda bases set NVIDIA_REQUIRE_CUDA, which the NVIDIA container runtime checks before
#   starting the container; it admits some older driver branches (535, 550) that torch cannot use
#   with CUDA 13, so the server checks again at start (app/gpu_probe.py) and refuses with the reason.
# UV_EXTRA_ARGS: passed to both `uv pip install` steps (e.g. --find-links for local wheels,
#   --system-certs behind a TLS-intercepting proxy).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ARG UV_EXTRA_ARGS=""
ARG UV_VERSION=0.13.9

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_LINK_MODE=copy \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/workspace/data \
    HF_HOME=/workspace/hf \
    SERVER_USER=app

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python, sshd (only started when PUBLIC_KEY is set) and certificates. Versions come with the base
# image's release; pinning them would break every time the mirror moves.
# The host keys the openssh-server install generates go in the same layer: kept, every container
# from the image would share them and anyone who pulls it would hold their private halves.
# start.sh generates each container's own key on its first start.
# The server runs as `app` (uid/gid 1000; Ubuntu bases already hold uid 1000 as `ubuntu`, removed
# first): start.sh starts as root, because sshd needs root, and drops to it with setpriv
# (util-linux, in every Debian/Ubuntu base) before exec'ing the server.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates openssh-server \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/ssh/ssh_host_* \
    && mkdir -p /run/sshd /workspace \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash app \
    && mkdir -p /workspace/data /workspace/hf \
    && chown -R app:app /workspace \
    && setpriv --version \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /srv
# The locked dependencies in their own cached layer, before the source: editing code does not
# reinstall torch, and the uv cache mount keeps wheels across rebuilds.
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL" --index-strategy unsafe-best-match} \
        ${UV_EXTRA_ARGS} -r requirements.lock \
    && python -c 'import torch; print("installed torch", torch.__version__, "for CUDA", torch.version.cuda)'

COPY pyproject.toml README.md start.sh ./
COPY deploy/vast/onstart.sh ./vast-onstart.sh
COPY app ./app
COPY lda ./lda
COPY amplification ./amplification
COPY weightdiff ./weightdiff
RUN uv pip install --python /opt/venv/bin/python --no-deps --no-cache ${UV_EXTRA_ARGS} . \
    && chmod +x /srv/start.sh /srv/vast-onstart.sh

# 8000: the HTTP API; 22: ssh when PUBLIC_KEY is set.
EXPOSE 8000 22
VOLUME ["/workspace"]
# Loading a 7B pair from a cold volume takes minutes; the start period keeps the container from
# being marked unhealthy meanwhile (/health answers during loading; /ready only once loaded).
# Exec form (hadolint DL3025): no shell, so the probe reads PORT from the container's environment
# itself, the same variable the shell form saw.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; port = os.environ.get('PORT', '8000'); urllib.request.urlopen('http://127.0.0.1:' + port + '/health', timeout=4)"]
ENTRYPOINT ["/srv/start.sh"]
