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

# npm writes this file on every install; it is our "tools are installed" stamp.
NPM_STAMP := $(NPM_DIR)/node_modules/.package-lock.json

# Redocly: no telemetry (CI, offline machines).
SPEC_ENV := REDOCLY_TELEMETRY=off
# Redocly 2.77 prints a framed "Node.js 20 support is ending" banner on every run
# under Node 20; this filter drops its lines (box-drawing characters) from the output.
SPEC_BANNER_FILTER := grep -v '[║╔╚]'

.PHONY: npm-tools bundle lint-spec

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

# Each checker must report 0 errors and 0 warnings:
# - openapi-spec-validator: structure and $refs of the split document (and of the bundle);
# - redocly lint (recommended-strict, see redocly.yaml): it exits 0 when it only
#   found warnings, so its output is checked for a warning count as well;
# - spectral (spectral:oas, see .spectral.yaml) on the bundle: Spectral 6.16.3
#   misreports every `$ref`-ed path item of a split 3.1 document as an oas3-schema
#   error (https://github.com/stoplightio/spectral/issues/2655) and reports components
#   used only from other files as unused; the bundle has the same content with internal refs only.
lint-spec: npm-tools bundle ## Validate and lint the OpenAPI document (0 errors and 0 warnings required)
	$(VENV)/bin/openapi-spec-validator --validation-errors all $(OPENAPI_SPEC)
	$(VENV)/bin/openapi-spec-validator --validation-errors all $(OPENAPI_BUNDLE)
	@echo "$(SPEC_ENV) $(NPM_BIN)/redocly lint --lint-config error --max-problems 1000 --format stylish $(OPENAPI_SPEC)"
	@out="$$($(SPEC_ENV) $(NPM_BIN)/redocly lint --lint-config error --max-problems 1000 --format stylish $(OPENAPI_SPEC) 2>&1)"; rc=$$?; \
	  printf '%s\n' "$$out" | $(SPEC_BANNER_FILTER); \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	  if printf '%s\n' "$$out" | grep -Eq 'You have [0-9]+ warnings?'; then \
	    echo "redocly lint: warnings are not allowed" >&2; exit 1; fi
	$(NPM_BIN)/spectral lint --ruleset .spectral.yaml --fail-severity=warn $(OPENAPI_BUNDLE)
