# Workflow Runs API: every target a new engineer or CI needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
NPM_BIN ?= tools/npm/node_modules/.bin
export REDOCLY_TELEMETRY := off
export REDOCLY_SUPPRESS_UPDATE_NOTICE := true

.DEFAULT_GOAL := help
.PHONY: help install run test unit contract-test generate check-generated bundle docs lint lint-imports lint-spec typecheck format clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed npm-tools  ## create .venv with everything (idempotent)

include make/spec.mk make/docs.mk make/clients.mk make/browser.mk make/bench.mk make/fuzz.mk make/breaking.mk make/mock.mk

run: install  ## the API on the embedded stack (Temporal dev server, Redis, sample worker)
	$(BIN)/workflow-runs dev

test: install lint lint-imports typecheck lint-spec check-generated breaking browser-deps clients-deps  ## the whole suite (what CI runs)
	$(BIN)/pytest
	$(BIN)/python -m contract_tests.run
	$(BIN)/python -m contract_tests.run --mock

unit: install  ## only the tests that need no services
	$(BIN)/pytest tests/unit

generate: install bundle  ## regenerate generated/ (bundled document, its OpenAPI 3.2 edition, Pydantic models) from openapi/
	cp build/openapi.yaml generated/openapi.yaml
	printf '"""Written by `make generate` from openapi/: never edit by hand."""\n' > generated/__init__.py
	$(BIN)/datamodel-codegen --input generated/openapi.yaml --output generated/models.py
	$(BIN)/python -m scripts.openapi32 --source generated/openapi.yaml --output generated/openapi-3.2.yaml

check-generated: install bundle  ## fail when generated/ is stale
	@cmp -s build/openapi.yaml generated/openapi.yaml || { echo "generated/openapi.yaml is stale: run make generate"; exit 1; }
	$(BIN)/datamodel-codegen --input generated/openapi.yaml --output generated/models.py --check
	$(BIN)/python -m scripts.openapi32 --source generated/openapi.yaml --output generated/openapi-3.2.yaml --check

lint: install  ## ruff (lint + format check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The contracts are [tool.importlinter] in pyproject.toml; its cache goes to build/, which git ignores.
lint-imports: install  ## import-linter: the one-way layers of ARCHITECTURE.md (cli > web > handlers | backends > core)
	$(BIN)/lint-imports --no-logo --cache-dir build/import-linter

format: install  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install  ## mypy strict
	$(BIN)/mypy

contract-test: install  ## Schemathesis against a live server (BASE_URL if set, else one it starts)
	$(BIN)/python -m contract_tests.run

clean:  ## remove build output and the embedded stack's data
	rm -rf build .data .pytest_cache .mypy_cache .ruff_cache
