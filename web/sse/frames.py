"""The frames of one update stream: the generator that waits for events, heartbeats, polls whether
the run closed and ends the stream (the reasons are listed in `web.sse`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from core.errors import DomainError
from core.metrics import NOT_COUNTED, StreamRecord
from core.protocols import LiveSink, UpdateStream
from core.shutdown import ServerShutdown, ShuttingDown
from web.sse.framing import (
    PING,
    encode_message,
    encode_update_event,
    end_frame,
    open_frame,
    shutdown_frame,
    token_expired_frame,
)

logger = logging.getLogger("web.sse")


class DirectWrites:
    """Where a stream's update frames may be written straight to its connection: the server's
    `write` (`web.direct_write`), which the response puts here once it has started and removes
    when it is over; None meanwhile, or when the server offers none."""

    __slots__ = ("write",)

    def __init__(self) -> None:
        self.write: Callable[[bytes], bool] | None = None


class _Sent:
    """When a stream last sent a frame (its heartbeat counts from it), and its `LiveSink`: update
    frames written through `direct` as they arrive."""

    __slots__ = ("_clock", "_direct", "_record", "at")

    def __init__(self, direct: DirectWrites | None, record: StreamRecord, clock: Callable[[], float]) -> None:
        self._direct = direct
        self._record = record
        self._clock = clock
        self.at = clock()

    def write_live(self, event_id: str, data: bytes) -> bool:
        direct = self._direct
        write = None if direct is None else direct.write
        if write is None or not write(encode_message(event_id, data)):
            return False
        self.delivered()
        return True

    def delivered(self) -> None:
        self._record.delivered()
        self.at = self._clock()

    def pinged(self) -> None:
        self._record.flush()  # an idle moment: the deliveries counted so far go to the metrics
        self.at = self._clock()


async def update_frames(
    stream: UpdateStream,
    *,
    heartbeat_seconds: float,
    retry_ms: int,
    closed_status: Callable[[], Awaitable[str | None]],
    status_at_open: str | None = None,
    poll_seconds: float | None = None,
    expires_at: float | None = None,
    shutdown: ServerShutdown,
    record: StreamRecord = NOT_COUNTED,
    direct: DirectWrites | None = None,
) -> AsyncGenerator[bytes, None]:
    """The frames of one stream: `retry:` at once, then updates as they come, heartbeats while
    idle, `end` once the run is closed and every stored update was sent, `end` with
    `server_shutdown` as soon as the server is stopping, or `end` with `token_expired` at
    `expires_at` (epoch seconds; None: never). `closed_status()` returns the run's final status,
    or None while it runs; its failures are logged and retried at the next poll. Closes `stream`.

    With `direct`, the updates that arrive while the generator waits are written straight to the
    connection as they arrive (`live`, below), and the generator is woken only for what `direct`
    cannot take: heartbeats, polls, the end, and updates for a connection whose writes are paused.
    Only while it waits: none of its own frames is then on its way, so none is overtaken."""
    now = asyncio.get_running_loop().time
    poll_every = heartbeat_seconds if poll_seconds is None else poll_seconds
    status = status_at_open
    # The token's end on the loop's clock: every wait below is bounded by it.
    end_at = math.inf if expires_at is None else now() + (expires_at - time.time())
    sent = _Sent(direct, record, now)
    live: LiveSink | None = None if direct is None else sent.write_live
    try:
        if status is not None:
            stream.finish()
        yield open_frame(retry_ms)
        sent.at = now()
        poll_deadline = now() + poll_every
        while True:
            if now() >= end_at:
                record.ended("token_expired")
                yield token_expired_frame()
                return
            idle_deadline = sent.at + heartbeat_seconds
            wake_at = min(idle_deadline if status is not None else min(idle_deadline, poll_deadline), end_at)
            try:
                async with shutdown.interruptible():
                    event = await stream.next(max(wake_at - now(), 0.0), live)
            except ShuttingDown:
                record.ended("server_shutdown")
                yield shutdown_frame()
                return
            except StopAsyncIteration as stop:
                # The hub drops a subscriber whose queue overflowed ("overflow") or closes every
                # one as the process stops ("hub closed").
                dropped = "slow_reader" if stop.args[:1] == ("overflow",) else "server_shutdown"
                record.ended("run_closed" if status is not None else dropped)
                if status is not None:
                    yield end_frame(status)
                return
            except DomainError as exc:  # Redis failed mid-stream: end; the client resumes by id
                record.ended("backend_error")
                logger.warning("ending an update stream: %s", exc.message)
                return
            if event is not None:
                yield encode_update_event(event)
                sent.delivered()
            elif now() >= sent.at + heartbeat_seconds:  # `live` may have written meanwhile
                yield PING
                sent.pinged()
            if status is None and now() >= poll_deadline:
                try:
                    status = await _poll_and_finish(stream, closed_status, shutdown)
                except ShuttingDown:
                    record.ended("server_shutdown")
                    yield shutdown_frame()
                    return
                poll_deadline = now() + poll_every
    finally:
        await stream.aclose()


async def _poll_and_finish(
    stream: UpdateStream, closed_status: Callable[[], Awaitable[str | None]], shutdown: ServerShutdown
) -> str | None:
    """One poll of the run's status (interrupted by a shutdown); once the run is closed, the stream
    is told to finish with what is stored."""
    async with shutdown.interruptible():
        status = await _poll(closed_status)
    if status is not None:
        stream.finish()
    return status


async def _poll(closed_status: Callable[[], Awaitable[str | None]]) -> str | None:
    try:
        return await closed_status()
    except DomainError as exc:
        logger.warning("could not learn whether a streamed run closed (will retry): %s", exc.message)
    except Exception:  # a poll must never end an open stream; the next one asks again
        logger.exception("could not learn whether a streamed run closed (will retry)")
    return None
