"""Connexion's side of the handler convention: one endpoint per operation of the table.

Connexion routes a request, checks its token, validates and converts its parameters and body, then
calls the operation's endpoint with them (by Python name, `token_info` among them). The endpoint
adds the declared header parameters (Connexion validates headers but passes none), keeps what the
handler declares, calls `handler(deps, principal, **parameters)` (`handlers`), and turns its answer
into a response: JSON bytes as they are, an opened stream as Server-Sent Events.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from connexion import request
from starlette.responses import Response

from core.metrics import StreamRecord
from core.principals import Principal
from handlers.deps import Deps
from handlers.updates import OpenedStream
from web.operations import Operation
from web.sse.frames import DirectWrites, update_frames
from web.sse.response import EventStreamResponse

Endpoint = Callable[..., Awaitable[Response]]


def endpoint(operation: Operation) -> Endpoint:
    handler, accepts, operation_id = operation.handler, operation.accepts, operation.operation_id
    headers = tuple(p for p in operation.parameters_in("header") if p.python_name in accepts)

    async def call(**given: Any) -> Response:
        # For the request metrics and spans of the outer middlewares (`web.metrics`).
        request.scope.setdefault("state", {})["operation_id"] = operation_id
        principal: Principal = given["token_info"]["principal"]
        arguments = {name: value for name, value in given.items() if name in accepts}
        for header in headers:
            value = request.headers.get(header.name)
            if value is not None:
                arguments[header.python_name] = value
        deps: Deps = request.state.deps
        return answer(deps, await handler(deps, principal, **arguments))

    call.__name__ = call.__qualname__ = operation_id
    return call


def answer(deps: Deps, result: bytes | OpenedStream) -> Response:
    """The response of a handler's answer."""
    if isinstance(result, OpenedStream):
        return stream_response(deps, result)
    return Response(result, media_type="application/json")


def stream_response(deps: Deps, opened: OpenedStream) -> EventStreamResponse:
    settings = deps.settings
    record = StreamRecord()  # the stream's series: open until the first reason it ends for
    direct = DirectWrites()  # the response hands the frames its connection's direct writer
    frames = update_frames(
        opened.stream,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        retry_ms=settings.sse_retry_ms,
        closed_status=opened.closed_status,
        status_at_open=opened.status_at_open,
        expires_at=opened.expires_at,
        shutdown=deps.shutdown,
        record=record,
        direct=direct,
    )
    return EventStreamResponse(
        frames,
        send_timeout=settings.sse_send_timeout_seconds,
        slot=opened.slot,
        stream=opened.stream,
        record=record,
        direct=direct,
    )
