# make/browser.mk: what the browser test (tests/browser/) needs besides the Python packages of .venv.
#
# Included by the main Makefile; also usable alone: `make -f make/browser.mk browser-deps`.
# The test drives Debian's Chromium through Playwright's Python bindings (a dev dependency of the
# project, in .venv). Playwright's own browser download cannot work here (only PyPI, npm and Debian
# are reachable), so the test points Playwright at CHROMIUM with `executable_path` and nothing ever
# runs `playwright install`.

CHROMIUM ?= /usr/bin/chromium

.PHONY: browser-deps

browser-deps: ## Install Debian's chromium for the browser test when it is missing (needs root)
	@if [ -x "$(CHROMIUM)" ]; then echo "browser-deps: $$($(CHROMIUM) --version 2>/dev/null || echo $(CHROMIUM))"; \
	elif [ "$(CHROMIUM)" != /usr/bin/chromium ]; then echo "browser-deps: $(CHROMIUM) is missing" >&2; exit 1; \
	else echo "browser-deps: installing Debian's chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  && /usr/bin/chromium --version; fi
