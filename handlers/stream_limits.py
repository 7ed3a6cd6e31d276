"""How many update streams may be open at once: per caller and per process.

A stream is the one resource a client holds for as long as it likes. `StreamLimiter` caps the
streams open at once per principal (`principal.ref` within its project) and per process (one
limiter per app, in `handlers.deps.Deps`); beyond them `acquire` raises `TooManyRequests` (429
with Retry-After). The stream handler takes a `StreamSlot` before it opens the stream, and the slot
is released exactly once, whichever way the stream ends: by the SSE response when it is over
(complete, disconnected, timed out, cancelled), by the handler when it fails before answering, and
by the slot's finaliser if a response is dropped without ever being sent.

Both counts are this process's own: with several worker processes (`serve --workers N`) or
replicas, a caller may hold `per_principal` streams in each. With `shared` (a `StreamSlots`, on
Redis: `SHARED_STREAM_LIMITS=1`) `take` also counts the caller's streams across every process, and
a stream then holds a shared slot besides its local one; the per-process cap stays local (it
bounds what this process serves). A shared store that cannot be reached when a stream opens is
`BackendUnavailable` (503), as any backend down.
"""

from __future__ import annotations

import orjson

from core import metrics
from core.errors import TooManyRequests
from core.principals import Principal
from core.protocols import StreamSlots

StreamOwner = tuple[str | None, str]  # (project id, principal ref)


class StreamSlot:
    """One open stream counted by a `StreamLimiter`; `release()` is idempotent."""

    __slots__ = ("_limiter", "_owner", "_released", "_shared_id")

    def __init__(self, limiter: StreamLimiter, owner: StreamOwner) -> None:
        self._limiter = limiter
        self._owner = owner
        self._released = False
        self._shared_id: str | None = None  # the slot's id in the shared count, when it holds one

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._owner, self._shared_id)

    def __del__(self) -> None:
        # The last resort: a slot whose response was never sent must not hold its place forever.
        self.release()


class StreamLimiter:
    """Counts the streams open at once, per owner and in all; synchronous, so it needs no lock in
    the event loop and can be released from a cancelled task's `finally`. `shared`, when given,
    counts each owner's streams across processes too (`take`)."""

    def __init__(
        self, *, per_principal: int, per_process: int, retry_after: int = 5, shared: StreamSlots | None = None
    ) -> None:
        self.per_principal = per_principal
        self.per_process = per_process
        self.retry_after = retry_after
        self.shared = shared
        self._open: dict[StreamOwner, int] = {}
        self._total = 0

    @property
    def open_streams(self) -> int:
        return self._total

    @staticmethod
    def owner_of(principal: Principal) -> StreamOwner:
        return (principal.project_id, principal.ref)

    @staticmethod
    def shared_owner(owner: StreamOwner) -> str:
        """The owner's name in the shared count: unambiguous whatever its parts hold."""
        return orjson.dumps(owner).decode()

    def acquire(self, principal: Principal) -> StreamSlot:
        """A slot for one more stream of `principal` under this process's counts (the shared one
        is `take`'s); `TooManyRequests` beyond a limit."""
        owner = self.owner_of(principal)
        if self._total >= self.per_process:
            metrics.stream_limit_refused("process")
            raise TooManyRequests(
                f"This server has {self.per_process} update streams open, its limit; "
                "retry later or on another replica.",
                retry_after=self.retry_after,
            )
        if self._open.get(owner, 0) >= self.per_principal:
            raise self._over_principal_limit()
        self._open[owner] = self._open.get(owner, 0) + 1
        self._total += 1
        return StreamSlot(self, owner)

    async def take(self, principal: Principal) -> StreamSlot:
        """`acquire`, then, with `shared`, a slot in the count across processes: `TooManyRequests`
        when the caller holds `per_principal` streams in all, `BackendUnavailable` when the shared
        store is down. The local counts are checked first: a caller over them costs no round trip."""
        slot = self.acquire(principal)
        shared = self.shared
        if shared is None:
            return slot
        try:
            shared_id = await shared.acquire(self.shared_owner(slot._owner), self.per_principal)
        except BaseException:
            slot.release()
            raise
        if shared_id is None:
            slot.release()
            raise self._over_principal_limit()
        slot._shared_id = shared_id
        return slot

    def _over_principal_limit(self) -> TooManyRequests:
        metrics.stream_limit_refused("principal")
        return TooManyRequests(
            f"You have {self.per_principal} update streams open, the limit per caller; close one first.",
            retry_after=self.retry_after,
        )

    def _release(self, owner: StreamOwner, shared_id: str | None) -> None:
        left = self._open.get(owner, 0) - 1
        if left > 0:
            self._open[owner] = left
        else:
            self._open.pop(owner, None)
        self._total = max(self._total - 1, 0)
        if shared_id is not None and self.shared is not None:
            self.shared.release(self.shared_owner(owner), shared_id)
