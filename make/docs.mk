# make/docs.mk: a static HTML reference of the OpenAPI document, readable offline.
#
# Included by the main Makefile after make/spec.mk, whose NPM_BIN, NPM_STAMP, OPENAPI_SPEC,
# SPEC_ENV and banner filter it uses. `redocly build-docs` bundles openapi/ itself (the same
# bundle as `make bundle`) and renders it with Redoc. --inlineBundle embeds Redoc in the page
# instead of loading it from Redocly's CDN; the page template named in redocly.yaml
# (make/docs-template.hbs) adds a Content-Security-Policy that blocks what Redoc would still
# fetch at run time, so the page loads nothing from another host.

DOCS_HTML ?= build/docs/index.html
DOCS_TEMPLATE := make/docs-template.hbs
# Rebuilt only when the document, the Redocly configuration, the template or the tools change.
DOCS_INPUTS := $(shell find $(dir $(OPENAPI_SPEC)) -type f -name '*.yaml') redocly.yaml $(DOCS_TEMPLATE)

.PHONY: docs

docs: $(DOCS_HTML) ## Static HTML reference of the API in build/docs/index.html (works offline)

$(DOCS_HTML): $(DOCS_INPUTS) $(NPM_STAMP)
	@mkdir -p $(dir $@)
	@echo "$(SPEC_ENV) $(NPM_BIN)/redocly build-docs $(OPENAPI_SPEC) --inlineBundle -o $@"
	@out="$$($(SPEC_ENV) $(NPM_BIN)/redocly build-docs $(OPENAPI_SPEC) --inlineBundle -o $@ 2>&1)"; rc=$$?; \
	  printf '%s\n' "$$out" | $(SPEC_BANNER_FILTER); exit $$rc
