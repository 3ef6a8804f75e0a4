# Distributed CNN training pipeline: DVC + Ray Train + MLflow.
# `make help` lists the targets.

PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
UI_PORT     ?= 5000

# The stage commands in dvc.yaml call `python`: the venv's python must come first.
export PATH := $(abspath $(BIN)):$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint ui bench

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (idempotent; CONSTRAINTS=file to swap the torch build)

run: $(STAMP) ## run the whole pipeline (dvc repro) on the default data
	$(BIN)/dvc repro

test: $(STAMP) ## run the full test suite (what CI runs)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## run the tests that take seconds, not minutes
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff over the code
	$(BIN)/ruff check src pipeline tests bench

ui: $(STAMP) ## the MLflow UI on 127.0.0.1:5000 (UI_PORT=...) over the project store
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(UI_PORT) --workers 1

bench: $(STAMP) ## run the benchmarks and write BENCHMARKS.md
	$(BIN)/python -m bench.run
