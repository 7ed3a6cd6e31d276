"""The fast lane: the two update operations workflows call in a loop, served without Connexion's stack.

Posting an update and reading a run's updates are the hot path (a workflow posts many updates per
run, a UI polls them). Connexion's middlewares cost about 450 µs of CPU per request, more than the
whole request in a bare Starlette handler (issue 7). This lane answers those two operations
directly, for requests that are *plainly valid*:

- it is built from the same bundled document (paths, parameter and body schemas, compiled once with
  the same 2020-12 validators as `server.openapi31`);
- it takes a request only when everything about it is unremarkable: the path matches, the query is
  empty or one well-formed `since`, the body is a JSON object of `application/json`, every
  parameter and the body pass their schemas, and the bearer token verifies;
- anything else (a malformed token, an unknown parameter, an invalid body, ...) is handed on to
  Connexion untouched (the body it read is replayed), so every refusal keeps Connexion's exact
  answer and there is one implementation of each error message;
- the operation itself is the same handler code (`handlers.updates`); its domain errors (403, 404,
  413, 503) propagate to Connexion's exception middleware like any handler's.

`tests/unit/test_fast_lane.py` proves, request by request, that the lane and Connexion answer the
same; `FAST_LANE=0` turns it off.
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
from handlers import updates
from server import errors, openapi31
from server.auth import token_info
from server.context import Backends

_SINCE = re.compile(rb"^since=([0-9]{1,19})$")


@dataclass(frozen=True)
class Route:
    """One operation of the document as the lane needs it."""

    method: str
    pattern: re.Pattern[str]
    params: dict[str, jsonschema_rs.Validator]  # path, query and header parameters by name
    body: jsonschema_rs.Validator | None
    response: dict[str, Any]  # the schema of the 200 answer


def route_of(document: dict[str, Any], base_path: str, operation_id: str) -> Route:
    """The operation's path as a regex and its parameter and body validators, from the document
    (with its references resolved, as Connexion resolves them)."""
    for template, item in document["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or operation.get("operationId") != operation_id:
                continue
            params = {
                param["name"].lower() if param["in"] == "header" else param["name"]: openapi31.compiled(param["schema"])
                for param in operation.get("parameters", [])
            }
            body = None
            if "requestBody" in operation:
                body = openapi31.compiled(operation["requestBody"]["content"]["application/json"]["schema"])
            response = operation["responses"]["200"]["content"]["application/json"]["schema"]
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(base_path + template))
            return Route(method.upper(), re.compile(f"^{regex}$"), params, body, response)
    raise LookupError(f"no operation {operation_id} in the document")


class FastLane:
    """ASGI middleware: serves `postWorkflowRunUpdate` and `getWorkflowRunUpdates` when it can,
    hands every other request (and every doubtful one) to the next app."""

    def __init__(
        self, app: ASGIApp, document: dict[str, Any], base_path: str, max_body_bytes: int, validate_responses: bool
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.validate_responses = validate_responses  # as Connexion does when VALIDATE_RESPONSES=1
        resolved = resolve_refs(copy.deepcopy(document))
        self.post = route_of(resolved, base_path, "postWorkflowRunUpdate")
        self.get = route_of(resolved, base_path, "getWorkflowRunUpdates")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "POST" and (match := self.post.pattern.match(scope["path"])):
                await self._post(match.groupdict(), scope, receive, send)
                return
            if method == "GET" and (match := self.get.pattern.match(scope["path"])):
                await self._get(match.groupdict(), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _get(self, path: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
        query = scope["query_string"]
        since = 0
        if query:
            found = _SINCE.match(query)
            if found is None or not self.get.params["since"].is_valid(since := int(found[1])):
                await self.app(scope, receive, send)
                return
        headers = _headers(scope)
        info = await self._token_info(scope, headers)
        # A GET has no body; one that declares a media type is Connexion's to judge (it parses it).
        if info is None or b"content-type" in headers or not _valid(self.get.params, path, headers):
            await self.app(scope, receive, send)
            return
        reading = updates.read_updates(_backends(scope), info, path["workflowId"], path["runId"], since)
        await self._answer(send, self.get, reading)

    async def _post(self, path: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        length = headers.get(b"content-length", b"")
        if (
            scope["query_string"]
            or headers.get(b"content-type") != b"application/json"
            or not length.isdigit()
            or int(length) > self.max_body_bytes
        ):
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        info = await self._token_info(scope, headers)
        if info is not None and _valid(self.post.params, path, headers):
            update = _json_object(raw)
            if update is not None and self.post.body is not None and self.post.body.is_valid(update):
                appending = updates.append_update(_backends(scope), info, path["runId"], update)
                await self._answer(send, self.post, appending)
                return
        await self.app(scope, _replay(raw, receive), send)

    async def _answer(self, send: Send, route: Route, operation: Awaitable[bytes | None]) -> None:
        """Run the operation and send its JSON answer (None: `{"success":true}`), or its error
        exactly as Connexion's error handlers would have (`server.errors`)."""
        try:
            body = await operation or updates.SUCCESS
        except DomainError as exc:
            await _send(send, errors.domain_error_response(exc))
            return
        except Exception as exc:  # what Connexion's handler of last resort does
            await _send(send, errors.unexpected_error_response(exc))
            return
        if self.validate_responses and (problem := openapi31.nonconforming(route.response, orjson.loads(body))):
            await _send(send, errors.problem_response(problem))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _json_headers(body)})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _token_info(scope: Scope, headers: dict[bytes, bytes]) -> dict[str, Any] | None:
        authorization = headers.get(b"authorization", b"")
        if not authorization.startswith(b"Bearer ") or b" " in authorization[7:] or len(authorization) < 8:
            return None
        return await token_info(scope["state"]["verifier"], authorization[7:].decode("latin-1"))


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by lower-case name; a repeated header makes the request doubtful."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in headers:
            headers[b"\x00repeated"] = b""
        headers[name] = value
    return headers


def _valid(params: dict[str, jsonschema_rs.Validator], path: dict[str, str], headers: dict[bytes, bytes]) -> bool:
    if b"\x00repeated" in headers:
        return False
    for name, value in path.items():
        if not params[name].is_valid(value):
            return False
    version = headers.get(b"x-api-version")
    return version is None or params["x-api-version"].is_valid(version.decode("latin-1"))


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _backends(scope: Scope) -> Backends:
    backends: Backends = scope["state"]["backends"]
    return backends


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives the next app the body the lane already read."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # after the body, only the disconnect is left to wait for
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replayed

    return receive


async def _send(send: Send, response: ConnexionResponse) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
