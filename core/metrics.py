"""The service's Prometheus metrics: every series is defined here, once per process.

Layers above record into these (the web app, the handlers, the backends); `web/metrics.py` serves
them. With several worker processes, prometheus-client's multiprocess mode (its
`PROMETHEUS_MULTIPROC_DIR`, set before this module is first imported) keeps each process's values
in files that the metrics endpoint aggregates.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

# Seconds: from a Redis round trip (~0.1 ms) to a Temporal listing under load (seconds).
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

BACKEND_CALL_SECONDS = Histogram(
    "workflow_runs_backend_call_seconds",
    "Calls to Redis, Temporal and the codec server, by backend and call.",
    ("backend", "call"),
    buckets=_CALL_BUCKETS,
)
BACKEND_CALL_ERRORS = Counter(
    "workflow_runs_backend_call_errors",
    "Calls to a backend that failed (unreachable, timed out or refused), by backend and call.",
    ("backend", "call"),
)


def backend_call_done(backend: str, call: str, started: float, *, failed: bool) -> None:
    """Record one backend call that began at `started` (`time.perf_counter()`) and has just ended."""
    BACKEND_CALL_SECONDS.labels(backend, call).observe(time.perf_counter() - started)
    if failed:
        BACKEND_CALL_ERRORS.labels(backend, call).inc()
