"""Domain errors raised by backends and handlers.

`server.errors` maps each of these to the JSON error body and its HTTP status in one place, so
backends never need to know about HTTP.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class: `status` is the HTTP status the error maps to, `code` the errorCode."""

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
    """An action or signal on a run that is already closed."""

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
    """Temporal or Redis did not answer; the client should retry after `retry_after` seconds."""

    status = 503
    code = "backend_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after
