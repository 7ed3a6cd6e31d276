"""The fast lane: the three operations clients call in a loop, served without Connexion's stack.

Posting an update, reading a run's updates and reading a run's details are the hot path (a workflow
posts many updates per run, a UI polls the others). Connexion's middlewares cost about 450 µs of
CPU per request, more than a whole request in a bare Starlette handler (`make bench`). This lane answers
those operations directly, for requests that are *plainly valid*:

- it is built from the same bundled document (paths, parameter and body schemas, compiled once with
  the same 2020-12 validators as `server.openapi31`);
- it takes a request only when everything about it is unremarkable: the path matches, the query is
  empty or one well-formed `since` where the operation has it, a body is a JSON object sent as
  `application/json` within the size limit, every parameter and the body pass their schemas, and
  the bearer token verifies;
- anything else (a malformed token, an unknown parameter, an invalid body, ...) is handed on to
  Connexion untouched (a body the lane read is replayed), so every refusal keeps Connexion's exact
  answer and each error message has one implementation;
- the operation itself is the handlers' code (`OPERATIONS`), and its domain errors (403, 404, 413,
  503) leave as `server.errors` shapes them for Connexion; with VALIDATE_RESPONSES=1 its answers
  are validated against the document as Connexion's are.

`tests/unit/test_fast_lane.py` proves, request by request, that the lane and Connexion answer the
same; `FAST_LANE=0` turns the lane off.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import orjson
from connexion.json_schema import resolve_refs
from connexion.lifecycle import ConnexionResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.errors import DomainError
from handlers import runs, updates
from server import errors, openapi31
from server.auth import token_info
from server.context import Backends

_SINCE = re.compile(rb"^since=([0-9]{1,19})\Z")


# What the lane calls for each operation it serves: the same code as the Connexion handler, given
# the backends, the token's info and the request's inputs (its path parameters, plus `since` or the
# JSON `body` where the operation has one).
Operation = Callable[[Backends, dict[str, Any], dict[str, Any]], Awaitable[bytes]]
OPERATIONS: dict[str, Operation] = {
    "getWorkflowRun": lambda context, info, p: runs.run_details(context, info, p["workflowId"], p["runId"]),
    "getWorkflowRunUpdates": lambda context, info, p: updates.read_updates(
        context, info, p["workflowId"], p["runId"], p["since"]
    ),
    "postWorkflowRunUpdate": lambda context, info, p: updates.append_update(context, info, p["runId"], p["body"]),
}


@dataclass(frozen=True)
class Route:
    """One operation of the document as the lane needs it."""

    operation: Operation
    method: str
    pattern: re.Pattern[str]
    path: dict[str, jsonschema_rs.Validator]  # path parameters by name
    since: jsonschema_rs.Validator | None  # the one query parameter the lane knows how to read
    headers: dict[bytes, jsonschema_rs.Validator]  # header parameters by lower-case name
    body: jsonschema_rs.Validator | None
    response: dict[str, Any]  # the schema of the 200 answer


def route_of(document: dict[str, Any], base_path: str, operation_id: str) -> Route:
    """The operation's path as a regex and its parameter and body validators, from the document
    (with its references resolved, as Connexion resolves them)."""
    for template, item in document["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or operation.get("operationId") != operation_id:
                continue
            params: dict[str, dict[str, jsonschema_rs.Validator]] = {"path": {}, "query": {}, "header": {}}
            for param in operation.get("parameters", []):
                params[param["in"]][param["name"].lower() if param["in"] == "header" else param["name"]] = (
                    openapi31.compiled(param["schema"])
                )
            if set(params["query"]) - {"since"}:
                raise ValueError(f"{operation_id}: the fast lane reads no query parameter but `since`")
            body = None
            if "requestBody" in operation:
                body = openapi31.compiled(operation["requestBody"]["content"]["application/json"]["schema"])
            # Parameters stop at `/` and at a newline: Connexion mounts the API under its base path
            # with `.*`, which never crosses a newline (such paths are Connexion's to refuse).
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/\\n]+)", re.escape(base_path + template))
            return Route(
                operation=OPERATIONS[operation_id],
                method=method.upper(),
                pattern=re.compile(rf"^{regex}\Z"),
                path=params["path"],
                since=params["query"].get("since"),
                headers={name.encode(): validator for name, validator in params["header"].items()},
                body=body,
                response=operation["responses"]["200"]["content"]["application/json"]["schema"],
            )
    raise LookupError(f"no operation {operation_id} in the document")


class FastLane:
    """ASGI middleware: serves the operations of `OPERATIONS` when it can, hands every other
    request (and every doubtful one) to the next app."""

    def __init__(
        self, app: ASGIApp, document: dict[str, Any], base_path: str, max_body_bytes: int, validate_responses: bool
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.validate_responses = validate_responses  # as Connexion does when VALIDATE_RESPONSES=1
        resolved = resolve_refs(copy.deepcopy(document))
        self.routes = [route_of(resolved, base_path, operation_id) for operation_id in OPERATIONS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            for route in self.routes:
                if route.method == method and (match := route.pattern.match(scope["path"])):
                    serve = self._post if method == "POST" else self._get
                    try:
                        hand_on = await serve(route, match.groupdict(), scope, receive, send)
                    except Exception as exc:  # raised before anything was sent: the lane sends last
                        await _send(send, _error_response(exc))
                        return
                    if hand_on is not None:
                        await self.app(scope, hand_on, send)
                    return
        await self.app(scope, receive, send)

    async def _get(
        self, route: Route, params: dict[str, Any], scope: Scope, receive: Receive, send: Send
    ) -> Receive | None:
        """Serve a GET, or return the `receive` to hand it on to Connexion with."""
        query = scope["query_string"]
        if route.since is not None:
            found = _SINCE.match(query) if query else None
            params["since"] = int(found[1]) if found else 0
            if (query and found is None) or not route.since.is_valid(params["since"]):
                return receive
        elif query:
            return receive
        headers = _headers(scope)
        # A GET has no body: one that declares a body or its media type is Connexion's to judge
        # (it reads and parses them, and refuses a body over the size limit).
        if (
            headers is None
            or headers.get(b"content-length", b"0") != b"0"
            or b"transfer-encoding" in headers
            or b"content-type" in headers
            or not _valid(route, params, headers)
        ):
            return receive
        info = await self._token_info(scope, headers)
        if info is None:
            return receive
        await self._answer(send, route, await route.operation(_backends(scope), info, params))
        return None

    async def _post(
        self, route: Route, params: dict[str, Any], scope: Scope, receive: Receive, send: Send
    ) -> Receive | None:
        """Serve a POST, or return the `receive` to hand it on to Connexion with (replaying the
        part of the body the lane read)."""
        headers = _headers(scope)
        if (
            headers is None
            or not _valid(route, params, headers)
            or scope["query_string"]
            or headers.get(b"content-type") != b"application/json"
            or not _plainly_framed(headers, self.max_body_bytes, scope.get("http_version", "1.1"))
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
        last = messages[-1]
        if (
            last["type"] != "http.request"  # the client left mid-body: nothing is stored
            or len(raw) > self.max_body_bytes  # a chunked body over the limit: Connexion's 413
            or (length is not None and len(raw) != length)
        ):
            return _replay(messages, receive)
        body = _json_object(raw)
        if body is None or route.body is None or not route.body.is_valid(body):
            return _replay(messages, receive)
        await self._answer(send, route, await route.operation(_backends(scope), info, {**params, "body": body}))
        return None

    async def _answer(self, send: Send, route: Route, body: bytes) -> None:
        """Send the operation's JSON answer (validated against the document when Connexion would
        validate it, with the same 500 when it does not conform)."""
        if self.validate_responses and (problem := openapi31.nonconforming(route.response, orjson.loads(body))):
            await _send(send, errors.problem_response(problem))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _json_headers(body)})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _token_info(scope: Scope, headers: dict[bytes, bytes]) -> dict[str, Any] | None:
        """The token's info, or None for Connexion to refuse it (raises `BackendUnavailable` when
        the keys cannot be fetched)."""
        authorization = headers.get(b"authorization", b"")
        if not authorization.startswith(b"Bearer ") or b" " in authorization[7:] or len(authorization) < 8:
            return None
        return await token_info(scope["state"]["verifier"], authorization[7:].decode("latin-1"))


def _error_response(exc: Exception) -> ConnexionResponse:
    """The error as Connexion's error handlers shape it (`server.errors`)."""
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
    HTTP/1.0), is Connexion's to judge (`server.middleware.ChunkedBody` answers 501)."""
    declared = headers.get(b"content-length")
    if declared is not None:
        return declared.isdigit() and int(declared) <= max_bytes
    return headers.get(b"transfer-encoding", b"").lower() == b"chunked" and http_version == "1.1"


def _valid(route: Route, params: dict[str, Any], headers: dict[bytes, bytes]) -> bool:
    """Whether the path parameters and the header parameters pass their schemas."""
    for param, validator in route.path.items():
        if not validator.is_valid(params[param]):
            return False
    for header, validator in route.headers.items():
        value = headers.get(header)
        if value is not None and not validator.is_valid(value.decode("latin-1")):
            return False
    return True


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = openapi31.load_json(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _backends(scope: Scope) -> Backends:
    backends: Backends = scope["state"]["backends"]
    return backends


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


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives the next app the messages the lane already read, then the rest."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _send(send: Send, response: ConnexionResponse) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
