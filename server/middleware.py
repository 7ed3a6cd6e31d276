"""Small ASGI middlewares around Connexion's stack (their order is set in `server.app`)."""

from __future__ import annotations

import os
import re
import time
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.errors import PayloadTooLarge
from server.logs import access_log, monotonic_ms, request_id_var

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
STREAM_AUTH_PARAM = "access_token"  # the stream's token in the query: accepted there, never logged


def redacted_query(query_string: bytes) -> str:
    # Most queries hold neither the name nor an escape that could spell it (`access%5Ftoken`).
    if STREAM_AUTH_PARAM.encode() not in query_string and b"%" not in query_string:
        return query_string.decode("latin-1")
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, "[redacted]" if k == STREAM_AUTH_PARAM else v) for k, v in pairs])


class RequestContext:
    """Gives every request an id (the caller's `X-Request-ID` when sane, else a new one), echoes it
    in the response and writes one access-log line per request, with secrets redacted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else os.urandom(16).hex()
        token = request_id_var.set(request_id)
        start, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Appended as is (no header object per response): nothing else sets this header.
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            method, path = scope["method"], scope["path"]
            access_log.write(
                f"{method} {path} {status}",
                {
                    "method": method,
                    "path": path,
                    "query": redacted_query(scope.get("query_string", b"")),
                    "status": status,
                    "duration_ms": monotonic_ms(start),
                },
            )
            request_id_var.reset(token)


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with 413 before they are read whole, whether or not the
    client sent a Content-Length. Sits inside Connexion's exception middleware, so the raised
    `PayloadTooLarge` becomes the JSON error body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"The request body exceeds the limit of {self.max_bytes} bytes.")
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise PayloadTooLarge(f"The request body exceeds the limit of {self.max_bytes} bytes.")
            return message

        await self.app(scope, counting_receive, send)


class QueryTokenForStreams:
    """A browser EventSource cannot set headers, so the stream operation also takes the token as the
    `access_token` query parameter (REFERENCE.md). Only there: on any other path it is left alone,
    and strict validation refuses it as an unknown parameter."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].endswith("/stream"):
            headers = MutableHeaders(scope=scope)
            if "authorization" not in headers:
                for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                    # A token is ASCII (base64url and dots); anything else is no token (401).
                    if key == STREAM_AUTH_PARAM and value and value.isascii():
                        headers["Authorization"] = f"Bearer {value}"
                        break
        await self.app(scope, receive, send)


class SeedPathOverlap:
    """The seed's paths overlap: `/workflows/runs/X/updates` is both the POST-updates resource and,
    read as `/workflows/runs/{workflowId}/{runId}`, a run whose id is `updates`. Run ids are UUIDs,
    so only the first reading can be meant: any other method than POST gets 405 with `Allow: POST`
    instead of a 400 about a malformed run id."""

    def __init__(self, app: ASGIApp, base_path: str) -> None:
        self.app = app
        self.pattern = re.compile(rf"^{re.escape(base_path)}/workflows/runs/[^/]+/updates/?$")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "POST" and self.pattern.match(scope["path"]):
            raise HTTPException(405, headers={"Allow": "POST"})
        await self.app(scope, receive, send)


class MediaTypeCase:
    """Media types are case-insensitive (RFC 9110, 8.3.1), but Connexion's JSON check is not: a body
    sent as `Application/JSON` reached the handler undecoded (a 500). The type and subtype are
    lower-cased before anything reads them; parameters such as `charset` are left as sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            for index, (name, value) in enumerate(headers):
                if name == b"content-type":
                    media_type, separator, parameters = value.partition(b";")
                    if media_type != media_type.lower():
                        lowered = (name, media_type.lower() + separator + parameters)
                        scope = {**scope, "headers": [*headers[:index], lowered, *headers[index + 1 :]]}
                    break
        await self.app(scope, receive, send)
