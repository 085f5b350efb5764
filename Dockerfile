# syntax=docker/dockerfile:1
# GPU image: serves /generate_lda the moment the container starts.
#   docker build -t model-diff .
#   docker run --gpus all -p 8000:8000 -e MODEL_AFTER_ID=... -e MODEL_BEFORE_ID=... model-diff
# With no model ids it serves the embedded demo pair.
#
# BASE_IMAGE: any Debian/Ubuntu image whose apt has python3 >= 3.11 (the CUDA runtime by default;
#   the local test build uses a debootstrapped Debian, see deploy/build_image.sh).
# TORCH_INDEX_URL: empty takes PyPI's torch, the CUDA 13 build on x86_64 (its CUDA libraries come
#   as pip packages; the host driver must support CUDA 13, i.e. >= 580); a PyTorch index for an
#   older CUDA suits older drivers, the CPU index gives a small CPU-only image. UV_EXTRA_ARGS: passed to both `uv pip install` steps (e.g. --find-links for local
#   wheels, --system-certs behind a TLS-intercepting proxy).
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
    HF_HOME=/workspace/hf

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python, sshd (only started when PUBLIC_KEY is set) and certificates. Versions come with the base
# image's release; pinning them would break every time the mirror moves.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates openssh-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd /workspace \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /srv
# The locked dependencies in their own cached layer, before the source: editing code does not
# reinstall torch, and the uv cache mount keeps wheels across rebuilds.
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${UV_EXTRA_ARGS} -r requirements.lock

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
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8000\")}/health', timeout=4)"
ENTRYPOINT ["/srv/start.sh"]
