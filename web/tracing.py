"""A server span per request, when tracing is on (`core.tracing`; `web.app` adds this middleware
only then, so without tracing a request pays nothing for it).

The span continues the caller's trace when the request carries W3C `traceparent` (a sample
activity's update post does), and is named by the request's operationId: the one the fast lane
or the Connexion endpoint recorded in `scope["state"]["operation_id"]` (as `web.metrics` reads
it), else Connexion's route, else the operation whose method and path template match; a request
outside the operations is named `{method} {route}` for the fixed paths (health checks, documents)
and by its method alone otherwise (semantic conventions: never the raw path, which holds ids).
Its attributes follow OpenTelemetry's HTTP server conventions: method, route template, status
code, path, redacted query, scheme, server, client, protocol and user agent.
Backend calls made while it is current (`core.tracing.backend_call`) are its children.

A stream's span (`streamWorkflowRunUpdates`) lasts as long as the stream: it ends when the
response does (run closed, server shutdown, token expired, client gone), so its duration is the
stream's, minutes or hours, not the time to open it; the backend calls that open it are its
children, and the updates it relays are not traced one by one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from connexion.middleware.abstract import ROUTING_CONTEXT
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import tracing
from web.metrics import OPERATION_KEY, fixed_operations
from web.middleware import redacted_query
from web.operations import Operation, path_pattern

# The methods semantic conventions name; any other is `_OTHER` (with the original beside it).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"})


class RequestSpans:
    """The request's server span, from its first byte to its response's last (see the module)."""

    def __init__(self, app: ASGIApp, operations: Mapping[str, Operation], base_path: str) -> None:
        self.app = app
        # operationId -> route template, as `http.route` shows it (the base path included).
        self._routes = {operation_id: base_path + op.path for operation_id, op in operations.items()}
        # For requests refused before anything named their operation (a body over the cap): the
        # operations' paths, most literal characters first.
        patterns = [
            (op.method, path_pattern(base_path, op.path), operation_id) for operation_id, op in operations.items()
        ]
        patterns.sort(key=lambda entry: -len(re.sub(r"\{\w+\}", "", operations[entry[2]].path)))
        self._patterns = patterns
        # Paths without ids (health checks, the served documents): each is its own route.
        self._fixed = frozenset(fixed_operations(base_path))
        # Only the W3C trace context is taken from a caller: its `baggage` (kilobytes it chooses)
        # would otherwise travel on to the codec server and into the runs' Temporal headers.
        self._propagator = TraceContextTextMapPropagator()
        self._fields = frozenset(field.encode("latin-1") for field in self._propagator.fields)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in self._fields
        }
        parent = self._propagator.extract(carrier)
        method = scope["method"]
        span = tracing.tracer().start_span(
            method if method in KNOWN_METHODS else "HTTP",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_request_attributes(scope),
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        # Shared with the copies of the scope that inner layers make, so what they record there
        # (the operationId; Connexion's router, its route) is seen here once the response is over.
        scope.setdefault("state", {})
        scope.setdefault("extensions", {})
        status = 0

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, send_traced)
        except asyncio.CancelledError:
            raise  # the server gave up on the request (its client left, shutdown): not an error of it
        except BaseException as exc:
            error = type(exc).__qualname__
            span.record_exception(exc)
            status = status or 500  # what the server answers for an exception that got this far
            raise
        finally:
            self._finish(span, scope, status, error)
            context.detach(token)

    def _finish(self, span: trace.Span, scope: Scope, status: int, error: str | None) -> None:
        operation_id = _known(scope["state"].get(OPERATION_KEY), self._routes)
        if operation_id is None:  # refused by Connexion before its endpoint (a 401, a 400)
            operation_id = _known(scope["extensions"].get(ROUTING_CONTEXT, {}).get("operation_id"), self._routes)
        route: str | None
        if operation_id is not None:
            route = self._routes[operation_id]
        elif status == 405:  # no operation has that method on that path
            route = None
        else:
            operation_id, route = self._match(scope["method"], scope["path"])
        if operation_id is not None:
            span.update_name(operation_id)
        elif route is not None:
            span.update_name(f"{scope['method']} {route}")
        attributes: dict[str, str | int] = {}
        if route is not None:
            attributes["http.route"] = route
        if status:
            attributes["http.response.status_code"] = status
        if status >= 500 or error is not None:
            # Server spans: a 4xx is the client's error, not the server's (semantic conventions).
            attributes["error.type"] = error or str(status)
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)  # at once: each call takes the span's lock
        span.end()

    def _match(self, method: str, path: str) -> tuple[str | None, str | None]:
        """The operation (and its route) that `method` and `path` name, else a fixed route, else none."""
        for op_method, pattern, operation_id in self._patterns:
            if op_method == method and pattern.match(path):
                return operation_id, self._routes[operation_id]
        return None, path if path in self._fixed else None


def _known(operation_id: Any, routes: Mapping[str, str]) -> str | None:
    return operation_id if isinstance(operation_id, str) and operation_id in routes else None


def _request_attributes(scope: Scope) -> dict[str, str | int]:
    method = scope["method"]
    attributes: dict[str, str | int] = {
        "http.request.method": method if method in KNOWN_METHODS else "_OTHER",
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if method not in KNOWN_METHODS:
        attributes["http.request.method_original"] = method
    query = scope.get("query_string", b"")
    if query:
        attributes["url.query"] = redacted_query(query)  # the stream's token is never exported
    server = scope.get("server")
    if server:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    return attributes
