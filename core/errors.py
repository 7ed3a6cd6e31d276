"""Domain errors raised by backends and handlers.

They say what went wrong in the API's terms, never how HTTP spells it: the HTTP layer maps each
class to its status and error code in one table (`web.errors.STATUS_OF`).
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class. For an error of the caller's (bad input, no permission, ...) `message` (and
    `details`) is what the caller reads, so it must be the API's own words. For a failure of ours
    (a backend down, a bug) it is only logged: the caller reads a fixed sentence instead."""

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(DomainError):
    """The request asks for something the API cannot read or do as asked."""


class Forbidden(DomainError):
    """The caller may not do this (no project, or a permission missing)."""


class NotFound(DomainError):
    """Unknown run, or a run the caller may not see (the two must be indistinguishable)."""


class Conflict(DomainError):
    """An action or signal on a run that is already closed, or an update posted too long after."""


class PayloadTooLarge(DomainError):
    """A body or a part of it exceeds a documented limit."""


class TooManyRequests(DomainError):
    """The caller is over a rate or stream limit; it may retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(DomainError):
    """Temporal or Redis did not answer; the client should retry after `retry_after` seconds.

    `message` is for the server log and may carry the backend's own words; the caller gets the fixed
    sentence `web.errors` keeps for `backend` ("temporal", "redis", "jwks", "server", ...)."""

    def __init__(self, message: str, *, retry_after: int = 5, backend: str = "backend") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.backend = backend
