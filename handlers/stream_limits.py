"""How many update streams may be open at once: per caller and per process.

A stream is the one resource a client holds for as long as it likes. `StreamLimiter` caps the
streams open at once per principal (`principal.ref` within its project) and per process (one
limiter per app, in `handlers.deps.Deps`); beyond them `acquire` raises `TooManyRequests` (429
with Retry-After). The stream handler takes a `StreamSlot` before it opens the stream, and the slot
is released exactly once, whichever way the stream ends: by the SSE response when it is over
(complete, disconnected, timed out, cancelled), by the handler when it fails before answering, and
by the slot's finaliser if a response is dropped without ever being sent.
"""

from __future__ import annotations

from core.errors import TooManyRequests
from core.principals import Principal

StreamOwner = tuple[str | None, str]  # (project id, principal ref)


class StreamSlot:
    """One open stream counted by a `StreamLimiter`; `release()` is idempotent."""

    __slots__ = ("_limiter", "_owner", "_released")

    def __init__(self, limiter: StreamLimiter, owner: StreamOwner) -> None:
        self._limiter = limiter
        self._owner = owner
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._owner)

    def __del__(self) -> None:
        # The last resort: a slot whose response was never sent must not hold its place forever.
        self.release()


class StreamLimiter:
    """Counts the streams open at once, per owner and in all; synchronous, so it needs no lock in
    the event loop and can be released from a cancelled task's `finally`."""

    def __init__(self, *, per_principal: int, per_process: int, retry_after: int = 5) -> None:
        self.per_principal = per_principal
        self.per_process = per_process
        self.retry_after = retry_after
        self._open: dict[StreamOwner, int] = {}
        self._total = 0

    @property
    def open_streams(self) -> int:
        return self._total

    @staticmethod
    def owner_of(principal: Principal) -> StreamOwner:
        return (principal.project_id, principal.ref)

    def acquire(self, principal: Principal) -> StreamSlot:
        """A slot for one more stream of `principal`; `TooManyRequests` beyond a limit."""
        owner = self.owner_of(principal)
        if self._total >= self.per_process:
            raise TooManyRequests(
                f"This server has {self.per_process} update streams open, its limit; "
                "retry later or on another replica.",
                retry_after=self.retry_after,
            )
        if self._open.get(owner, 0) >= self.per_principal:
            raise TooManyRequests(
                f"You have {self.per_principal} update streams open, the limit per caller; close one first.",
                retry_after=self.retry_after,
            )
        self._open[owner] = self._open.get(owner, 0) + 1
        self._total += 1
        return StreamSlot(self, owner)

    def _release(self, owner: StreamOwner) -> None:
        left = self._open.get(owner, 0) - 1
        if left > 0:
            self._open[owner] = left
        else:
            self._open.pop(owner, None)
        self._total = max(self._total - 1, 0)
