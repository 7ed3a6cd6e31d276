# The benchmark: `make bench` runs every figure once, side by side with its baseline.
# Included by the Makefile. BENCH_ARGS passes options through, e.g. BENCH_ARGS='--duration 20'.
.PHONY: bench bench-smoke bench-profile bench-wrk bench-many

BENCH_DIR ?= build/bench
BENCH_ARGS ?=

bench: install bench-wrk  ## the full benchmark: table on stdout, figures in build/bench/bench.json
	$(BIN)/python -m scripts.bench --json $(BENCH_DIR)/bench.json $(BENCH_ARGS)

bench-smoke: install  ## a tiny run of the benchmark (seconds), to keep it working
	$(BIN)/python -m scripts.bench --smoke --json $(BENCH_DIR)/bench-smoke.json $(BENCH_ARGS)

bench-profile: install bench-wrk  ## the full benchmark with py-spy on the server (profiles in build/bench/profile)
	test -x $(BIN)/py-spy || $(BIN)/pip install --quiet py-spy
	$(BIN)/python -m scripts.bench --json $(BENCH_DIR)/bench-profile.json --profile $(BENCH_DIR)/profile $(BENCH_ARGS)

# wrk (Debian's) is the load generator; without it the benchmark falls back to a Python one.
bench-wrk:
	@command -v wrk >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq wrk; \
	else \
		echo "wrk is not installed (apt-get install wrk as root): using the Python load generator"; \
	fi

bench-many: install  ## only the many-streams figures: 10,000 streams over 1,000 runs, and fan-out on one run
	$(BIN)/python -m scripts.bench --only streams10k,fanout --json $(BENCH_DIR)/bench-many.json $(BENCH_ARGS)
