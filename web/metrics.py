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

**The middleware** (`RequestMetrics`): pure ASGI, registered in `web.app` at
`MiddlewarePosition.BEFORE_EXCEPTION` before every other middleware there, so it sees every answer
(the lane's, Connexion's, its error handlers', the CORS preflights); only Connexion's
`ServerErrorMiddleware` is outside it, and an exception on its way there is counted as the 500 it
becomes. It records, per request, the status and the seconds to the answer's head (a stream's
opening, not its whole life): one counter and one histogram update (~3 µs, ~7 µs in multiprocess
mode).

**The endpoint** (`start_metrics_server`): `GET /metrics` in Prometheus's text format (or
OpenMetrics when the scraper asks for it) on a port of its own (METRICS_PORT), never on the API
port and without the API's bearer authentication: what it shows (counts, durations, reasons) names
no caller, run or token. It is served by a thread of the process that starts it, so a scrape never
waits for the event loop. With several worker processes (`multiprocess=True`), the process that
starts it aggregates every worker's values from `PROMETHEUS_MULTIPROC_DIR`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from connexion.middleware.abstract import ROUTING_CONTEXT
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import request_done

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
# A scraper that stops mid-request holds one thread for at most this long.
SCRAPE_TIMEOUT_SECONDS = 10.0


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
            if not status:  # what Connexion's ServerErrorMiddleware answers for it
                status, seconds = 500, time.perf_counter() - start
            raise
        finally:
            if not status:
                status, seconds = NO_ANSWER, time.perf_counter() - start
            request_done(operation_of(scope, self.fixed, self.docs_prefix), status, seconds)


class MetricsServer:
    """The `/metrics` endpoint, served by a thread until `close()`."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port: int = server.server_address[1]

    def close(self) -> None:
        """Stop serving and free the port (waits for the serving thread; idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def start_metrics_server(host: str, port: int, *, multiprocess: bool) -> MetricsServer:
    """Serve `GET /metrics` on `host`:`port` (0: a free port, see `.port`) from a daemon thread.
    `multiprocess`: the sum of every process writing into `PROMETHEUS_MULTIPROC_DIR` (which must be
    set: `ValueError` otherwise), else this process's series with its process and runtime metrics.
    Raises `OSError` when the port cannot be bound."""
    registry: Collector = REGISTRY
    if multiprocess:
        aggregate = CollectorRegistry()
        _collect_every_process(aggregate)
        registry = aggregate
    handler = type("Handler", (_MetricsHandler,), {"registry": registry})
    server_class = type(
        "Server", (ThreadingHTTPServer,), {"address_family": _family(host, port), "daemon_threads": True}
    )
    server = server_class((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


def _family(host: str, port: int) -> socket.AddressFamily:
    """IPv6 for a host that resolves only to one (`::`, `::1`), IPv4 otherwise."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = [info[0] for info in infos]
    return socket.AF_INET if socket.AF_INET in families or not families else families[0]


class _MetricsHandler(BaseHTTPRequestHandler):
    """`GET /metrics` (any query), in the format the `Accept` header asks for; 404 elsewhere, 405
    for other methods."""

    registry: Collector
    timeout = SCRAPE_TIMEOUT_SECONDS
    server_version = "workflow-runs-metrics"
    sys_version = ""

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
