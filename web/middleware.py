"""Small ASGI middlewares around Connexion's stack (their order is set in `web.app`)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import time
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import PayloadTooLarge
from web import errors
from web.asgi import replay, send_response
from web.logs import access_log, clip, monotonic_ms, request_id_var

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
STREAM_AUTH_PARAM = "access_token"  # the stream's token in the query: accepted there, never logged
REDACTED = "[redacted]"
# What a query must hold for it to carry a secret the log must not show: a dot (a JWT has two), an
# escape (which could spell a dot or the name) or the stream's parameter name in any case.
_MAYBE_SECRET = re.compile(rb"[.%]|(?i:access_token)")
# A JWS in compact form: three base64url segments (the signature may be empty); a JWE has five.
_JWT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]*){2,4}$")
# A JWT inside a longer value (`Bearer eyJ...`): its header is base64url JSON, so starts `eyJ`.
_EMBEDDED_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.")


def looks_like_jwt(value: str) -> bool:
    """Whether `value` is, or holds, a compact JWT: base64url segments separated by dots, the
    first one a JSON object (`eyJ` is `{"` encoded, how every real header starts)."""
    if not _JWT.match(value):
        return "eyJ" in value and _EMBEDDED_JWT.search(value) is not None
    header = value.partition(".")[0]
    if header.startswith("eyJ"):
        return True
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except ValueError:  # not base64 (binascii.Error) or not JSON (orjson's error): both ValueErrors
        return False
    return isinstance(decoded, dict)


def redacted_query(query_string: bytes) -> str:
    """The query as the access log shows it: `access_token` (whatever its case or escaping) and
    any parameter whose value is a JWT, whatever its name, replaced by `[redacted]`."""
    # Most queries hold no dot, no escape and not the name: logged as they are.
    if not _MAYBE_SECRET.search(query_string):
        return query_string.decode("latin-1")
    text = query_string.decode("latin-1")
    pairs = parse_qsl(text, keep_blank_values=True)
    redacted = [(k, REDACTED if k.lower() == STREAM_AUTH_PARAM or looks_like_jwt(v) else v) for k, v in pairs]
    return urlencode(redacted) if redacted != pairs else text


# Status written to the access log for a request the application never answered because its
# client left (or the transport closed it) before the request was whole: nginx's "client closed".
CLIENT_GONE_STATUS = 499


class RequestContext:
    """Gives every request an id (the caller's `X-Request-ID` when sane, else a new one), echoes it
    in the response with `X-Content-Type-Options: nosniff`, and writes one access-log line per
    request, with secrets redacted. An exception from inside it before any answer is answered
    here, with the JSON 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope["headers"])
        token = request_id_var.set(request_id)
        start, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Appended as is (no header object per response): nothing else sets these headers.
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status:
                raise  # an answer began: the server ends the connection, and logs the exception
            # Nothing answered yet: the JSON 500 with this request's id, as the handlers' errors
            # get it (an unexpected error inside Connexion's stack is answered by its handler).
            await send_response(send_with_id, errors.unexpected_error_response(exc))
        except BaseException:
            status = status or 500  # what the server answers for an exception that got this far
            raise
        finally:
            method, path = scope["method"], clip(scope["path"])
            access_log.write(
                f"{method} {path} {status or CLIENT_GONE_STATUS}",
                {
                    "method": method,
                    "path": path,
                    "query": clip(redacted_query(scope.get("query_string", b""))),
                    "status": status or CLIENT_GONE_STATUS,
                    "duration_ms": monotonic_ms(start),
                },
            )
            request_id_var.reset(token)


class _RequestIds:
    """New request ids: 32 hex digits, a random prefix per process and a counter, unique across
    processes and restarts without a system call per request. The counter is scrambled (times an
    odd constant, then a random mask: a one-to-one map of 64-bit numbers), so that ids do not show
    how many requests a process served; they need not be unguessable, as a caller may send its own."""

    def __init__(self) -> None:
        self.reseed()
        # A forked worker must not hand out its parent's ids.
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._mask = int.from_bytes(os.urandom(8), "big")
        self._count = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{(next(self._count) * _ODD ^ self._mask) & _SIXTY_FOUR_BITS:016x}"


_ODD = 0x9E3779B97F4A7C15  # 2**64 over the golden ratio, made odd: consecutive counts land far apart
_SIXTY_FOUR_BITS = (1 << 64) - 1


_request_ids = _RequestIds()


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `X-Request-ID` when sane (the first one sent), else a new id."""
    for name, value in headers:
        if name == b"x-request-id":
            incoming = value.decode("latin-1")
            return incoming if _REQUEST_ID.match(incoming) else _request_ids.new()
    return _request_ids.new()


class _ClientLeft(Exception):
    """The client went away before its request body was whole: there is nobody to answer."""


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with 413 before they are read whole, whether or not the
    client sent a Content-Length. Sits inside Connexion's exception middleware, so the raised
    `PayloadTooLarge` becomes the JSON error body.

    It also ends a request whose client left mid-body, quietly: the disconnect would otherwise
    reach a handler as a truncated body (a 400 nobody reads) or as Starlette's `ClientDisconnect`
    (logged as a 500 with its traceback). The access log shows 499 for it."""

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
        received, whole = 0, False

        async def counting_receive() -> Message:
            nonlocal received, whole
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(f"The request body exceeds the limit of {self.max_bytes} bytes.")
                whole = not message.get("more_body", False)
            elif not whole:  # `http.disconnect` before the last part of the body
                raise _ClientLeft
            return message

        with contextlib.suppress(_ClientLeft):
            await self.app(scope, counting_receive, send)


class ChunkedBody:
    """A body sent with `Transfer-Encoding: chunked` (no Content-Length) is read whole and handed
    on as if it had come with a Content-Length: Connexion's body validation looks only at that
    header and refused such a body as absent ("RequestBody is required"). It sits after
    authentication, as Connexion's own reading of the body does, and inside `BodySizeLimit`, so
    a chunked body over the limit is a 413 like any other.

    Any other transfer coding (`gzip, chunked`, a repeated header) and chunked in HTTP/1.0 are
    501: the server would otherwise decode only the chunks and hand on a body still in the other
    coding as if it were plain."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        framing = _framing(scope)
        if framing is None:
            await self.app(scope, receive, send)
            return
        if not framing:
            await send_response(send, errors.error_response(501, UNSUPPORTED_TRANSFER_CODING))
            return
        parts = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # Gone mid-body: `BodySizeLimit` has already ended the request; in any other
                # arrangement, let the next app see the disconnect.
                await self.app(scope, replay([message], receive), send)
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        headers = [(k, v) for k, v in scope["headers"] if k != b"transfer-encoding"]
        headers.append((b"content-length", str(len(body)).encode()))
        whole: Message = {"type": "http.request", "body": body, "more_body": False}
        await self.app({**scope, "headers": headers}, replay([whole], receive), send)


UNSUPPORTED_TRANSFER_CODING = "Only the chunked transfer coding, alone and in HTTP/1.1, is implemented."


def _framing(scope: Scope) -> bool | None:
    """None: no transfer coding (a Content-Length or no body); True: plain chunked; False: a
    transfer coding this server does not implement."""
    codings = [value for name, value in scope["headers"] if name == b"transfer-encoding"]
    if not codings:
        return None
    return len(codings) == 1 and codings[0].strip().lower() == b"chunked" and scope.get("http_version") == "1.1"


class QueryTokenForStreams:
    """A browser EventSource cannot set headers, so the stream operation also takes the token as the
    `access_token` query parameter, as the live service's clients send it. Only there: on any other
    path it is left alone, and strict validation refuses it as an unknown parameter."""

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
