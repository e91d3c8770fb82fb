# Entry points for people and CI; each sets up what it needs first.
#   make run     install (if needed), run the whole pipeline on the embedded synthetic data
#                (dvc repro: synth → prepare → train → evaluate → tune → pareto → register),
#                then print what it produced
#   make test    install (if needed), the system packages the tests use as services (Chromium,
#                PostgreSQL; infra/dev/test-services.sh), lint, run the test suite (what CI runs)
#   make bench   the benchmarks at full size (minutes on a 2-core CPU)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install services run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/dynroute report

lint: $(STAMP)
	$(BIN)/ruff check .

services:
	bash infra/dev/test-services.sh

test: services lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/dynamic_inference.py
	$(BIN)/python benchmarks/data_loader.py
	$(BIN)/python benchmarks/warm_start.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
