"""SSE framing and the frame generator's rules, on an in-memory stream (no server, no Redis)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import pytest
from starlette.types import Message

from backends.errors import BackendUnavailable
from backends.protocol import UpdateEvent
from server import sse

UPDATE = b'{"timestamp":1678886400000,"workflow_run_id":"r1","type":"UPDATE","message":"Processing document"}'
IDLE = None
DROPPED = "dropped"  # the hub dropped the subscription (StopAsyncIteration without finish)
FAILED = "failed"  # Redis failed mid-stream


class FakeStream:
    """Plays a script of `next` results; after `finish()` plays `stored` then ends."""

    def __init__(self, script: list[Any], stored: list[UpdateEvent] | None = None) -> None:
        self.script: deque[Any] = deque(script)
        self.stored: deque[UpdateEvent] = deque(stored or [])
        self.finished = False
        self.closed = False
        self.next_calls = 0

    async def next(self, wait_seconds: float) -> UpdateEvent | None:
        self.next_calls += 1
        if self.finished:
            if self.stored:
                return self.stored.popleft()
            raise StopAsyncIteration
        item = self.script.popleft() if self.script else IDLE
        if item == DROPPED:
            raise StopAsyncIteration
        if item == FAILED:
            raise BackendUnavailable("Redis did not answer")
        if item is IDLE:
            await asyncio.sleep(0)  # yield like a real wait would
        return item  # type: ignore[no-any-return,unused-ignore]

    def finish(self) -> None:
        self.finished = True

    async def aclose(self) -> None:
        self.closed = True


def message(n: int) -> UpdateEvent:
    return ("message", f"1678886400{n:03d}-0", UPDATE)


def statuses(*values: str | Exception | None) -> Any:
    queue = deque(values)

    async def closed_status() -> str | None:
        value = queue.popleft() if queue else None
        if isinstance(value, Exception):
            raise value
        return value

    closed_status.remaining = queue  # type: ignore[attr-defined]
    return closed_status


async def frames_of(gen: AsyncGenerator[bytes, None], limit: int = 100) -> list[bytes]:
    out: list[bytes] = []
    try:
        async for frame in gen:
            out.append(frame)
            if len(out) >= limit:
                break
    finally:
        await gen.aclose()
    return out


def frames(stream: FakeStream, **kwargs: Any) -> AsyncGenerator[bytes, None]:
    options: dict[str, Any] = {
        "heartbeat_seconds": 3600.0,
        "retry_ms": 3000,
        "closed_status": statuses(),
        "poll_seconds": 3600.0,
    }
    options.update(kwargs)
    return sse.update_frames(stream, **options)


def parse(frame: bytes) -> list[tuple[str, str]]:
    """The `(field, value)` lines of one frame, as an SSE parser splits them."""
    assert frame.endswith(b"\n\n") and b"\n\n" not in frame[:-2], frame
    out = []
    for line in frame[:-2].decode().split("\n"):
        field, _, value = line.partition(":")
        out.append((field, value[1:] if value.startswith(" ") else value))
    return out


# -- framing -------------------------------------------------------------------------------------


def test_update_event_has_id_and_the_stored_json_as_one_data_line_on_the_default_event() -> None:
    frame = sse.encode_update_event(("message", "1678886400000-0", UPDATE))
    assert frame == b"id: 1678886400000-0\ndata: " + UPDATE + b"\n\n"
    assert b"event:" not in frame


def test_truncated_control_event_has_a_name_and_no_id() -> None:
    data = orjson.dumps({"reason": "truncated", "oldest_id": "1678886400005-0"})
    frame = sse.encode_update_event(("truncated", "", data))
    assert parse(frame) == [("event", "truncated"), ("data", '{"reason":"truncated","oldest_id":"1678886400005-0"}')]


def test_end_control_event() -> None:
    assert sse.end_frame("COMPLETED") == b'event: end\ndata: {"reason":"run_closed","status":"COMPLETED"}\n\n'


def test_heartbeat_is_a_comment_frame() -> None:
    assert sse.PING == b": ping\n\n"
    assert sse.ping_frame() == sse.PING
    assert parse(sse.ping_frame(retry_ms=3000)) == [("retry", "3000"), ("", "ping")]


def test_data_with_line_breaks_becomes_several_data_lines_and_ids_stay_on_one_line() -> None:
    frame = sse.encode_frame(b"a\nb\r\nc", event_id="1-0\n2")
    assert parse(frame) == [("id", "1-0 2"), ("data", "a"), ("data", "b"), ("data", "c")]


def test_retry_comes_first_in_the_frame() -> None:
    frame = sse.encode_update_event(message(1), retry_ms=2500)
    assert frame.startswith(b"retry: 2500\nid: 1678886400001-0\ndata: ")


# -- the frame generator -------------------------------------------------------------------------


async def test_only_the_first_frame_carries_retry() -> None:
    stream = FakeStream([message(1), message(2), message(3)])
    out = await frames_of(frames(stream, retry_ms=1234), limit=3)
    assert out[0] == b"retry: 1234\n" + sse.encode_update_event(message(1))
    assert out[1:] == [sse.encode_update_event(message(2)), sse.encode_update_event(message(3))]
    assert stream.closed


async def test_retry_goes_on_a_heartbeat_when_that_is_the_first_frame() -> None:
    stream = FakeStream([IDLE, message(1), IDLE])
    out = await frames_of(frames(stream, heartbeat_seconds=0.0), limit=3)
    assert out == [b"retry: 3000\n: ping\n\n", sse.encode_update_event(message(1)), sse.PING]


async def test_heartbeats_only_while_idle() -> None:
    stream = FakeStream([IDLE, IDLE, message(1), IDLE])
    out = await frames_of(frames(stream, heartbeat_seconds=0.0, retry_ms=10), limit=4)
    assert out[1:] == [sse.PING, sse.encode_update_event(message(1)), sse.PING]
    assert out[0].endswith(b": ping\n\n")


async def test_no_heartbeat_before_the_interval() -> None:
    # `next` returned None although the heartbeat interval has not passed (a spurious wake-up).
    stream = FakeStream([IDLE, IDLE, message(1)])
    out = await frames_of(frames(stream, heartbeat_seconds=3600.0), limit=1)
    assert out == [b"retry: 3000\n" + sse.encode_update_event(message(1))]


async def test_run_closed_at_open_drains_what_is_stored_then_ends() -> None:
    stream = FakeStream([], stored=[message(1), message(2)])
    out = await frames_of(frames(stream, status_at_open="COMPLETED"))
    assert out == [
        b"retry: 3000\n" + sse.encode_update_event(message(1)),
        sse.encode_update_event(message(2)),
        sse.end_frame("COMPLETED"),
    ]
    assert stream.finished and stream.closed


async def test_run_closing_while_streaming_is_polled_then_drained_then_ends() -> None:
    closed_status = statuses(None, None, "FAILED")
    stream = FakeStream([message(1), IDLE, IDLE, IDLE, IDLE], stored=[message(2)])
    out = await frames_of(frames(stream, poll_seconds=0.0, closed_status=closed_status))
    assert out[0].startswith(b"retry: ")
    assert out[1:] == [sse.encode_update_event(message(2)), sse.end_frame("FAILED")]
    assert not closed_status.remaining
    assert stream.closed


async def test_poll_failures_are_retried() -> None:
    closed_status = statuses(BackendUnavailable("Temporal is down"), "COMPLETED")
    stream = FakeStream([IDLE, IDLE, IDLE])
    out = await frames_of(frames(stream, poll_seconds=0.0, closed_status=closed_status))
    assert out == [b"retry: 3000\n" + sse.end_frame("COMPLETED")]


async def test_dropped_subscription_ends_without_end_event() -> None:
    stream = FakeStream([message(1), DROPPED])
    out = await frames_of(frames(stream))
    assert out == [b"retry: 3000\n" + sse.encode_update_event(message(1))]
    assert stream.closed


async def test_backend_failure_mid_stream_ends_without_end_event() -> None:
    stream = FakeStream([message(1), FAILED])
    out = await frames_of(frames(stream))
    assert len(out) == 1 and stream.closed


async def test_closing_the_generator_closes_the_stream() -> None:
    stream = FakeStream([message(1), message(2)])
    gen = frames(stream)
    assert (await gen.__anext__()).startswith(b"retry:")
    await gen.aclose()
    assert stream.closed


async def test_cancelling_the_consumer_closes_the_stream() -> None:
    release = asyncio.Event()

    class BlockingStream(FakeStream):
        async def next(self, wait_seconds: float) -> UpdateEvent | None:
            release.set()
            await asyncio.Event().wait()  # never: the consumer is cancelled while waiting here
            return None

    stream = BlockingStream([])
    gen = frames(stream)
    task = asyncio.create_task(gen.__anext__())
    await release.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.closed


# -- the response ----------------------------------------------------------------------------------


def scope(spec_version: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "method": "GET", "path": "/"}


async def test_response_headers() -> None:
    response = sse.event_stream_response(frames(FakeStream([])), send_timeout=1.0)
    headers = dict(response.headers)
    assert headers["cache-control"] == "no-store"
    assert headers["x-accel-buffering"] == "no"
    assert headers["content-type"].startswith("text/event-stream")
    await response._frames.aclose()


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_send_timeout_ends_the_stream_of_a_client_that_stopped_reading(spec_version: str) -> None:
    stream = FakeStream([message(1), message(2), message(3)])
    sent: list[Message] = []
    stuck = asyncio.Event()

    async def send(msg: Message) -> None:
        sent.append(msg)
        if msg["type"] == "http.response.body" and len(sent) >= 3:
            stuck.set()
            await asyncio.Event().wait()  # the socket buffer is full and stays full

    async def receive() -> Message:
        await asyncio.Event().wait()  # no disconnect is ever reported
        return {"type": "http.disconnect"}

    response = sse.event_stream_response(frames(stream), send_timeout=0.05)
    async with asyncio.timeout(10):
        await response(scope(spec_version), receive, send)
    assert stuck.is_set() and stream.closed
    assert sent[0]["type"] == "http.response.start"


async def test_client_disconnect_closes_the_stream_at_once() -> None:
    stream = FakeStream([message(1)])  # then idle forever
    first_body = asyncio.Event()

    async def send(msg: Message) -> None:
        if msg["type"] == "http.response.body":
            first_body.set()

    async def receive() -> Message:
        await first_body.wait()
        return {"type": "http.disconnect"}

    response = sse.event_stream_response(frames(stream), send_timeout=5.0)
    async with asyncio.timeout(10):
        await response(scope("2.3"), receive, send)
    assert stream.closed


@pytest.mark.parametrize("name", ["message", "truncated"])
@pytest.mark.parametrize("event_id", ["", "1678886400000-0", "a\nb", "x\0y", "c\rd"])
@pytest.mark.parametrize("data", [UPDATE, b"a\nb", b"a\r\nb", b"c\rd", b"x\0y", b""])
@pytest.mark.parametrize("retry_ms", [None, 3000])
def test_the_update_fast_path_frames_exactly_like_encode_frame(
    name: str, event_id: str, data: bytes, retry_ms: int | None
) -> None:
    expected = sse.encode_frame(
        data, event_id=event_id or None, event=None if name == "message" else name, retry_ms=retry_ms
    )
    assert sse.encode_update_event((name, event_id, data), retry_ms=retry_ms) == expected


async def test_a_slow_send_that_completes_within_the_timeout_does_not_end_the_stream() -> None:
    stream = FakeStream([message(1), message(2), message(3), DROPPED])
    bodies: list[bytes] = []

    async def send(msg: Message) -> None:
        if msg["type"] == "http.response.body":
            await asyncio.sleep(0.03)  # each send slower than nothing, faster than the timeout
            bodies.append(msg["body"])

    async def receive() -> Message:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    response = sse.event_stream_response(frames(stream), send_timeout=0.1)
    async with asyncio.timeout(10):
        await response(scope("2.3"), receive, send)
    assert len([b for b in bodies if b.startswith((b"retry", b"id"))]) == 3
    assert bodies[-1] == b""
