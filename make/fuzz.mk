# make/fuzz.mk: the deep Schemathesis run, not part of `make test`. Included by the main Makefile.
# contract_tests/fuzz.py reads FUZZ_EXAMPLES (cases per operation and phase, default 300) and
# FUZZ_SEED from the environment: `make fuzz FUZZ_EXAMPLES=1000 FUZZ_SEED=7`.
.PHONY: fuzz

fuzz: install  ## deep Schemathesis run: 300 cases per operation, hostile strings (FUZZ_EXAMPLES, FUZZ_SEED)
	$(BIN)/python -m contract_tests.fuzz
