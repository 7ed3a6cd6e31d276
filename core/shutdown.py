"""The server's stop signal, as open update streams see it.

One `ServerShutdown` per app (built with the app, reached through its state): the CLI triggers it
from uvicorn's signal handler when the server is asked to stop, and every stream waiting for its
next event at that moment is interrupted at once, so graceful shutdown is not held up by streams.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class ShuttingDown(Exception):
    """Raised inside a stream's wait when the server is stopping."""


class ServerShutdown:
    """One per app: set once the server has been asked to stop, and able to interrupt every stream
    waiting for its next event at that moment.

    `trigger()` is safe to call from a signal handler (uvicorn's `handle_exit` runs in one, in the
    event loop's thread) or another thread: it only sets a flag and schedules the interruptions on
    the loop. Each wait runs under `interruptible()`, an `asyncio.timeout(None)` that `trigger`
    reschedules to "now"; the stream code under it is cancellation-safe, so nothing is lost."""

    def __init__(self) -> None:
        self._set = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waits: set[asyncio.Timeout] = set()

    @property
    def is_set(self) -> bool:
        return self._set

    def trigger(self) -> None:
        self._set = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._interrupt_all)

    def _interrupt_all(self) -> None:
        for wait in list(self._waits):
            if not wait.expired():
                wait.reschedule(-1.0)  # a deadline in the past: fires on the next loop iteration

    def interruptible(self) -> _Interruptible:
        """`async with shutdown.interruptible(): await ...` raises `ShuttingDown` if the server is
        stopping before or while the block runs."""
        return _Interruptible(self)


class _Interruptible:
    __slots__ = ("_owner", "_timeout")

    def __init__(self, owner: ServerShutdown) -> None:
        self._owner = owner
        self._timeout = asyncio.timeout(None)

    async def __aenter__(self) -> None:
        owner = self._owner
        if owner.is_set:
            raise ShuttingDown
        owner._loop = asyncio.get_running_loop()
        await self._timeout.__aenter__()
        owner._waits.add(self._timeout)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner._waits.discard(self._timeout)
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if self._timeout.expired():
                raise ShuttingDown from None
            raise
