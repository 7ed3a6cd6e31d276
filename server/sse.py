"""Server-Sent Events for run updates: the framing, and the response that streams the frames.

Frames (what an EventSource reads)
    An update:        `id: <stream id>` then `data: <stored JSON>` (one line), default `message`
                      event, so `onmessage` receives it and the browser remembers the id for its
                      `Last-Event-ID` on reconnect.
    Lost updates:     `event: truncated` with data `{"reason":"truncated","oldest_id":"<id>"}`, no
                      `id:` (the client's resume point does not move), before the oldest kept one.
    End of the run:   `event: end` with data `{"reason":"run_closed","status":"<STATUS>"}`, then the
                      response ends; clients should close their EventSource on it.
    Server stopping:  `event: end` with data `{"reason":"server_shutdown"}`, then the response ends;
                      the client reconnects (to another replica) with `Last-Event-ID`, losing nothing.
    Token expired:    `event: end` with data `{"reason":"token_expired"}` once the stream's token
                      (its `exp` plus the leeway every request gets) is no longer accepted, then the
                      response ends; the client reconnects with a fresh token and `Last-Event-ID`.
    Heartbeat:        the comment line `: ping` after `heartbeat_seconds` without a frame.
    Opening:          `retry: <ms>` (the client's reconnection delay) and the comment `: open`, sent
                      at once, before anything else: the client knows the stream is up, and has the
                      delay, even if nothing happens for a while.

Which task ends the stream
    - The run closed: the frame generator (`update_frames`). It learns it at open or from a poll of
      `closed_status` on its own schedule (every `poll_seconds`, heartbeat interval by default,
      whether or not updates flow), then asks the stream to `finish()`: the stream hands over what
      is stored after the last update sent, and the generator sends `end` and returns.
    - The client disconnected: Starlette's `listen_for_disconnect` task (ASGI < 2.4, uvicorn today)
      cancels the streaming task; under ASGI 2.4 `send` raises instead. Either way
      `EventStreamResponse.stream_response` closes the generator in its `finally`, whose own
      `finally` unsubscribes from the hub at once (synchronously: nothing to await while cancelled).
    - The client stopped reading: `EventStreamResponse` bounds every `send` by `send_timeout`; on
      expiry it stops sending, closes the generator the same way and aborts the connection (the
      server's `ABORT_EXTENSION`, see `server.abortable`): a plain close would wait, forever, for
      the client to read what is still buffered.
    - The hub dropped the subscription (its queue overflowed: the client read too slowly; or the
      process is shutting down): the generator returns without `end`; the client reconnects with
      `Last-Event-ID` and loses nothing, every update being stored.
    - Redis failed while reading stored updates: the generator returns without `end`, likewise.
    - The token expired: the generator's wait for the next event is bounded by the time the token
      has left (no timer of its own); it then sends `end` with `token_expired` and returns.
    - The server is stopping (SIGTERM): `server.cli` calls `SHUTDOWN.trigger()` from uvicorn's signal
      handler, before uvicorn waits for open connections; every generator waiting for its next event
      is interrupted at once (`ServerShutdown`), sends `end` with `server_shutdown` and returns, so
      uvicorn's graceful shutdown finds only in-flight requests to finish.

However it ends, the response is completed when it can be and carries `Connection: close`, so the
server closes the connection with it rather than keeping it alive for another request.

Limits
    `StreamLimiter` caps the streams open at once per principal (`principal.ref` within its project)
    and per process (one per app: `server.context.Backends.streams`); beyond them `acquire` raises
    `TooManyRequests` (429 with Retry-After). The handler takes a `StreamSlot` before it opens the
    stream, and the slot is released exactly once, whichever way the stream ends:
    `EventStreamResponse` releases it when the response is over (complete, disconnected, timed
    out, cancelled), the handler when it fails before answering, and the slot's finaliser if a
    response is dropped without ever being sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from types import TracebackType

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from backends.errors import DomainError, TooManyRequests
from backends.protocol import Principal, UpdateEvent, UpdateStream

logger = logging.getLogger(__name__)

PING = b": ping\n\n"
# `Connection: close`: a stream holds its connection for its whole life, and once it ends (for
# whatever reason) the client reconnects anew; keeping the connection alive would only leave an
# idle socket open after every stream.
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "close"}
MEDIA_TYPE = "text/event-stream"
# The ASGI scope extension through which the server lets a response abort its connection (see
# `server.abortable`): `scope["extensions"][ABORT_EXTENSION]["abort"]()`.
ABORT_EXTENSION = "workflow_runs.abort"


def encode_frame(
    data: bytes | None = None,
    *,
    event_id: str | None = None,
    event: str | None = None,
    retry_ms: int | None = None,
    comment: str | None = None,
) -> bytes:
    """One SSE frame, terminated by the blank line. `data` with line breaks becomes several `data:`
    lines, as the format requires (stored JSON never has any, so an update is one line)."""
    lines: list[bytes] = []
    if retry_ms is not None:
        lines.append(b"retry: %d" % retry_ms)
    if comment is not None:
        lines.append(b": " + _one_line(comment.encode()))
    if event is not None:
        lines.append(b"event: " + _one_line(event.encode()))
    if event_id is not None:
        lines.append(b"id: " + _one_line(event_id.encode()))
    if data is not None:
        lines += [b"data: " + line for line in data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")]
    return b"\n".join(lines) + b"\n\n"


def _one_line(value: bytes) -> bytes:
    return value.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\0", b"")


def encode_update_event(event: UpdateEvent, *, retry_ms: int | None = None) -> bytes:
    name, event_id, data = event
    if name == "message" and retry_ms is None and event_id:
        # The common case (an update after the first frame) in one step, when nothing needs
        # splitting or replacing: the same bytes as `encode_frame`.
        raw_id = event_id.encode()
        if b"\n" not in data and b"\r" not in data and _plain(raw_id):
            return b"id: %s\ndata: %s\n\n" % (raw_id, data)
    return encode_frame(data, event_id=event_id or None, event=None if name == "message" else name, retry_ms=retry_ms)


def _plain(value: bytes) -> bool:
    """No byte that `_one_line` would replace."""
    return b"\n" not in value and b"\r" not in value and b"\0" not in value


def end_frame(status: str, *, retry_ms: int | None = None) -> bytes:
    return encode_frame(orjson.dumps({"reason": "run_closed", "status": status}), event="end", retry_ms=retry_ms)


def shutdown_frame(*, retry_ms: int | None = None) -> bytes:
    return encode_frame(orjson.dumps({"reason": "server_shutdown"}), event="end", retry_ms=retry_ms)


def token_expired_frame() -> bytes:
    return encode_frame(orjson.dumps({"reason": "token_expired"}), event="end")


def ping_frame(*, retry_ms: int | None = None) -> bytes:
    return PING if retry_ms is None else encode_frame(comment="ping", retry_ms=retry_ms)


def open_frame(retry_ms: int) -> bytes:
    return encode_frame(comment="open", retry_ms=retry_ms)


# -- shutdown --------------------------------------------------------------------------------------


class ShuttingDown(Exception):
    """Raised inside a stream's wait when the server is stopping."""


class ServerShutdown:
    """Process-wide: set once the server has been asked to stop, and able to interrupt every stream
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

    def reset(self) -> None:
        """For tests that trigger a shutdown in a process that goes on."""
        self._set = False

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


SHUTDOWN = ServerShutdown()


# -- limits ----------------------------------------------------------------------------------------

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

    def open_streams_of(self, principal: Principal) -> int:
        return self._open.get(self.owner_of(principal), 0)

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


async def update_frames(
    stream: UpdateStream,
    *,
    heartbeat_seconds: float,
    retry_ms: int,
    closed_status: Callable[[], Awaitable[str | None]],
    status_at_open: str | None = None,
    poll_seconds: float | None = None,
    expires_at: float | None = None,
    shutdown: ServerShutdown = SHUTDOWN,
) -> AsyncGenerator[bytes, None]:
    """The frames of one stream: `retry:` at once, then updates as they come, heartbeats while
    idle, `end` once the run is closed and every stored update was sent, `end` with
    `server_shutdown` as soon as the server is stopping, or `end` with `token_expired` at
    `expires_at` (epoch seconds; None: never). `closed_status()` returns the run's final status,
    or None while it runs; its failures are logged and retried at the next poll. Closes `stream`."""
    now = asyncio.get_running_loop().time
    poll_every = heartbeat_seconds if poll_seconds is None else poll_seconds
    status = status_at_open
    # The token's end on the loop's clock: every wait below is bounded by it.
    end_at = math.inf if expires_at is None else now() + (expires_at - time.time())
    try:
        if status is not None:
            stream.finish()
        yield open_frame(retry_ms)
        idle_deadline = now() + heartbeat_seconds
        poll_deadline = now() + poll_every
        while True:
            if now() >= end_at:
                yield token_expired_frame()
                return
            wake_at = min(idle_deadline if status is not None else min(idle_deadline, poll_deadline), end_at)
            try:
                async with shutdown.interruptible():
                    event = await stream.next(max(wake_at - now(), 0.0))
            except ShuttingDown:
                yield shutdown_frame()
                return
            except StopAsyncIteration:
                if status is not None:
                    yield end_frame(status)
                return
            except DomainError as exc:  # Redis failed mid-stream: end; the client resumes by id
                logger.warning("ending an update stream: %s", exc.message)
                return
            if event is not None:
                yield encode_update_event(event)
                idle_deadline = now() + heartbeat_seconds
            elif now() >= idle_deadline:
                yield PING
                idle_deadline = now() + heartbeat_seconds
            if status is None and now() >= poll_deadline:
                try:
                    status = await _poll_and_finish(stream, closed_status, shutdown)
                except ShuttingDown:
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


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response with the SSE headers and a deadline on every send; `slot`
    (the stream's place under the limits) is released when the response is over, however."""

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        *,
        send_timeout: float,
        headers: Mapping[str, str] | None = None,
        slot: StreamSlot | None = None,
        stream: UpdateStream | None = None,
    ) -> None:
        super().__init__(frames, media_type=MEDIA_TYPE, headers={**HEADERS, **(headers or {})})
        self._frames = frames
        self.send_timeout = send_timeout
        self.slot = slot
        self._stream = stream
        self._abort: Callable[[], object] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._abort = abort_of(scope)
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.slot is not None:
                self.slot.release()
            # The generator closes the stream in its `finally`, but a generator that never started
            # (the client left before the first frame) has none to run: close it here too.
            if self._stream is not None:
                await self._stream.aclose()
            await self._frames.aclose()

    async def stream_response(self, send: Send) -> None:
        # The deadline on every send is kept by a watchdog rather than a timeout around each send
        # (which costs a timer and a cancel scope per frame): a send records when it started, and
        # a timer, re-armed at most once per `send_timeout`, expires the stream's one timeout when
        # a send has been pending for `send_timeout`. A stuck send is thus caught after between
        # one and two `send_timeout`s.
        loop = asyncio.get_running_loop()
        clock = loop.time
        limit = self.send_timeout
        pending_since: float | None = None
        timer: asyncio.TimerHandle | None = None
        deadline = asyncio.timeout(None)

        def check() -> None:
            nonlocal timer
            now = clock()
            if pending_since is not None and now - pending_since >= limit:
                timer = None
                deadline.reschedule(now)  # expires the stream on the next loop iteration
                return
            timer = loop.call_at((now if pending_since is None else pending_since) + limit, check)

        async def send_in_time(message: Message) -> None:
            nonlocal pending_since
            pending_since = clock()
            try:
                await send(message)
            finally:
                pending_since = None

        try:
            async with deadline:
                timer = loop.call_at(clock() + limit, check)
                await super().stream_response(send_in_time)
        except TimeoutError:
            # The client stopped reading. Nothing more can be sent (the final empty chunk would wait
            # behind the rest), and closing the connection would wait for the client to read what
            # is still buffered, which it does not: abort it, where the server allows it.
            logger.info("ending an event stream: the client did not read for %ss", self.send_timeout)
            if self._abort is not None:
                self._abort()
        finally:
            if timer is not None:
                timer.cancel()
            await self._frames.aclose()


def abort_of(scope: Scope) -> Callable[[], object] | None:
    """The server's way to abort this request's connection (`ABORT_EXTENSION`), if it offers one."""
    extension = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
    abort = extension.get("abort") if isinstance(extension, dict) else None
    return abort if callable(abort) else None


def event_stream_response(
    frames: AsyncGenerator[bytes, None],
    *,
    send_timeout: float,
    slot: StreamSlot | None = None,
    stream: UpdateStream | None = None,
) -> EventStreamResponse:
    return EventStreamResponse(frames, send_timeout=send_timeout, slot=slot, stream=stream)
