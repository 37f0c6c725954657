# imgclf — the two commands: `make run` and `make test`. Everything else is optional.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

# Telemetry and update checks off, whatever the user's own settings are.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1

.PHONY: help venv run test test-fast bench ui lock clean chromium

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)  ## create .venv from requirements.lock (done by run/test when needed)

run: $(STAMP)  ## one retraining run of the whole flow (ARGS="--set train.epochs=5" to override)
	$(BIN)/imgclf run $(ARGS)

test: $(STAMP) chromium  ## the whole test suite, offline
	$(BIN)/python -m pytest $(ARGS)

chromium:  ## headless Chromium for the report screenshot test (installed with apt-get when missing)
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

test-fast: $(STAMP) chromium  ## unit tests only (skips the end-to-end flow runs)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

bench: $(STAMP)  ## benchmarks: printed and written to bench/results/
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:5000 with the project's store
	$(BIN)/imgclf ui

lock:  ## re-pin requirements.lock from the current .venv
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v '^pip==' > requirements.lock.new
	@mv requirements.lock.new requirements.lock

clean:  ## remove run outputs (not your data source, not the venv)
	rm -rf data/raw data/splits data/manifest.csv data/ingest.json models/candidate reports
