"""The service's Prometheus metrics: every series is defined here, once per process.

Layers above record into these (the web app, the handlers, the backends); `web/metrics.py` serves
them. With several worker processes, prometheus-client's multiprocess mode (its
`PROMETHEUS_MULTIPROC_DIR`, set before prometheus-client is first imported) keeps each process's
values in files that the metrics endpoint aggregates.

Recording is on the hot path (every request, every delivered event), so each labelled child is
bound once (`.labels(...)` takes a lock and builds a key: ~1 µs) and kept by its label values, and
deliveries are counted per stream and added to the counter in batches (`StreamRecord`). Every label
value comes from a fixed set (operationIds of the document, HTTP statuses, the names below): no
series is ever labelled with a raw path, a run id or a caller.

The series (`workflow_runs_` prefix; counters are exposed with `_total`):

- `requests_total{operation,status}`, `request_seconds{operation}`: every HTTP answer of the API port;
- `open_streams`, `stream_events_total`, `streams_ended_total{reason}`: update streams;
- `backend_call_seconds{backend,call}`, `backend_call_errors_total{backend,call}`: Redis, Temporal
  and the codec server;
- `rate_limit_refusals_total{bucket}`, `stream_limit_refusals_total{limit}`: 429s by their cause.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from core import tracing

# A `_created` timestamp per counter and histogram child doubles the scrape, and nothing reads it.
# (prometheus-client leaves the function unannotated: typed by this alias.)
_disable_created_series: Callable[[], None] = disable_created_metrics
_disable_created_series()

# Seconds: from a Redis round trip (~0.1 ms) to a Temporal listing under load (seconds).
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Seconds to an answer's head: a lane read (~1 ms) to a run's long history or a Temporal timeout.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Deliveries a stream counts before adding them to `STREAM_EVENTS` (one counter update per batch).
DELIVERIES_BATCH = 16

BACKEND_CALL_SECONDS = Histogram(
    "workflow_runs_backend_call_seconds",
    "Calls to Redis, Temporal and the codec server, by backend and call, failed ones included.",
    ("backend", "call"),
    buckets=_CALL_BUCKETS,
)
BACKEND_CALL_ERRORS = Counter(
    "workflow_runs_backend_call_errors",
    "Calls to a backend that failed (unreachable, timed out or refused), by backend and call.",
    ("backend", "call"),
)

REQUESTS = Counter(
    "workflow_runs_requests",
    "HTTP requests answered on the API port, by operation and status. `operation` is the operationId "
    "(whether Connexion or the fast lane served it), `health_live`, `health_ready`, `docs` (the "
    "served documents and Swagger UI) or `other` (an unknown route); status 499: the client left "
    "before any answer.",
    ("operation", "status"),
)
REQUEST_SECONDS = Histogram(
    "workflow_runs_request_seconds",
    "Seconds from a request's arrival to its answer's head (for a stream: until it is open), by "
    "operation (as in workflow_runs_requests_total).",
    ("operation",),
    buckets=_REQUEST_BUCKETS,
)

OPEN_STREAMS = Gauge(
    "workflow_runs_open_streams",
    "Update streams (streamWorkflowRunUpdates) open now, summed over the live worker processes.",
    multiprocess_mode="livesum",
)
STREAM_EVENTS = Counter(
    "workflow_runs_stream_events",
    f"Updates delivered on update streams (counted per stream in batches of up to {DELIVERIES_BATCH}, "
    "added at the latest at the stream's next heartbeat or end).",
)
STREAM_END_REASONS = ("run_closed", "client_gone", "slow_reader", "server_shutdown", "token_expired", "backend_error")
STREAMS_ENDED = Counter(
    "workflow_runs_streams_ended",
    "Update streams ended, by reason: run_closed (the run closed, everything sent), client_gone (the "
    "client disconnected), slow_reader (the client read too slowly: its queue overflowed or a send "
    "timed out), server_shutdown (this process is stopping), token_expired, backend_error (Redis "
    "failed mid-stream).",
    ("reason",),
)

RATE_LIMIT_REFUSALS = Counter(
    "workflow_runs_rate_limit_refusals",
    "Requests refused with 429 by a caller's rate limit, by bucket (temporal, updates).",
    ("bucket",),
)
STREAM_LIMIT_REFUSALS = Counter(
    "workflow_runs_stream_limit_refusals",
    "Stream openings refused with 429 by a stream limit: per principal (the caller has its maximum "
    "open) or per process (this process has its maximum open).",
    ("limit",),
)

# Children bound once. Label values come from fixed sets, so these tables stay small.
_BackendChildren = tuple[Histogram, Counter]
_RequestChildren = tuple[Counter, Histogram]
_backend_children: dict[tuple[str, str], _BackendChildren] = {}
_request_children: dict[tuple[str, int], _RequestChildren] = {}
_request_seconds: dict[str, Histogram] = {}
_stream_ends = {reason: STREAMS_ENDED.labels(reason) for reason in STREAM_END_REASONS}
_stream_limit_refusals = {limit: STREAM_LIMIT_REFUSALS.labels(limit) for limit in ("principal", "process")}
# Also bound now, so that both buckets' series are exported (at 0) before the first refusal.
for _bucket in ("temporal", "updates"):
    RATE_LIMIT_REFUSALS.labels(_bucket)


def backend_call_done(backend: str, call: str, started: float, *, failed: bool) -> None:
    """Record one backend call that began at `started` (`time.perf_counter()`) and has just ended."""
    children = _backend_children.get((backend, call))
    if children is None:
        children = _backend_children[(backend, call)] = (
            BACKEND_CALL_SECONDS.labels(backend, call),
            BACKEND_CALL_ERRORS.labels(backend, call),
        )
    seconds = time.perf_counter() - started
    children[0].observe(seconds)
    if failed:
        children[1].inc()
    tracing.backend_call(backend, call, seconds, failed=failed)


def request_done(operation: str, status: int, seconds: float) -> None:
    """Record one HTTP answer: its operation (a bounded label, see `REQUESTS`), its status, and the
    seconds to its head."""
    children = _request_children.get((operation, status))
    if children is None:
        histogram = _request_seconds.get(operation)
        if histogram is None:
            histogram = _request_seconds[operation] = REQUEST_SECONDS.labels(operation)
        children = _request_children[(operation, status)] = (REQUESTS.labels(operation, str(status)), histogram)
    children[0].inc()
    children[1].observe(seconds)


def rate_limit_refusals(bucket: str) -> Counter:
    """The refusal counter of one rate-limit bucket, for its owner to bind once."""
    child: Counter = RATE_LIMIT_REFUSALS.labels(bucket)
    return child


def stream_limit_refused(limit: str) -> None:
    """A stream opening refused by the `principal` or the `process` limit."""
    _stream_limit_refusals[limit].inc()


class StreamRecord:
    """One update stream as the metrics count it: open from its creation until `ended(reason)`,
    its deliveries counted in batches.

    Only the first reason is recorded: the frame generator says why it stopped by itself (the run
    closed, shutdown, token expired, Redis failed, the hub dropped a slow reader), the response why
    it stopped the generator (a send timed out), and whatever still has no reason when the
    response is over was ended by the client leaving. A record never ended (its response was
    dropped unsent) ends as `client_gone` when it is collected, as the stream's slot is released."""

    __slots__ = ("_delivered", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        self._delivered = 0
        OPEN_STREAMS.inc()

    def delivered(self) -> None:
        """One update handed to the client."""
        self._delivered += 1
        if self._delivered >= DELIVERIES_BATCH:
            self.flush()

    def flush(self) -> None:
        """Add the deliveries counted so far to `STREAM_EVENTS` (call when the stream is idle)."""
        if self._delivered:
            STREAM_EVENTS.inc(self._delivered)
            self._delivered = 0

    def ended(self, reason: str) -> None:
        """The stream is over, for `reason` (one of `STREAM_END_REASONS`); later calls are ignored."""
        if self.reason is not None:
            return
        counter = _stream_ends[reason]  # KeyError for another reason, before anything is counted
        self.reason = reason
        self.flush()
        OPEN_STREAMS.dec()
        counter.inc()

    def __del__(self) -> None:
        if self.reason is None:
            self.ended("client_gone")


class _Uncounted(StreamRecord):
    """A stream the metrics do not count (a frame generator tested on its own)."""

    __slots__ = ()

    def __init__(self) -> None:
        self.reason = None
        self._delivered = 0

    def delivered(self) -> None:
        pass

    def ended(self, reason: str) -> None:
        pass

    def __del__(self) -> None:
        pass


# For code that takes a `StreamRecord` and is given none: it records nothing.
NOT_COUNTED: StreamRecord = _Uncounted()
