"""The Prometheus side of the web app: the request middleware, and the `/metrics` endpoint.

The series are defined in `core.metrics` (with their help texts); this module records requests and
serves every series.

**Which operation a request was.** The one that serves a request names its operation in the
request's shared state: `scope.setdefault("state", {})["operation_id"] = "<operationId>"`. The
fast lane (`web.fast_lane.FastLane`) sets it when a request matches one of its routes, Connexion's
endpoint (`web.endpoints.endpoint`) when it is called. The state dict is the one the server put in
the scope (uvicorn and Starlette's test client copy the lifespan state into every request's
scope): the middlewares that copy the scope (`{**scope, ...}`, Connexion's router's
`scope.copy()`) copy it shallowly, so every layer holds that same dict, and an outer middleware
reads the key after the inner app returned. `operation_of(scope)` reads it, falling back to
Connexion's routing (a request it refused before the endpoint, e.g. a 401, still names its
operation) and then to the fixed labels of the health checks and documents; anything else is
`other`. OpenTelemetry's request spans (`web/tracing.py`) read the same key.

**The middleware** (`RequestMetrics`): pure ASGI, the outermost layer of the app's front in
`web.app` but for the request span, so it sees every answer (the lane's, Connexion's, its error
handlers', the CORS preflights, the JSON 500 `web.middleware.RequestContext` answers for an
exception before any answer). An exception that leaves it is counted as the 500 the server
answers for it. It records, per request, the status and the seconds to the answer's head (a stream's
opening, not its whole life): one counter and one histogram update (~3 µs, ~7 µs in multiprocess
mode).

**The endpoint** (`start_metrics_server`): `GET /metrics` in Prometheus's text format (or
OpenMetrics when the scraper asks for it) on a port of its own (METRICS_PORT, on METRICS_HOST),
never on the API port and without the API's bearer authentication: what it shows (counts,
durations, reasons) names no caller, run or token. Each connection is served by a thread of the
process that starts it, so a scrape never waits for the event loop. With several worker processes
(`multiprocess=True`), the process that starts it aggregates every worker's values from
`PROMETHEUS_MULTIPROC_DIR`.

Its bounds, since anyone who reaches the port may connect: at most `MAX_SCRAPE_CONNECTIONS`
connections (threads) at once, a connection beyond them answered 503 without waiting for it and
closed without a thread; one request per connection, whose whole life (reading the head, writing
the answer) ends `SCRAPE_TIMEOUT_SECONDS` after it was accepted however slowly its bytes come (the
deadline bounds every read and write, not each one); a head of at most `MAX_HEAD_BYTES` (431
beyond; the standard library's own caps stay: 65 536 bytes a line, 100 header lines). The answer
is the exposition of the registry, whose series are a fixed set.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from connexion.middleware.abstract import ROUTING_CONTEXT
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import request_done

log = logging.getLogger("workflow_runs.metrics")
# Registers, on a registry, the sum of the series of every process writing into
# PROMETHEUS_MULTIPROC_DIR (prometheus-client leaves the class unannotated: typed by this alias).
_collect_every_process: Callable[[CollectorRegistry], object] = MultiProcessCollector
OPERATION_KEY = "operation_id"  # in `scope["state"]`: see the module's docstring
OTHER = "other"
DOCS = "docs"
# Status recorded for a request the application never answered (its client left first), as in
# the access log (`web.middleware.CLIENT_GONE_STATUS`).
NO_ANSWER = 499
METRICS_PATH = "/metrics"
# A connection (its thread) lives at most this long from its accept (its thread's start, at once
# after), whatever it sends or reads.
SCRAPE_TIMEOUT_SECONDS = 10.0
# Connections served at once (one thread each); Prometheus opens one per scrape, so a few scrapers
# (an HA pair, a person with curl) fit, and a client opening hundreds costs 8 threads, not hundreds.
MAX_SCRAPE_CONNECTIONS = 8
# A scrape's head is a request line and a few headers (a few hundred bytes): far more is refused.
MAX_HEAD_BYTES = 8192


def _plain_answer(status: str, text: str, *, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.0 answer, written before (or without) a request was read."""
    body = text.encode()
    extra = "Retry-After: 1\r\n" if retry_after else ""
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


BUSY_ANSWER = _plain_answer(
    "503 Service Unavailable", "Too many connections to the metrics endpoint.\n", retry_after=True
)
HEAD_TOO_LARGE_ANSWER = _plain_answer("431 Request Header Fields Too Large", "Request head too large.\n")


def fixed_operations(base_path: str) -> dict[str, str]:
    """The routes outside the document, by path, under labels of their own."""
    return {
        "/health/live": "health_live",
        "/health/ready": "health_ready",
        f"{base_path}/openapi.json": DOCS,
        f"{base_path}/openapi.yaml": DOCS,
        f"{base_path}/openapi-3.2.json": DOCS,
    }


def operation_of(scope: Scope, fixed: dict[str, str], docs_prefix: str) -> str:
    """The request's operation label: the operationId its server named, else Connexion's route,
    else a fixed label of `fixed` (by exact path) or `docs` (Swagger UI under `docs_prefix`), else
    `other`. Never the path itself: the label's values stay a small fixed set."""
    named = scope.get("state", {}).get(OPERATION_KEY)
    if isinstance(named, str):
        return named
    routed = scope.get("extensions", {}).get(ROUTING_CONTEXT, {}).get("operation_id")
    if isinstance(routed, str):
        return routed
    path: str = scope["path"]
    label = fixed.get(path)
    if label is not None:
        return label
    return DOCS if path == docs_prefix or path.startswith(docs_prefix + "/") else OTHER


class RequestMetrics:
    """Records every HTTP request's operation, status and seconds to its answer's head
    (`core.metrics.request_done`)."""

    def __init__(self, app: ASGIApp, base_path: str) -> None:
        self.app = app
        self.fixed = fixed_operations(base_path)
        self.docs_prefix = f"{base_path}/ui"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Made here if the server gave none, so that every inner layer shares these two dicts
        # (Connexion's router writes its route into the extensions of its own copy of the scope).
        scope.setdefault("state", {})
        scope.setdefault("extensions", {})
        start = time.perf_counter()
        status, seconds = 0, 0.0

        async def send_timed(message: Message) -> None:
            nonlocal status, seconds
            if message["type"] == "http.response.start":
                status = message["status"]
                seconds = time.perf_counter() - start
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except BaseException:
            if not status:  # what the server answers for it
                status, seconds = 500, time.perf_counter() - start
            raise
        finally:
            if not status:
                status, seconds = NO_ANSWER, time.perf_counter() - start
            request_done(operation_of(scope, self.fixed, self.docs_prefix), status, seconds)


class MetricsServer:
    """The `/metrics` endpoint, served by a thread until `close()`."""

    def __init__(self, server: _CappedServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port: int = server.server_address[1]

    @property
    def connections(self) -> int:
        """Connections being served now (each by a thread of its own)."""
        return self._server.active

    def close(self) -> None:
        """Stop serving and free the port (waits for the serving thread; idempotent). A connection
        being served ends by its own deadline."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def start_metrics_server(
    host: str,
    port: int,
    *,
    multiprocess: bool,
    max_connections: int = MAX_SCRAPE_CONNECTIONS,
    request_seconds: float = SCRAPE_TIMEOUT_SECONDS,
) -> MetricsServer:
    """Serve `GET /metrics` on `host`:`port` (0: a free port, see `.port`) from a daemon thread,
    each connection from a thread of its own: at most `max_connections` at once, each closed
    `request_seconds` after its accept at the latest.
    `multiprocess`: the sum of every process writing into `PROMETHEUS_MULTIPROC_DIR` (which must be
    set: `ValueError` otherwise), else this process's series with its process and runtime metrics.
    Raises `OSError` when the port cannot be bound."""
    registry: Collector = REGISTRY
    if multiprocess:
        aggregate = CollectorRegistry()
        _collect_every_process(aggregate)
        registry = aggregate
    handler = type("Handler", (_MetricsHandler,), {"registry": registry, "request_seconds": request_seconds})
    server = _CappedServer((host, port), handler, family=_family(host, port), max_connections=max_connections)
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


class _CappedServer(HTTPServer):
    """An HTTP server with one thread per connection, at most `max_connections` at once. The
    accepting thread refuses a connection beyond them itself: one non-blocking write of a 503, then
    close, so a flood of connections costs neither threads nor waiting."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[_MetricsHandler],
        *,
        family: socket.AddressFamily,
        max_connections: int,
    ) -> None:
        self.address_family = family  # read by the base class when it makes the socket
        self.max_connections = max_connections
        self.active = 0
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            admitted = self.active < self.max_connections
            if admitted:
                self.active += 1
        if not admitted:
            _refuse(request)
            self.shutdown_request(request)
            return
        name = f"metrics-scrape-{self.server_address[1]}"  # by port: which server's it is
        thread = threading.Thread(target=self._serve, args=(request, client_address), name=name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: as if over the cap
            _refuse(request)
            self._done(request)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        self.shutdown_request(request)
        with self._lock:
            self.active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left, broke its connection or outlived its deadline is nothing to report;
        anything else is logged (the base class would print it on stderr)."""
        if not isinstance(sys.exc_info()[1], OSError):
            log.exception("the metrics endpoint failed to answer a request")


def _refuse(sock: socket.socket) -> None:
    """Answer 503 without ever waiting on the client: one non-blocking send of a few bytes into an
    empty send buffer (if even that fails, the connection is just closed)."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(BUSY_ANSWER)


def _family(host: str, port: int) -> socket.AddressFamily:
    """IPv6 for a host that resolves only to one (`::`, `::1`), IPv4 otherwise."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = [info[0] for info in infos]
    return socket.AF_INET if socket.AF_INET in families or not families else families[0]


class _MetricsHandler(BaseHTTPRequestHandler):
    """`GET /metrics` (any query), in the format the `Accept` header asks for; 404 elsewhere, 405
    for other methods."""

    registry: Collector
    request_seconds: float
    server_version = "workflow-runs-metrics"
    sys_version = ""

    def setup(self) -> None:
        # Instead of StreamRequestHandler's files, whose timeout bounds each read: every read and
        # write of these ends by the connection's one deadline, and reads stop at MAX_HEAD_BYTES
        # (a GET has no body: the head is all a request is).
        self.connection = self.request
        raw = _DeadlineSocketIO(self.request, time.monotonic() + self.request_seconds, MAX_HEAD_BYTES)
        self.rfile = io.BufferedReader(raw)
        self.wfile = io.BufferedWriter(raw)

    def handle(self) -> None:
        try:
            super().handle()
        except _HeadTooLarge:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(HEAD_TOO_LARGE_ANSWER)
                self.wfile.flush()

    def do_GET(self) -> None:
        if self.path.partition("?")[0] != METRICS_PATH:
            self._plain(404, b"Not found: metrics are at /metrics.\n")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self) -> None:
        self._plain(405, b"Only GET is served.\n", allow=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse

    def _plain(self, status: int, body: bytes, *, allow: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", "GET")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one every few seconds would drown the access log."""


class _HeadTooLarge(Exception):
    """The client sent more than `MAX_HEAD_BYTES` before its head ended."""


class _DeadlineSocketIO(io.RawIOBase):
    """A connection's socket as a file whose every read and write ends by `deadline` (monotonic
    seconds): before each, the socket's timeout is set to the time left, so a client trickling
    bytes gains nothing. Reads stop at `max_read` bytes in all (`_HeadTooLarge` beyond).
    `TimeoutError` once the deadline is past; closing it leaves the socket to the server."""

    def __init__(self, sock: socket.socket, deadline: float, max_read: int) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._read_left = max_read

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def _time_left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the metrics request outlived its deadline")
        return left

    def readinto(self, buffer: Any) -> int:
        if self._read_left <= 0:
            raise _HeadTooLarge
        self._sock.settimeout(self._time_left())
        received = self._sock.recv_into(buffer, min(len(buffer), self._read_left))
        self._read_left -= received
        return received

    def write(self, data: Any) -> int:
        self._sock.settimeout(self._time_left())
        return self._sock.send(data)
