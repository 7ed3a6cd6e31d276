"""Server-Sent Events for run updates: the framing, and the response that streams the frames.

Frames (what an EventSource reads)
    An update:        `id: <stream id>` then `data: <stored JSON>` (one line), default `message`
                      event, so `onmessage` receives it and the browser remembers the id for its
                      `Last-Event-ID` on reconnect.
    Lost updates:     `event: truncated` with data `{"reason":"truncated","oldest_id":"<id>"}`, no
                      `id:` (the client's resume point does not move), before the oldest kept one.
    End of the run:   `event: end` with data `{"reason":"run_closed","status":"<STATUS>"}`, then the
                      response ends; clients should close their EventSource on it.
    Heartbeat:        the comment line `: ping` after `heartbeat_seconds` without a frame.
    The first frame, whatever it is, starts with `retry: <ms>`, the client's reconnection delay.

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
      expiry it stops sending and closes the generator the same way; the server closes the socket.
    - The hub dropped the subscription (its queue overflowed: the client read too slowly; or the
      process is shutting down): the generator returns without `end`; the client reconnects with
      `Last-Event-ID` and loses nothing, every update being stored.
    - Redis failed while reading stored updates: the generator returns without `end`, likewise.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Send

from backends.errors import DomainError
from backends.protocol import UpdateEvent, UpdateStream

logger = logging.getLogger(__name__)

PING = b": ping\n\n"
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


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
    return encode_frame(data, event_id=event_id or None, event=None if name == "message" else name, retry_ms=retry_ms)


def end_frame(status: str, *, retry_ms: int | None = None) -> bytes:
    return encode_frame(orjson.dumps({"reason": "run_closed", "status": status}), event="end", retry_ms=retry_ms)


def ping_frame(*, retry_ms: int | None = None) -> bytes:
    return PING if retry_ms is None else encode_frame(comment="ping", retry_ms=retry_ms)


async def update_frames(
    stream: UpdateStream,
    *,
    heartbeat_seconds: float,
    retry_ms: int,
    closed_status: Callable[[], Awaitable[str | None]],
    status_at_open: str | None = None,
    poll_seconds: float | None = None,
) -> AsyncGenerator[bytes, None]:
    """The frames of one stream: updates as they come, heartbeats while idle, `end` once the run is
    closed and every stored update was sent. `closed_status()` returns the run's final status, or
    None while it runs; its failures are logged and retried at the next poll. Closes `stream`."""
    now = anyio.current_time
    poll_every = heartbeat_seconds if poll_seconds is None else poll_seconds
    retry: int | None = retry_ms  # sent once, on the first frame
    status = status_at_open
    try:
        if status is not None:
            stream.finish()
        idle_deadline = now() + heartbeat_seconds
        poll_deadline = now() + poll_every
        while True:
            wake_at = idle_deadline if status is not None else min(idle_deadline, poll_deadline)
            try:
                event = await stream.next(max(wake_at - now(), 0.0))
            except StopAsyncIteration:
                if status is not None:
                    yield end_frame(status, retry_ms=retry)
                return
            except DomainError as exc:  # Redis failed mid-stream: end; the client resumes by id
                logger.warning("ending an update stream: %s", exc.message)
                return
            if event is not None:
                yield encode_update_event(event, retry_ms=retry)
                retry = None
                idle_deadline = now() + heartbeat_seconds
            elif now() >= idle_deadline:
                yield ping_frame(retry_ms=retry)
                retry = None
                idle_deadline = now() + heartbeat_seconds
            if status is None and now() >= poll_deadline:
                status = await _poll(closed_status)
                poll_deadline = now() + poll_every
                if status is not None:
                    stream.finish()
    finally:
        await stream.aclose()


async def _poll(closed_status: Callable[[], Awaitable[str | None]]) -> str | None:
    try:
        return await closed_status()
    except DomainError as exc:
        logger.warning("could not learn whether a streamed run closed (will retry): %s", exc.message)
    except Exception:  # a poll must never end an open stream; the next one asks again
        logger.exception("could not learn whether a streamed run closed (will retry)")
    return None


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response with the SSE headers and a deadline on every send."""

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        *,
        send_timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(frames, media_type=MEDIA_TYPE, headers={**HEADERS, **(headers or {})})
        self._frames = frames
        self.send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            with anyio.fail_after(self.send_timeout):
                await send(message)

        try:
            await super().stream_response(send_in_time)
        except TimeoutError:
            # The client stopped reading: stop here; the server closes the connection.
            logger.info("ending an event stream: the client did not read for %ss", self.send_timeout)
        finally:
            await self._frames.aclose()


def event_stream_response(frames: AsyncGenerator[bytes, None], *, send_timeout: float) -> EventStreamResponse:
    return EventStreamResponse(frames, send_timeout=send_timeout)
