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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._abort = abort_of(scope)
        if self._direct is not None:
            # The server's writer refuses until the response has started (it writes body chunks).
            self._direct.write = direct_writer(scope)
        try:
            await super().__call__(scope, receive, send)
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
            if self.record is not None:
                self.record.ended("slow_reader")
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
