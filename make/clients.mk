# make/clients.mk: API clients generated from the bundled document, compiled, and smoke-tested live.
#
# Included by the main Makefile after make/spec.mk (it uses spec.mk's `bundle`); also usable alone:
# `make -f make/clients.mk clients` (then it includes spec.mk itself). Generated code goes to
# build/clients/ and is never committed; the generators are pinned in clients/package-lock.json
# (openapi-typescript, openapi-fetch, typescript) and clients/requirements.txt (openapi-python-client,
# openapi-generator-cli: its PyPI wheel bundles the jar and runs offline on Java 17).
#
#   make clients        bundle -> generate TypeScript, Python and Go clients -> compile each
#   make clients-smoke  run the three smoke programs against a live server:
#                         BASE_URL=http://127.0.0.1:8000/api/v1 API_TOKEN=... \
#                         SMOKE_WORKFLOW_ID=... SMOKE_RUN_ID=...   (an open AgentConversation run)
#                         [SMOKE_CLOSED_WORKFLOW_ID=... SMOKE_CLOSED_RUN_ID=...]   (a closed run)
#
# Every variable has a default and can be overridden (command line or the including Makefile).

ifeq ($(origin SPEC_BANNER_FILTER),undefined)
include $(dir $(lastword $(MAKEFILE_LIST)))spec.mk
endif

VENV            ?= .venv
OPENAPI_BUNDLE  ?= build/openapi.yaml
CLIENTS_SRC     ?= clients
CLIENTS_OUT     ?= build/clients
CLIENTS_PYTHON  ?= python3.11
CLIENTS_GEN_VENV ?= $(CLIENTS_SRC)/.venv-gen
CLIENTS_NPM_BIN := $(CLIENTS_SRC)/node_modules/.bin
CLIENTS_NPM_STAMP := $(CLIENTS_SRC)/node_modules/.package-lock.json
CLIENTS_GEN_STAMP := $(CLIENTS_GEN_VENV)/.installed
# The Python client's package name (build/clients/python/<name>, imported with PYTHONPATH=build/clients/python).
CLIENTS_PY_PACKAGE ?= workflow_runs_client
# Go: only the standard library is needed, so no module download is allowed; GOTOOLCHAIN=local stops
# Go >= 1.21 from fetching the newer toolchain the generated go.mod asks for (the code builds on 1.19).
CLIENTS_GO_ENV  := GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod
CLIENTS_GO_MODULE := example.invalid/workflow-runs/client-go

# openapi-generator (Go) options. The document needs no workaround (every integer has a `format`, no
# schema name is another's `New...` constructor); one option remains, for Go itself:
# - enumClassPrefix: Go enum constants are package-level names, and two values are rightly shared by
#   two enums each (`truncated`: StreamControlReason and StreamControlEventType; `PAUSED`:
#   WorkflowRunStatus and PendingActivityState, as Temporal names them). Without the prefix each pair
#   becomes one constant (TRUNCATED, PAUSED) and the package does not compile.
CLIENTS_GO_OPTS := -g go --package-name workflowruns \
  --git-host example.invalid --git-user-id workflow-runs --git-repo-id client-go \
  --additional-properties=enumClassPrefix=true,withGoMod=true \
  --global-property apiTests=false,modelTests=false,apiDocs=false,modelDocs=false

.PHONY: clients clients-deps clients-ts clients-python clients-go clients-smoke clients-clean

# npm writes node_modules/.package-lock.json on every install: the "installed" stamp.
# --ignore-scripts: none of these packages needs an install script.
$(CLIENTS_NPM_STAMP): $(CLIENTS_SRC)/package.json $(CLIENTS_SRC)/package-lock.json
	npm ci --prefix $(CLIENTS_SRC) --ignore-scripts --no-audit --no-fund
	@touch $@

# The generators' own venv, apart from the project's .venv (their dependencies would clash with it).
$(CLIENTS_GEN_STAMP): $(CLIENTS_SRC)/requirements.txt
	test -x $(CLIENTS_GEN_VENV)/bin/python || $(CLIENTS_PYTHON) -m venv $(CLIENTS_GEN_VENV)
	$(CLIENTS_GEN_VENV)/bin/pip install --quiet --disable-pip-version-check -r $(CLIENTS_SRC)/requirements.txt
	touch $@

clients-deps: $(CLIENTS_NPM_STAMP) $(CLIENTS_GEN_STAMP) ## Install the pinned client generators, Java and Go (Debian) if missing
	@command -v java >/dev/null || { echo "installing Debian's default-jre-headless (openapi-generator needs Java)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless; }
	@command -v go >/dev/null || { echo "installing Debian's golang-go (compiler of the Go client)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go; }

clients: clients-ts clients-python clients-go ## Generate the TypeScript, Python and Go clients from the bundle into build/clients and compile them
	@echo "clients: TypeScript, Python and Go clients generated and compiled in $(CLIENTS_OUT)/"

# TypeScript: openapi-typescript types + openapi-fetch; it runs in the output folder because in the root it
# would read the project's redocly.yaml, whose `apis` entry it takes for a multi-schema setup and refuses.
# tsc --strict checks the generated schema.d.ts
# together with the smoke program and emits dist/smoke.js (ESM, resolving openapi-fetch through the
# node_modules link).
clients-ts: bundle clients-deps
	rm -rf $(CLIENTS_OUT)/ts && mkdir -p $(CLIENTS_OUT)/ts
	cd $(CLIENTS_OUT)/ts && $(abspath $(CLIENTS_NPM_BIN))/openapi-typescript $(abspath $(OPENAPI_BUNDLE)) -o schema.d.ts
	echo '{"type": "module", "private": true}' > $(CLIENTS_OUT)/ts/package.json
	ln -sfn $(abspath $(CLIENTS_SRC))/node_modules $(CLIENTS_OUT)/ts/node_modules
	$(CLIENTS_NPM_BIN)/tsc --strict -p $(CLIENTS_SRC)/ts

# Python: openapi-python-client (its ruff post-hooks run from the generators' venv); then every module is
# imported, and the smoke program is type-checked (mypy --strict) against the generated package.
clients-python: bundle clients-deps
	rm -rf $(CLIENTS_OUT)/python && mkdir -p $(CLIENTS_OUT)/python
	PATH="$(abspath $(CLIENTS_GEN_VENV))/bin:$$PATH" $(CLIENTS_GEN_VENV)/bin/openapi-python-client generate \
	  --path $(OPENAPI_BUNDLE) --output-path $(CLIENTS_OUT)/python/$(CLIENTS_PY_PACKAGE) --meta none
	PYTHONPATH=$(CLIENTS_OUT)/python $(VENV)/bin/python -c 'import importlib, pkgutil, $(CLIENTS_PY_PACKAGE) as p; \
	  names = [m.name for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]; \
	  [importlib.import_module(n) for n in names]; print(f"imported {len(names)} modules of {p.__name__}")'
	MYPYPATH=$(CLIENTS_OUT)/python $(VENV)/bin/mypy --strict $(CLIENTS_SRC)/python/smoke.py

# Go: openapi-generator (PyPI wheel, offline); the smoke program joins the generated module as cmd/smoke.
clients-go: bundle clients-deps
	rm -rf $(CLIENTS_OUT)/go $(CLIENTS_OUT)/bin/go-smoke
	$(CLIENTS_GEN_VENV)/bin/openapi-generator-cli generate -i $(OPENAPI_BUNDLE) -o $(CLIENTS_OUT)/go $(CLIENTS_GO_OPTS) \
	  > $(CLIENTS_OUT)/openapi-generator-go.log 2>&1 || { cat $(CLIENTS_OUT)/openapi-generator-go.log; exit 1; }
	@grep -E 'WARN|ERROR' $(CLIENTS_OUT)/openapi-generator-go.log || true
	mkdir -p $(CLIENTS_OUT)/go/cmd/smoke && cp $(CLIENTS_SRC)/go/smoke/main.go $(CLIENTS_OUT)/go/cmd/smoke/main.go
	cd $(CLIENTS_OUT)/go && $(CLIENTS_GO_ENV) go mod edit -go=1.19 \
	  && $(CLIENTS_GO_ENV) go vet ./... && $(CLIENTS_GO_ENV) go build -o ../bin/go-smoke ./cmd/smoke

clients-smoke: ## Run the generated clients' smoke programs against BASE_URL (API_TOKEN, SMOKE_WORKFLOW_ID, SMOKE_RUN_ID)
	$(foreach v,BASE_URL API_TOKEN SMOKE_WORKFLOW_ID SMOKE_RUN_ID,$(if $($(v)),,$(error clients-smoke: $(v) is not set, see make/clients.mk)))
	node $(CLIENTS_OUT)/ts/dist/smoke.js
	PYTHONPATH=$(CLIENTS_OUT)/python $(VENV)/bin/python $(CLIENTS_SRC)/python/smoke.py
	$(CLIENTS_OUT)/bin/go-smoke

clients-clean: ## Remove the generated clients
	rm -rf $(CLIENTS_OUT)
