# make/spec.mk: checks and bundling of the OpenAPI document (openapi/).
#
# Included by the main Makefile; also usable alone: `make -f make/spec.mk lint-spec`.
# Every variable has a default and can be overridden from the command line or
# from the including Makefile (set it before the `include`).

VENV      ?= .venv
NPM_DIR   ?= tools/npm
NPM_BIN   ?= $(NPM_DIR)/node_modules/.bin
OPENAPI_SPEC ?= openapi/openapi.yaml
OPENAPI_BUNDLE ?= build/openapi.yaml
# The OpenAPI 3.2 edition of the bundle (scripts/openapi32.py), as `make generate` writes it to generated/.
OPENAPI_32_BUNDLE ?= build/openapi-3.2.yaml

# npm writes this file on every install; it is our "tools are installed" stamp.
NPM_STAMP := $(NPM_DIR)/node_modules/.package-lock.json

# Redocly: no telemetry (CI, offline machines).
SPEC_ENV := REDOCLY_TELEMETRY=off
# Redocly 2.77 prints a framed "Node.js 20 support is ending" banner on every run
# under Node 20; this filter drops its lines (box-drawing characters) from the output.
SPEC_BANNER_FILTER := grep -v '[║╔╚]'

.PHONY: npm-tools bundle bundle-3.2 lint-spec

npm-tools: $(NPM_STAMP) ## Install the pinned Node spec tools (redocly, spectral) into tools/npm

# Reinstall when node_modules is missing or package(-lock).json is newer than it.
# --ignore-scripts: neither tool needs an install script (only an analytics one exists).
$(NPM_STAMP): $(NPM_DIR)/package-lock.json $(NPM_DIR)/package.json
	npm ci --prefix $(NPM_DIR) --ignore-scripts --no-audit --no-fund
	@touch $@

bundle: npm-tools ## Bundle openapi/ into build/openapi.yaml (single file for codegen, docs, clients)
	@mkdir -p $(dir $(OPENAPI_BUNDLE))
	@echo "$(SPEC_ENV) $(NPM_BIN)/redocly bundle $(OPENAPI_SPEC) -o $(OPENAPI_BUNDLE)"
	@out="$$($(SPEC_ENV) $(NPM_BIN)/redocly bundle $(OPENAPI_SPEC) -o $(OPENAPI_BUNDLE) 2>&1)"; rc=$$?; \
	  printf '%s\n' "$$out" | $(SPEC_BANNER_FILTER); exit $$rc

# The 3.2 edition of the current bundle, so that lint-spec checks what openapi/ gives now, before
# `make generate` copies it to generated/ (`make check-generated` compares the two).
bundle-3.2: bundle ## Derive the OpenAPI 3.2 edition of the bundle into build/openapi-3.2.yaml
	$(VENV)/bin/python -m scripts.openapi32 --source $(OPENAPI_BUNDLE) --output $(OPENAPI_32_BUNDLE)

# redocly lint of $(1) (recommended-strict, see redocly.yaml): it exits 0 when it only found
# warnings, so its output is checked for a warning count as well.
define redocly_lint
	@echo "$(SPEC_ENV) $(NPM_BIN)/redocly lint --lint-config error --max-problems 1000 --format stylish $(1)"
	@out="$$($(SPEC_ENV) $(NPM_BIN)/redocly lint --lint-config error --max-problems 1000 --format stylish $(1) 2>&1)"; rc=$$?; \
	  printf '%s\n' "$$out" | $(SPEC_BANNER_FILTER); \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	  if printf '%s\n' "$$out" | grep -Eq 'You have [0-9]+ warnings?'; then \
	    echo "redocly lint: warnings are not allowed" >&2; exit 1; fi
endef

# Each checker must report 0 errors and 0 warnings:
# - openapi-spec-validator: structure and $refs of the split document (and of the bundle);
# - redocly lint (recommended-strict, see redocly.yaml; `redocly_lint` above);
# - spectral (spectral:oas, see .spectral.yaml) on the bundle: Spectral 6.16.3
#   misreports every `$ref`-ed path item of a split 3.1 document as an oas3-schema
#   error (https://github.com/stoplightio/spectral/issues/2655) and reports components
#   used only from other files as unused; the bundle has the same content with internal refs only.
# The 3.2 edition goes through the same three, each as 3.2: openapi-spec-validator's 3.2 schema
# (--schema 3.2, not the version it would detect), and Redocly 2.77 and Spectral 6.16.3 both know
# 3.2 (Redocly's oas3_2 types, Spectral's oas3_2 format with the 3.2 schema in oas3-schema): each
# refuses the 3.2 fields (itemSchema, tag kind/parent/summary) under `openapi: 3.1.0`.
lint-spec: npm-tools bundle bundle-3.2 ## Validate and lint the OpenAPI document and its 3.2 edition (0 errors and 0 warnings required)
	$(VENV)/bin/openapi-spec-validator --validation-errors all $(OPENAPI_SPEC)
	$(VENV)/bin/openapi-spec-validator --validation-errors all $(OPENAPI_BUNDLE)
	$(VENV)/bin/openapi-spec-validator --schema 3.2 --validation-errors all $(OPENAPI_32_BUNDLE)
	$(call redocly_lint,$(OPENAPI_SPEC))
	$(call redocly_lint,$(OPENAPI_32_BUNDLE))
	$(NPM_BIN)/spectral lint --ruleset .spectral.yaml --fail-severity=warn $(OPENAPI_BUNDLE)
	$(NPM_BIN)/spectral lint --ruleset .spectral.yaml --fail-severity=warn $(OPENAPI_32_BUNDLE)
