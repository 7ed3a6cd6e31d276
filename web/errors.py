"""Every error, whoever raises it, leaves as the one JSON error body of the document's `Error` schema:

    {"error": "Not Found", "status": 404, "message": "...", "errorCode": "not_found"}

Connexion's own problems (validation, security, routing) and our domain errors are mapped here, in
one place; nothing answers `application/problem+json`, HTML or a stack trace.

Two rules hold for every answer built here:

- a 5xx says only the API's own sentence (one per backend for a 503) and the request id; what the
  backend said is logged, under that request id, never answered;
- a message quotes at most `MAX_QUOTED_CHARS` of any value it quotes (a validation message would
  otherwise echo a 1 MB bad value back) and is at most `MAX_MESSAGE_CHARS` long.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import orjson
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from core.errors import (
    BackendUnavailable,
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
)
from web.logs import request_id_var

log = logging.getLogger("workflow_runs.errors")

MAX_QUOTED_CHARS = 100
MAX_MESSAGE_CHARS = 1000
ELLIPSIS = "\u2026"

INTERNAL_ERROR = "Internal server error."
# What a 503 says, by the `backend` of the BackendUnavailable: the API's words, never the backend's.
UNAVAILABLE = {
    "temporal": "Temporal, which runs the workflows, is unavailable; retry later.",
    "redis": "The update store (Redis) is unavailable; retry later.",
    "redis-full": "The update store is full: the update was not stored; retry later.",
    "jwks": "The keys that verify the token could not be fetched; retry later.",
    "codec": "The codec server, which decodes the runs' payloads, is unavailable; retry later.",
    "server": "This server is shutting down; reconnect to another one.",
}
UNAVAILABLE_DEFAULT = "A service this API depends on is unavailable; retry later."

ERROR_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "run_closed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    431: "request_header_fields_too_large",
    429: "too_many_requests",
    500: "internal_error",
    501: "not_implemented",
    503: "backend_unavailable",
}

# The HTTP status of each domain error (its errorCode follows from the status, above); a domain
# error of another class is a bug of ours: 500.
STATUS_OF: dict[type[DomainError], int] = {
    InvalidInput: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    TooManyRequests: 429,
    BackendUnavailable: 503,
}


def status_of(exc: DomainError) -> int:
    return next((STATUS_OF[cls] for cls in type(exc).__mro__ if cls in STATUS_OF), 500)


def error_body(status: int, message: str, *, code: str | None = None, details: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "error": HTTPStatus(status).phrase,
        "status": status,
        "message": message,
        "errorCode": code or ERROR_CODES.get(status, "error"),
    }
    if details:
        body["details"] = details
    return orjson.dumps(body)


# RFC 6750 section 3: a request without a token gets the bare challenge; one whose token was refused
# gets `error="invalid_token"` too, with a description (no quote or backslash may appear in it).
CHALLENGE_NONE = 'Bearer realm="workflow-runs"'
CHALLENGE_INVALID = (
    'Bearer realm="workflow-runs", error="invalid_token", '
    'error_description="The bearer token is malformed, badly signed, expired or not for this API"'
)


def error_headers(status: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", CHALLENGE_NONE)
    return headers


# A quoted value: JSON-style "..." (how jsonschema messages show values) or '...' opening after a
# non-word character (Python's repr; not the apostrophe of "token's"). An unterminated one runs to
# the end, so every match moves forward and the scan stays linear.
_QUOTED = re.compile(r"""(")((?:[^"\\]|\\.)*)("|\Z)|(?<!\w)(')((?:[^'\\]|\\.)*)('|\Z)""", re.DOTALL)


def _shorten_quoted(match: re.Match[str]) -> str:
    opening, value, closing = match.group(1, 2, 3) if match.group(1) else match.group(4, 5, 6)
    if len(value) <= MAX_QUOTED_CHARS:
        return match.group(0)
    kept = value[:MAX_QUOTED_CHARS]
    if (len(kept) - len(kept.rstrip("\\"))) % 2:  # do not leave half of an escape before the quote
        kept = kept[:-1]
    return f"{opening}{kept}{ELLIPSIS}{closing}"


def bounded(text: str) -> str:
    """`text` with every quoted value cut to `MAX_QUOTED_CHARS`, then to `MAX_MESSAGE_CHARS` in all."""
    if len(text) > MAX_QUOTED_CHARS:
        text = _QUOTED.sub(_shorten_quoted, text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + ELLIPSIS
    return text


def with_request_id(sentence: str) -> str:
    """A 5xx message: the sentence and the request id, which the log lines of the cause carry too."""
    request_id = request_id_var.get()
    return f"{sentence} (request id {request_id})" if request_id else sentence


def public_sentence(exc: DomainError) -> str:
    """What a client may read of a 5xx domain error (the health check shows it too)."""
    if isinstance(exc, BackendUnavailable):
        return UNAVAILABLE.get(exc.backend, UNAVAILABLE_DEFAULT)
    return INTERNAL_ERROR


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: str | None = None,
    headers: dict[str, str] | None = None,
) -> ConnexionResponse:
    """The JSON error response. A 5xx `message` must be one of the API's own sentences: the request
    id is added here."""
    if status >= 500:
        message, details = with_request_id(message), None
    return ConnexionResponse(
        status_code=status,
        mimetype="application/json",
        content_type="application/json",
        body=error_body(status, bounded(message), code=code, details=bounded(details) if details else None),
        headers=error_headers(status, headers),
    )


def _problem_message(exc: ProblemException) -> str:
    if exc.status_code == 401:
        # Connexion says "No authorization token provided" or "Provided token is not valid".
        return str(exc.detail or "A valid bearer token is required.")
    return str(exc.detail or exc.title or HTTPStatus(exc.status_code).phrase)


def on_problem(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, ProblemException)
    if exc.status_code == 401:
        # The stream also takes its token as `access_token` (moved to the header further in).
        sent = request.headers.get("authorization", "")[:7].lower() == "bearer " or bool(
            request.query_params.get("access_token")
        )
        challenge = CHALLENGE_INVALID if sent else CHALLENGE_NONE
        return error_response(401, _problem_message(exc), headers={"WWW-Authenticate": challenge})
    return problem_response(exc)


def problem_response(exc: ProblemException) -> ConnexionResponse:
    status = exc.status_code
    if status >= 500:
        # e.g. a response that does not conform to the document: a bug, logged with its cause.
        log.error("server problem: %s", exc.detail)
        return error_response(500, INTERNAL_ERROR)
    return error_response(status, _problem_message(exc), headers=dict(exc.headers or {}))


def on_http_exception(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status >= 500:
        log.error("server HTTP error %d: %s", status, exc.detail)
        return error_response(status, INTERNAL_ERROR, headers=dict(exc.headers or {}))
    message = {
        404: "No such resource.",
        405: "Method not allowed on this resource.",
    }.get(status, str(exc.detail))
    return error_response(status, message, headers=dict(exc.headers or {}))


def on_domain_error(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, DomainError)
    return domain_error_response(exc)


def domain_error_response(exc: DomainError) -> ConnexionResponse:
    headers = {}
    if isinstance(exc, BackendUnavailable | TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after)
    status = status_of(exc)
    if status >= 500:
        # The message may carry a backend's own words (Redis's, Temporal's): logged, not answered.
        if isinstance(exc, BackendUnavailable):
            log.warning("answered %d (%s unavailable): %s", status, exc.backend, exc.message)
        else:
            log.error("answered %d: %s", status, exc.message, exc_info=exc)
        return error_response(status, public_sentence(exc), headers=headers)
    return error_response(status, exc.message, details=exc.details, headers=headers)


def on_unexpected(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    return unexpected_error_response(exc)


def unexpected_error_response(exc: Exception) -> ConnexionResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, INTERNAL_ERROR)
