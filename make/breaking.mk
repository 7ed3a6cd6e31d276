# make/breaking.mk: the breaking-change gate of the OpenAPI document (scripts/breaking.py).
#
# Included by the main Makefile after make/spec.mk, whose bundle and OPENAPI_BUNDLE it uses.
# api-smart-diff (pinned in tools/npm) compares the bundle of openapi/ with the newest release,
# openapi/releases/<version>.yaml; a breaking change fails the gate unless
# openapi/releases/announced.yaml lists it under a CHANGELOG.md version that is a major bump over
# that release (docs/decisions/0011-breaking-change-gate.md).

BREAKING ?= $(VENV)/bin/python -m scripts.breaking
# The document `make api-release` stamps: the committed bundle (`make check-generated` keeps it fresh).
RELEASED_BUNDLE ?= generated/openapi.yaml

.PHONY: breaking breaking-announce api-release

# BREAKING_ALL=1 lists the non-breaking changes one by one as well.
breaking: install bundle ## Fail on a breaking change since the last release that is not announced
	$(BREAKING) check --document $(OPENAPI_BUNDLE) $(if $(BREAKING_ALL),--all)

breaking-announce: install bundle ## Announce each breaking change found: VERSION=x.y.z (major, in CHANGELOG.md)
	@test -n "$(VERSION)" || { echo "usage: make breaking-announce VERSION=x.y.z"; exit 2; }
	$(BREAKING) announce --document $(OPENAPI_BUNDLE) --version $(VERSION) --write

api-release: install check-generated ## Release generated/openapi.yaml as VERSION=x.y.z into openapi/releases/
	@test -n "$(VERSION)" || { echo "usage: make api-release VERSION=x.y.z (CHANGELOG.md's top version)"; exit 2; }
	$(BREAKING) release --document $(RELEASED_BUNDLE) --version $(VERSION)
