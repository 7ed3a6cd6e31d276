"""The codec server: Temporal's remote codec protocol over `workloads.codec.EncryptionCodec`, so that
the Web UI, the `temporal` CLI and this project's API can read payloads the samples encrypt.

The protocol (https://docs.temporal.io/codec-server): `POST /decode` and `POST /encode` take
`{"payloads": [{"metadata": {name: base64}, "data": base64}, ...]}` (Payloads in proto JSON) and
answer the same shape, one payload out for each payload in. Both are also served under one leading
path segment, `/{namespace}/decode`, for clients that put the namespace in the endpoint (the CLI's
`--codec-endpoint 'http://host/{namespace}'`); the key is the same for every namespace, so the
segment (like the `X-Namespace` header) is accepted and not used.

What a request may cost is bounded: a body beyond `max_body_bytes` is refused with 413 (as soon as
its Content-Length, or what was read of it, says so), and so is one of more than
`MAX_PAYLOADS_PER_REQUEST` payloads. A body must say it is JSON (415 otherwise). Errors are JSON, `{"error", "status",
"message"}` in this module's own words: nothing of an exception, of the key, or of the payloads is
echoed. A payload this server cannot decrypt (another key id, or data that does not verify) is
answered as it came, so one old or foreign payload does not hide a whole history.

With `auth`, a request must carry exactly that Authorization value (401 otherwise). CORS answers the
Web UI's origins (`cors_origins`): preflights are answered before authentication (a browser sends
them without Authorization), and every answer, errors included, carries the origin's headers so the
page can read it. Credentials are not allowed: the server reads no cookie, so the Web UI's "include
cross-origin credentials" stays off.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payload

from core.codec_wire import payload_of, payloads_json
from workloads.codec import EncryptionCodec, is_encrypted

log = logging.getLogger(__name__)

# CODEC_MAX_BODY_BYTES: base64 makes a body ~4/3 of its payloads, so this admits a batch of ~6 MiB of
# payloads, three of Temporal's default 2 MB payload limit.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# Payloads in one request. The body's bytes alone do not bound the work: a body of empty objects
# (`{}` is three bytes) would ask for millions of payloads, each answered with a dozen bytes or more.
# The API sends at most a history page's worth (1000 events, a few payloads each).
MAX_PAYLOADS_PER_REQUEST = 20_000
CORS_METHODS = ("POST",)
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "X-Namespace")
CORS_MAX_AGE_SECONDS = 600
JSON_MEDIA_TYPES = ("application/json",)

Codec = Callable[[Sequence[Payload]], Awaitable[list[Payload]]]


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": HTTPStatus(status).phrase, "status": status, "message": message})
    return Response(body, status, headers=headers, media_type="application/json")


class CodecCors(CORSMiddleware):
    """Starlette's CORS middleware with a JSON body for a refused preflight."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers=request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("latin-1").removeprefix("Disallowed CORS ")
        message = (
            f"Cross-origin request refused ({refused} not allowed): this codec server allows POST with the"
            f" headers {', '.join(CORS_REQUEST_HEADERS)}, from the origins it is configured for."
        )
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return error_response(400, message, headers)


def _challenge(auth: str) -> str:
    scheme = auth.split(" ", 1)[0] if " " in auth else "Bearer"
    return f'{scheme} realm="codec-server"'


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 once it is known to exceed `limit` bytes."""
    too_large = _Refused(413, f"The body exceeds this codec server's limit of {limit} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_payloads(body: bytes) -> list[Payload]:
    """The payloads of a `{"payloads": [...]}` body (proto JSON: bytes as base64, standard or URL-safe
    alphabet, padding optional; unknown fields ignored); `_Refused` (400) for anything else."""
    try:
        document: Any = orjson.loads(body)
        if not isinstance(document, dict):
            raise ValueError
        items = document.get("payloads", [])
        if not isinstance(items, list):
            raise ValueError
        if len(items) > MAX_PAYLOADS_PER_REQUEST:
            raise _Refused(413, f"A request may carry at most {MAX_PAYLOADS_PER_REQUEST} payloads.")
        return [payload_of(item) for item in items]
    except ValueError:  # orjson.JSONDecodeError and binascii.Error are ValueErrors
        raise _Refused(
            400, 'The body must be JSON: {"payloads": [{"metadata": {name: base64}, "data": base64}, ...]}.'
        ) from None


def create_codec_app(
    key: bytes,
    *,
    auth: str | None,
    cors_origins: list[str],
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    key_id: str | None = None,
) -> Starlette:
    """The codec server's ASGI app for `key` (32 bytes; its id defaults to `key_id_of(key)`)."""
    codec = EncryptionCodec(key, key_id=key_id)
    expected = auth.encode("utf-8") if auth else None

    async def decode(payloads: Sequence[Payload]) -> list[Payload]:
        out: list[Payload] = []
        left = 0
        for payload in payloads:
            decrypted = codec.try_decrypt(payload) if is_encrypted(payload) else payload
            left += decrypted is None
            out.append(payload if decrypted is None else decrypted)
        if left:
            log.info("codec server left %d payload(s) encrypted: another key id, or data that does not verify", left)
        return out

    async def apply(request: Request, fn: Codec) -> Response:
        try:
            if expected is not None:
                given = request.headers.get("authorization", "").encode("utf-8")
                if not hmac.compare_digest(given, expected):
                    raise _Refused(
                        401,
                        "This codec server needs the Authorization value it is configured with.",
                        {"WWW-Authenticate": _challenge(auth or "")},
                    )
            # A Content-Type is required: without one (or with a form's), a page on any site could
            # post here from a browser with no preflight.
            media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type not in JSON_MEDIA_TYPES:
                raise _Refused(415, "The body must be application/json.")
            payloads = parse_payloads(await read_body(request, max_body_bytes))
            return Response(payloads_json(await fn(payloads)), media_type="application/json")
        except _Refused as refused:
            return error_response(refused.status, refused.message, refused.headers)
        except Exception:
            # Logged for the operator (no payload data is in it); the caller reads a fixed sentence.
            log.exception("codec server failed on %s", request.url.path)
            return error_response(500, "The codec server failed on this request.")

    async def decode_endpoint(request: Request) -> Response:
        return await apply(request, decode)

    async def encode_endpoint(request: Request) -> Response:
        return await apply(request, codec.encode)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        message = {
            404: "No such path: this codec server answers POST /decode and POST /encode.",
            405: "This path answers POST only.",
        }.get(status, HTTPStatus(status).phrase)
        return error_response(status, message, headers)

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CodecCors,
                allow_origins=list(cors_origins),
                allow_methods=CORS_METHODS,
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=("WWW-Authenticate",),
                allow_credentials=False,
                max_age=CORS_MAX_AGE_SECONDS,
            )
        )
    routes = [
        Route("/decode", decode_endpoint, methods=["POST"]),
        Route("/encode", encode_endpoint, methods=["POST"]),
        Route("/{namespace}/decode", decode_endpoint, methods=["POST"]),
        Route("/{namespace}/encode", encode_endpoint, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})
