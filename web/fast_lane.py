"""The fast lane: the operations clients call in a loop, served without Connexion's stack.

Posting an update, reading a run's updates and reading a run's details are the hot path (a workflow
posts many updates per run, a UI polls the others). Connexion's middlewares cost about 450 µs of
CPU per request, more than a whole request in a bare Starlette handler (`make bench`). A run's
stream is opened far less often, but lives long: behind Connexion, its chain of middlewares, their
frames and their copies of the scope stay alive as long as the stream (about 16 KB of each open
stream's memory). This lane answers those operations directly, for requests that are *plainly
valid*:

- it reads the operation table (`web.operations`), as Connexion's registration does: paths,
  parameters with their types, defaults and `required`, the body, the security and the answer all
  come from the document, and the handler is the same function Connexion's endpoint calls, with the
  same arguments (`handlers`);
- at start-up it checks every construct its operations use against the ones it implements
  (`LANE_CONSTRUCTS` below) and refuses to start, naming the construct, when one is not;
- it takes a request only when everything about it is unremarkable: the path matches, every query
  parameter is a declared one given once in plain characters, every required parameter is there,
  each parameter passes its schema, a body is a JSON object sent as `application/json` within the
  size limit and passes its schema, and the token sent in the `Authorization` header verifies;
- a stream's token sent as the `access_token` query parameter (EventSource clients cannot set
  headers; `web.middleware.QueryTokenForStreams` moves it to the header ahead of Connexion's
  security) is left to Connexion: such a stream is served, and costs, as without the lane;
- anything else (a malformed token, an unknown parameter, a missing required header, an invalid
  body, ...) is handed on to Connexion untouched (a body the lane read is replayed), so every
  refusal keeps Connexion's exact answer and each error message has one implementation;
- the handler's domain errors (403, 404, 413, 429, 503) leave as `web.errors` shapes them for
  Connexion; with VALIDATE_RESPONSES=1 its JSON answers are validated against the document as
  Connexion's are (Connexion has no validator for `text/event-stream`, so neither has the lane);
- an opened stream is answered by `web.endpoints.stream_response`, the function Connexion's
  endpoint answers it with, and runs in the scope the server gave (its extensions: abort, direct
  writes); once it has started, its errors are the server's, as behind Connexion.

`tests/unit/test_fast_lane.py` proves, request by request, that the lane and Connexion answer the
same; `FAST_LANE=0` turns the lane off.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from connexion.lifecycle import ConnexionResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import DomainError
from handlers.deps import Deps
from handlers.updates import OpenedStream
from web import errors, openapi31
from web.asgi import replay, send_response
from web.auth import token_info
from web.endpoints import stream_response
from web.middleware import STREAM_AUTH_PARAM
from web.operations import MISSING, Operation, Parameter, path_pattern
from web.sse.response import HEADERS as STREAM_HEADERS
from web.sse.response import EventStreamResponse

# The operations the lane serves: those where Connexion's cost dominates the request (`make bench`),
# and the stream, whose every open connection would keep Connexion's chain alive as long as it lasts.
LANE_OPERATIONS = ("getWorkflowRun", "getWorkflowRunUpdates", "postWorkflowRunUpdate", "streamWorkflowRunUpdates")

# What the lane implements of the document, by construct; anything else in one of its operations
# stops the app at start-up (`LaneUnsupported`) rather than being served differently from Connexion.
LANE_CONSTRUCTS = {
    "operation": {
        "operationId",
        "summary",
        "description",
        "tags",
        "deprecated",
        "security",
        "parameters",
        "requestBody",
        "responses",
    },
    "parameter": {"name", "in", "required", "schema", "description", "example", "examples", "deprecated"},
    "parameter location": {"path", "query", "header"},
    "parameter type": {"string", "integer", "boolean"},
    # Keywords a parameter's schema may use: checked by the same 2020-12 validator on both paths.
    # (`nullable`, for one, is not: Connexion reads `null` as None where the lane would not.)
    "parameter schema": {
        "type",
        "format",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "enum",
        "const",
        "default",
        "title",
        "description",
        "example",
        "examples",
        "deprecated",
    },
    "request body": {"content", "required", "description"},
    "body media type": {"application/json"},
    "media type object": {"schema", "example", "examples"},
    # The 200 answer: JSON bytes, or an opened stream sent as Server-Sent Events (`web.endpoints`).
    "answer media type": {"application/json", "text/event-stream"},
}
# What each answer's handler returns, and the headers its answer always carries: the only ones the
# 200 answer may declare (Connexion, validating responses, checks that the required ones are sent).
_ANSWERS: dict[str, tuple[type, frozenset[str]]] = {
    "application/json": (bytes, frozenset()),
    "text/event-stream": (OpenedStream, frozenset(name.lower() for name in STREAM_HEADERS)),
}
# Specification extensions (`x-...`) the lane knows to mean nothing for serving: none yet. Connexion
# acts on some (`x-body-name` renames the handler's body argument), so an unknown one is refused.
LANE_EXTENSIONS: frozenset[str] = frozenset()
# A query value the lane reads as it is: unreserved characters only (nothing percent-encoded, no
# `+`); integers as JSON spells them, at most 19 digits; booleans in lower case.
_PLAIN = re.compile(rb"[A-Za-z0-9._~-]+\Z")
_INTEGER = re.compile(rb"-?[0-9]{1,19}\Z")
_BOOLEANS = {b"true": True, b"false": False}
_QUERY_TOKEN = STREAM_AUTH_PARAM.encode()


class LaneUnsupported(ValueError):
    """An operation of the lane uses a construct of the document the lane does not implement."""


@dataclass(frozen=True)
class Route:
    """One operation of the table, as the lane matches and serves it."""

    operation: Operation
    pattern: re.Pattern[str]
    response: dict[str, Any] | None  # the schema of the 200 answer when JSON; None: a stream
    inputs: tuple[Input, ...]
    query_names: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class Input:
    """A parameter with what each request needs of it, computed once."""

    parameter: Parameter
    wire: bytes  # its name as the request spells it: in the query, or lower-case in the headers
    accepted: bool  # whether the handler takes it


def lane_routes(operations: dict[str, Operation], base_path: str) -> list[Route]:
    """The routes of `LANE_OPERATIONS`; `LaneUnsupported` when one cannot be served by the lane."""
    return [route_of(operations[operation_id], base_path) for operation_id in LANE_OPERATIONS]


def route_of(operation: Operation, base_path: str) -> Route:
    """The operation as the lane serves it; `LaneUnsupported` naming the first construct it uses
    that the lane does not implement."""
    where = f"the fast lane cannot serve {operation.operation_id}"
    _only(operation.spec, LANE_CONSTRUCTS["operation"], f"{where}: the operation uses")
    for parameter in operation.parameters:
        at = f"{where}: parameter {parameter.name!r}"
        _only(parameter.spec, LANE_CONSTRUCTS["parameter"], f"{at} uses")
        _only([parameter.location], LANE_CONSTRUCTS["parameter location"], f"{at} is in")
        _only(parameter.schema, LANE_CONSTRUCTS["parameter schema"], f"{at}'s schema uses")
        kind = parameter.schema.get("type")
        allowed = {"string"} if parameter.location != "query" else LANE_CONSTRUCTS["parameter type"]
        if not isinstance(kind, str) or kind not in allowed or parameter.schema.get("format") == "binary":
            raise LaneUnsupported(f"{at} has type {kind!r}, which the lane does not read in the {parameter.location}")
    if operation.body is not None:
        _only(operation.body.spec, LANE_CONSTRUCTS["request body"], f"{where}: the request body uses")
        _only(operation.body.content, LANE_CONSTRUCTS["body media type"], f"{where}: the request body is")
        _only(operation.body.content["application/json"], LANE_CONSTRUCTS["media type object"], f"{where}: the body's")
    _bearer_only(operation, where)
    media_type = _answer_media_type(operation, where)
    return Route(
        operation=operation,
        pattern=path_pattern(base_path, operation.path),
        response=operation.responses["200"]["content"][media_type]["schema"]
        if media_type == "application/json"
        else None,
        inputs=tuple(
            Input(
                p, (p.name.lower() if p.location == "header" else p.name).encode(), p.python_name in operation.accepts
            )
            for p in operation.parameters
        ),
        query_names=frozenset(p.name.encode() for p in operation.parameters_in("query")),
    )


def _answer_media_type(operation: Operation, where: str) -> str:
    """The media type of the operation's 200 answer: one the lane sends, matching what the handler
    returns, with no header declared that the answer does not always carry."""
    answers = {status: value.get("content", {}) for status, value in operation.responses.items()}
    if any(content for status, content in answers.items() if status != "200" and not status.startswith(("4", "5"))):
        raise LaneUnsupported(f"{where}: it answers {sorted(answers)}; the lane sends 200 and errors only")
    media_types: list[str] = list(answers.get("200", {}))
    _only(media_types, LANE_CONSTRUCTS["answer media type"], f"{where}: its 200 answer is")
    if len(media_types) != 1:
        raise LaneUnsupported(f"{where}: its 200 answer is {media_types!r}; the lane sends one media type")
    (media_type,) = media_types
    returns, sent = _ANSWERS[media_type]
    returned = typing.get_type_hints(operation.handler).get("return")
    if returned is not returns:
        raise LaneUnsupported(f"{where}: its handler returns {returned!r}, not what the lane sends as {media_type}")
    for header in operation.responses["200"].get("headers", {}):
        if header.lower() not in sent:
            raise LaneUnsupported(
                f"{where}: its 200 answer declares the header {header!r}, which the lane does not send"
            )
    return media_type


def _only(found: Iterable[str], allowed: set[str], context: str) -> None:
    for construct in found:
        if construct not in allowed and construct not in LANE_EXTENSIONS:
            raise LaneUnsupported(f"{context} {construct!r}, which the lane does not implement")


def _bearer_only(operation: Operation, where: str) -> None:
    """The operation's security must be one HTTP bearer scheme, which is what the lane verifies."""
    names = [name for requirement in operation.security for name in requirement]
    schemes = [operation.security_schemes.get(name, {}) for name in names]
    if (
        len(operation.security) != 1
        or len(names) != 1
        or schemes[0].get("type") != "http"
        or str(schemes[0].get("scheme", "")).lower() != "bearer"
    ):
        raise LaneUnsupported(
            f"{where}: its security is {operation.security!r}; the lane verifies one HTTP bearer scheme only"
        )


class FastLane:
    """ASGI middleware: serves the operations of `LANE_OPERATIONS` when it can, hands every other
    request (and every doubtful one) to the next app."""

    def __init__(self, app: ASGIApp, routes: list[Route], max_body_bytes: int, validate_responses: bool) -> None:
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.validate_responses = validate_responses  # as Connexion does when VALIDATE_RESPONSES=1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            for route in self.routes:
                if route.operation.method == method and (match := route.pattern.match(scope["path"])):
                    # For the request metrics and spans (`web.metrics`): a request handed on goes
                    # to Connexion's endpoint of the same operation, which names it alike.
                    scope.setdefault("state", {})["operation_id"] = route.operation.operation_id
                    try:
                        outcome = await self._serve(route, match.groupdict(), scope, receive, send)
                    except Exception as exc:  # raised before anything was sent: the lane sends last
                        await send_response(send, _error_response(exc))
                        return
                    if isinstance(outcome, EventStreamResponse):
                        # Run at once, nothing awaited in between: the response owns the stream and
                        # its slot, and releases them however it ends. Once it has started, its
                        # errors go to the server, as they do behind Connexion's handlers.
                        await outcome(scope, receive, send)
                    elif outcome is not None:
                        await self.app(scope, outcome, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: Route, path: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> Receive | EventStreamResponse | None:
        """Serve the request; or return the `receive` to hand it on to Connexion with (replaying
        the part of the body the lane read), or the stream's response for the caller to run."""
        operation = route.operation
        headers = _headers(scope)
        arguments = None if headers is None else _arguments(route, path, scope["query_string"], headers)
        if headers is None or arguments is None:
            return receive
        if operation.body is not None and _has_body(headers):
            return await self._serve_with_body(route, arguments, headers, scope=scope, receive=receive, send=send)
        # No body: one the operation declares (Connexion passes a default for an optional one), or
        # a body or media type on an operation that declares none, is Connexion's to judge (it
        # reads and parses bodies, and refuses one over the limit).
        if _has_body(headers) or b"content-type" in headers or operation.body is not None:
            return receive
        info = await self._token_info(scope, headers)
        if info is None:
            return receive
        return await self._answer(send, route, scope, await self._call(operation, scope, info, arguments))

    async def _serve_with_body(
        self,
        route: Route,
        arguments: dict[str, Any],
        headers: dict[bytes, bytes],
        *,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> Receive | EventStreamResponse | None:
        operation = route.operation
        assert operation.body is not None
        if headers.get(b"content-type") != b"application/json" or not _plainly_framed(
            headers, self.max_body_bytes, scope.get("http_version", "1.1")
        ):
            return receive
        declared = headers.get(b"content-length")
        length = int(declared) if declared is not None else None  # None: chunked
        # The token first, as Connexion checks it before reading the body: nobody has a body read
        # on their behalf without a valid token.
        info = await self._token_info(scope, headers)
        if info is None:
            return receive
        messages = await _read_body(receive, self.max_body_bytes)
        raw = b"".join(message.get("body", b"") for message in messages)
        body = _json_object(raw)
        schema = operation.body.content["application/json"].get("schema")
        if (
            messages[-1]["type"] != "http.request"  # the client left mid-body: nothing is stored
            or len(raw) > self.max_body_bytes  # a chunked body over the limit: Connexion's 413
            or (length is not None and len(raw) != length)
            or body is None
            or (schema is not None and not openapi31.compiled(schema).is_valid(body))
        ):
            return replay(messages, receive)
        if "body" in operation.accepts:
            arguments["body"] = body
        return await self._answer(send, route, scope, await self._call(operation, scope, info, arguments))

    @staticmethod
    async def _call(
        operation: Operation, scope: Scope, info: dict[str, Any], arguments: dict[str, Any]
    ) -> bytes | OpenedStream:
        deps: Deps = scope["state"]["deps"]
        result: bytes | OpenedStream = await operation.handler(deps, info["principal"], **arguments)
        return result

    async def _answer(
        self, send: Send, route: Route, scope: Scope, result: bytes | OpenedStream
    ) -> EventStreamResponse | None:
        """Send the operation's JSON answer (validated against the document when Connexion would
        validate it, with the same 500 when it does not conform); or return an opened stream's
        response, made as Connexion's endpoint makes it, for the caller to run."""
        if isinstance(result, OpenedStream):
            return stream_response(scope["state"]["deps"], result)
        if (
            self.validate_responses
            and route.response is not None
            and (problem := openapi31.nonconforming(route.response, orjson.loads(result)))
        ):
            await send_response(send, errors.problem_response(problem))
            return None
        await send({"type": "http.response.start", "status": 200, "headers": _json_headers(result)})
        await send({"type": "http.response.body", "body": result})
        return None

    @staticmethod
    async def _token_info(scope: Scope, headers: dict[bytes, bytes]) -> dict[str, Any] | None:
        """The token's info, or None for Connexion to refuse it (raises `BackendUnavailable` when
        the keys cannot be fetched)."""
        authorization = headers.get(b"authorization", b"")
        if not authorization.startswith(b"Bearer ") or b" " in authorization[7:] or len(authorization) < 8:
            return None
        return await token_info(scope["state"]["verifier"], authorization[7:].decode("latin-1"))


def _arguments(route: Route, path: dict[str, str], query: bytes, headers: dict[bytes, bytes]) -> dict[str, Any] | None:
    """The handler's arguments from the path, query and header parameters, each valid by its
    schema, defaults applied; None when any is doubtful (Connexion judges the request then)."""
    given = _query(query)
    # A token in the query is for the security layer to move to the header (`QueryTokenForStreams`).
    if given is None or not route.query_names.issuperset(given) or _QUERY_TOKEN in given:
        return None
    arguments: dict[str, Any] = {}
    for one in route.inputs:
        parameter = one.parameter
        if parameter.location == "path":
            value: Any = path[parameter.name]
        elif parameter.location == "query":
            raw = given.get(one.wire)
            value = MISSING if raw is None else _typed(parameter, raw)
            if value is None:
                return None
        else:
            raw = headers.get(one.wire)
            value = MISSING if raw is None else raw.decode("latin-1")
        if value is MISSING:
            if parameter.required:
                return None
            # Connexion fills in the defaults of query parameters only; so does the lane.
            value = parameter.default if parameter.location == "query" else MISSING
            if value is MISSING:
                continue
        elif not parameter.validator.is_valid(value):
            return None
        if one.accepted:
            arguments[parameter.python_name] = value
    return arguments


def _query(query: bytes) -> dict[bytes, bytes] | None:
    """`name=value` pairs, each name once and each value plain; None otherwise."""
    pairs: dict[bytes, bytes] = {}
    if not query:
        return pairs
    for pair in query.split(b"&"):
        name, equals, value = pair.partition(b"=")
        if not equals or name in pairs or not _PLAIN.match(name) or not _PLAIN.match(value):
            return None
        pairs[name] = value
    return pairs


def _typed(parameter: Parameter, raw: bytes) -> Any:
    """A query value as its schema's type, or None when the lane would not read it so."""
    kind = parameter.schema.get("type")
    if kind == "integer":
        return int(raw) if _INTEGER.match(raw) else None
    if kind == "boolean":
        return _BOOLEANS.get(raw)
    return raw.decode("ascii")


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def _error_response(exc: Exception) -> ConnexionResponse:
    """The error as Connexion's error handlers shape it (`web.errors`)."""
    if isinstance(exc, DomainError):
        return errors.domain_error_response(exc)
    return errors.unexpected_error_response(exc)


def _headers(scope: Scope) -> dict[bytes, bytes] | None:
    """The request's headers by lower-case name; None when one is repeated (a doubtful request)."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in headers:
            return None
        headers[name] = value
    return headers


def _plainly_framed(headers: dict[bytes, bytes], max_bytes: int, http_version: str) -> bool:
    """A body with a Content-Length within the limit, or a chunked one in HTTP/1.1 (read up to
    the limit); no body at all, or one framed any other way (`gzip, chunked`, chunked in
    HTTP/1.0), is Connexion's to judge (`web.middleware.ChunkedBody` answers 501)."""
    declared = headers.get(b"content-length")
    if declared is not None:
        return declared.isdigit() and int(declared) <= max_bytes
    return headers.get(b"transfer-encoding", b"").lower() == b"chunked" and http_version == "1.1"


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = openapi31.load_json(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _read_body(receive: Receive, max_bytes: int) -> list[Message]:
    """The body's messages, up to the last one, to the client's disconnect, or to the first one
    that takes the body over `max_bytes` (its `more_body` is then still true)."""
    messages, received = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages
        received += len(message.get("body", b""))
        if received > max_bytes:
            return messages


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
