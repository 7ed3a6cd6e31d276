"""The `text/event-stream` response: SSE headers, a deadline on every send, the stream's slot
released however the response ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from core.metrics import StreamRecord
from core.protocols import UpdateStream
from handlers.stream_limits import StreamSlot
from web.abortable import ABORT_EXTENSION
from web.direct_write import direct_writer
from web.sse.frames import DirectWrites

logger = logging.getLogger("web.sse")

# `Connection: close`: a stream holds its connection for its whole life, and once it ends (for
# whatever reason) the client reconnects anew; keeping the connection alive would only leave an
# idle socket open after every stream.
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "close"}
MEDIA_TYPE = "text/event-stream"


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
        record: StreamRecord | None = None,
        direct: DirectWrites | None = None,
    ) -> None:
        super().__init__(frames, media_type=MEDIA_TYPE, headers={**HEADERS, **(headers or {})})
        self._frames = frames
        self.send_timeout = send_timeout
        self.slot = slot
        self._stream = stream
        self.record = record
        self._direct = direct
        self._abort: Callable[[], object] | None = None
        # While `stream_response` runs: its deadline, which `_client_left` expires.
        self._deadline: asyncio.Timeout | None = None
        self._client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._abort, on_disconnect = connection_hooks(scope)
        if self._direct is not None:
            # The server's writer refuses until the response has started (it writes body chunks).
            self._direct.write = direct_writer(scope)
        try:
            if scope.get("method") == "HEAD":
                # The head of a stream, and no stream: uvicorn writes no body for HEAD, so a
                # stream would never fail a send and would hold its slot for as long as the
                # client liked.
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif on_disconnect is None or has_body(scope):
                # No word of the disconnect from the server (Starlette's TestClient, another
                # server), or a body to read (a stream's request has none, but a client may send
                # one: unread, uvicorn would stop reading the connection, and with it notice
                # neither the body's deadline nor the client leaving): Starlette's way, a second
                # task reading `receive()` until `http.disconnect`.
                await super().__call__(scope, receive, send)
            else:
                # The server tells of the disconnect itself: the stream runs in this task alone
                # (no task group, no second task: several KiB less per open stream).
                on_disconnect(self._client_left)
                try:
                    await self.stream_response(send)
                finally:
                    on_disconnect(None)
        finally:
            if self._direct is not None:
                self._direct.write = None
            if self.record is not None:
                self.record.ended("client_gone")  # unless the stream had ended for a reason of its own
            if self.slot is not None:
                self.slot.release()
            # The generator closes the stream in its `finally`, but a generator that never started
            # (the client left before the first frame) has none to run: close it here too.
            if self._stream is not None:
                await self._stream.aclose()
            await self._frames.aclose()

    def _client_left(self) -> None:
        """The server's word that the connection is lost: end the stream now, wherever it waits
        (for an event, or in a send), by expiring its deadline."""
        self._client_gone = True
        deadline = self._deadline
        if deadline is not None and not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time())

    async def stream_response(self, send: Send) -> None:
        # The deadline on every send is kept by a watchdog rather than a timeout around each send
        # (which costs a timer and a cancel scope per frame): a send records when it started, and
        # a timer, re-armed at most once per `send_timeout`, expires the stream's one timeout when
        # a send has been pending for `send_timeout`. A stuck send is thus caught after between
        # one and two `send_timeout`s. The server's word that the client is gone expires the
        # same timeout (`_client_left`).
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
                if not deadline.expired():  # else the client is gone, and the stream ends already
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
                self._deadline = deadline
                if self._client_gone:  # told before the stream began
                    deadline.reschedule(clock())
                timer = loop.call_at(clock() + limit, check)
                await super().stream_response(send_in_time)
        except TimeoutError:
            if self._client_gone:
                # The connection is lost: nothing to abort, nobody to send to; the record says
                # `client_gone` (`__call__`).
                return
            # The client stopped reading. Nothing more can be sent (the final empty chunk would wait
            # behind the rest), and closing the connection would wait for the client to read what
            # is still buffered, which it does not: abort it, where the server allows it.
            logger.info("ending an event stream: the client did not read for %ss", self.send_timeout)
            if self.record is not None:
                self.record.ended("slow_reader")
            if self._abort is not None:
                self._abort()
        finally:
            self._deadline = None
            if timer is not None:
                timer.cancel()
            await self._frames.aclose()


def has_body(scope: Scope) -> bool:
    """Whether the request says a body follows its head."""
    for name, value in scope.get("headers") or ():
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def connection_hooks(
    scope: Scope,
) -> tuple[Callable[[], object] | None, Callable[[Callable[[], object] | None], object] | None]:
    """The server's ways (`ABORT_EXTENSION`, if it offers it) to abort this request's connection,
    and to have a callback called when the connection is lost (`web.abortable`)."""
    extension = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
    if not isinstance(extension, dict):
        return None, None
    abort, on_disconnect = extension.get("abort"), extension.get("on_disconnect")
    return (abort if callable(abort) else None), (on_disconnect if callable(on_disconnect) else None)
