# make/mock.mk: mock mode, the API on in-memory backends seeded from the document's examples (no
# Temporal, no Redis). Included by the main Makefile. `make mock PORT=8765` picks the port.
.PHONY: mock contract-test-mock

mock: install  ## the API in mock mode: in memory, seeded from the document's examples (no Temporal, no Redis)
	$(BIN)/workflow-runs mock $(if $(PORT),--port $(PORT))

contract-test-mock: install  ## Schemathesis against mock mode (seconds; part of make test)
	$(BIN)/python -m contract_tests.run --mock
