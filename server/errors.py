"""Every error, whoever raises it, leaves as the one JSON error body of REFERENCE.md:

    {"error": "Not Found", "status": 404, "message": "...", "errorCode": "not_found"}

Connexion's own problems (validation, security, routing) and our domain errors are mapped here, in
one place; nothing answers `application/problem+json`, HTML or a stack trace.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import orjson
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from backends.errors import BackendUnavailable, DomainError, TooManyRequests

log = logging.getLogger("workflow_runs.errors")

ERROR_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "run_closed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    500: "internal_error",
    501: "not_implemented",
    503: "backend_unavailable",
}


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


def error_headers(status: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="workflow-runs"'
    return headers


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: str | None = None,
    headers: dict[str, str] | None = None,
) -> ConnexionResponse:
    return ConnexionResponse(
        status_code=status,
        mimetype="application/json",
        content_type="application/json",
        body=error_body(status, message, code=code, details=details),
        headers=error_headers(status, headers),
    )


def _problem_message(exc: ProblemException) -> str:
    if exc.status_code == 401:
        # Connexion says "No authorization token provided" or "Provided token is not valid".
        return str(exc.detail or "A valid bearer token is required.")
    return str(exc.detail or exc.title or HTTPStatus(exc.status_code).phrase)


def on_problem(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, ProblemException)
    return problem_response(exc)


def problem_response(exc: ProblemException) -> ConnexionResponse:
    status = exc.status_code
    if status >= 500:
        # e.g. a response that does not conform to the document: a bug, logged with its cause.
        log.error("server problem: %s", exc.detail)
        return error_response(500, "Internal server error.")
    return error_response(status, _problem_message(exc), headers=dict(exc.headers or {}))


def on_http_exception(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
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
    return error_response(exc.status, exc.message, code=exc.code, details=exc.details, headers=headers)


def on_unexpected(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    return unexpected_error_response(exc)


def unexpected_error_response(exc: Exception) -> ConnexionResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "Internal server error.")
