"""Domain errors raised by backends and handlers.

`server.errors` maps each of these to the JSON error body and its HTTP status in one place, so
backends never need to know about HTTP.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class: `status` is the HTTP status the error maps to, `code` the errorCode.

    For a 4xx, `message` (and `details`) is what the caller reads, so it must be the API's own words.
    For a 5xx it is only logged: `server.errors` answers a fixed sentence of its own instead."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(DomainError):
    status = 400
    code = "invalid_request"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class NotFound(DomainError):
    """Unknown run, or a run the caller may not see (the two must be indistinguishable)."""

    status = 404
    code = "not_found"


class Conflict(DomainError):
    """An action or signal on a run that is already closed, or an update posted too long after."""

    status = 409
    code = "run_closed"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(DomainError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(DomainError):
    """Temporal or Redis did not answer; the client should retry after `retry_after` seconds.

    `message` is for the server log and may carry the backend's own words; the caller gets the fixed
    sentence `server.errors` keeps for `backend` ("temporal", "redis", "jwks", "server", ...)."""

    status = 503
    code = "backend_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, backend: str = "backend") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.backend = backend
