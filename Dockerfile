# GPU image: serves /generate_lda as soon as the container starts.
#   docker build -t lda-service .
#   docker run --gpus all -p 8000:8000 -e MODEL_AFTER_ID=... -e MODEL_BEFORE_ID=... lda-service
# With no model ids it serves the embedded demo pair.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/workspace/data \
    HF_HOME=/workspace/hf

WORKDIR /srv
# Dependencies first, in their own layer, so source edits do not reinstall torch.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md start.sh ./
COPY app ./app
COPY lda ./lda
COPY amplification ./amplification
COPY weightdiff ./weightdiff
RUN pip install --no-deps .

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health', timeout=4)"
ENTRYPOINT ["/srv/start.sh"]
