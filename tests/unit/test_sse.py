"""SSE framing and the frame generator's rules, on an in-memory stream (no server, no Redis); and,
over a real socket to uvicorn in this process, that the server closes a connection whose stream it
ended."""

from __future__ import annotations

import asyncio
import select
import socket
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import uvicorn
from starlette.types import Message

from core.errors import BackendUnavailable
from core.metrics import StreamRecord
from core.protocols import LiveSink, UpdateEvent
from core.settings import Settings
from core.shutdown import ServerShutdown
from core.tokens import mint_token
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, fake_backends_factory
from web.abortable import ABORT_EXTENSION, AbortableHttpToolsProtocol
from web.app import create_app
from web.direct_write import DirectWriteHttpToolsProtocol
from web.sse import framing
from web.sse.frames import update_frames
from web.sse.response import EventStreamResponse
from web.transport import Limits, protocol_class

UPDATE = b'{"timestamp":1678886400000,"workflow_run_id":"r1","type":"UPDATE","message":"Processing document"}'
OPEN = b"retry: 3000\n: open\n\n"  # the first frame of every stream (retry_ms=3000)
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

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
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
        "shutdown": ServerShutdown(),
    }
    options.update(kwargs)
    return update_frames(stream, **options)


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
    frame = framing.encode_update_event(("message", "1678886400000-0", UPDATE))
    assert frame == b"id: 1678886400000-0\ndata: " + UPDATE + b"\n\n"
    assert b"event:" not in frame


def test_truncated_control_event_has_a_name_and_no_id() -> None:
    data = orjson.dumps({"reason": "truncated", "oldest_id": "1678886400005-0"})
    frame = framing.encode_update_event(("truncated", "", data))
    assert parse(frame) == [("event", "truncated"), ("data", '{"reason":"truncated","oldest_id":"1678886400005-0"}')]


def test_end_control_event() -> None:
    assert framing.end_frame("COMPLETED") == b'event: end\ndata: {"reason":"run_closed","status":"COMPLETED"}\n\n'


def test_heartbeat_is_a_comment_frame() -> None:
    assert framing.PING == b": ping\n\n"
    assert framing.ping_frame() == framing.PING
    assert parse(framing.ping_frame(retry_ms=3000)) == [("retry", "3000"), ("", "ping")]


def test_data_with_line_breaks_becomes_several_data_lines_and_ids_stay_on_one_line() -> None:
    frame = framing.encode_frame(b"a\nb\r\nc", event_id="1-0\n2")
    assert parse(frame) == [("id", "1-0 2"), ("data", "a"), ("data", "b"), ("data", "c")]


def test_retry_comes_first_in_the_frame() -> None:
    frame = framing.encode_update_event(message(1), retry_ms=2500)
    assert frame.startswith(b"retry: 2500\nid: 1678886400001-0\ndata: ")


# -- the frame generator -------------------------------------------------------------------------


async def test_the_first_frame_is_retry_sent_at_once_and_no_other_frame_carries_it() -> None:
    stream = FakeStream([message(1), message(2), message(3)])
    out = await frames_of(frames(stream, retry_ms=1234), limit=4)
    assert out[0] == b"retry: 1234\n: open\n\n"
    assert parse(out[0]) == [("retry", "1234"), ("", "open")]
    assert out[1:] == [framing.encode_update_event(message(i)) for i in (1, 2, 3)]
    assert stream.closed


async def test_retry_is_sent_before_the_stream_is_waited_on() -> None:
    # A stream with nothing to send for a long time: the client still gets `retry:` at once.
    class SilentStream(FakeStream):
        async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
            self.next_calls += 1
            await asyncio.Event().wait()  # nothing, ever
            return None

    stream = SilentStream([])
    gen = frames(stream)
    async with asyncio.timeout(10):
        assert await anext(gen) == OPEN
    assert stream.next_calls == 0
    await gen.aclose()
    assert stream.closed


async def test_heartbeats_only_while_idle() -> None:
    stream = FakeStream([IDLE, IDLE, message(1), IDLE])
    out = await frames_of(frames(stream, heartbeat_seconds=0.0), limit=5)
    assert out == [OPEN, framing.PING, framing.PING, framing.encode_update_event(message(1)), framing.PING]


async def test_no_heartbeat_before_the_interval() -> None:
    # `next` returned None although the heartbeat interval has not passed (a spurious wake-up).
    stream = FakeStream([IDLE, IDLE, message(1)])
    out = await frames_of(frames(stream, heartbeat_seconds=3600.0), limit=2)
    assert out == [OPEN, framing.encode_update_event(message(1))]


async def test_run_closed_at_open_drains_what_is_stored_then_ends() -> None:
    stream = FakeStream([], stored=[message(1), message(2)])
    out = await frames_of(frames(stream, status_at_open="COMPLETED"))
    assert out == [
        OPEN,
        framing.encode_update_event(message(1)),
        framing.encode_update_event(message(2)),
        framing.end_frame("COMPLETED"),
    ]
    assert stream.finished and stream.closed


async def test_run_closing_while_streaming_is_polled_then_drained_then_ends() -> None:
    closed_status = statuses(None, None, "FAILED")
    stream = FakeStream([message(1), IDLE, IDLE, IDLE, IDLE], stored=[message(2)])
    out = await frames_of(frames(stream, poll_seconds=0.0, closed_status=closed_status))
    assert out[0] == OPEN
    assert out[2:] == [framing.encode_update_event(message(2)), framing.end_frame("FAILED")]
    assert not closed_status.remaining
    assert stream.closed


async def test_poll_failures_are_retried() -> None:
    closed_status = statuses(BackendUnavailable("Temporal is down"), "COMPLETED")
    stream = FakeStream([IDLE, IDLE, IDLE])
    out = await frames_of(frames(stream, poll_seconds=0.0, closed_status=closed_status))
    assert out == [OPEN, framing.end_frame("COMPLETED")]


async def test_dropped_subscription_ends_without_end_event() -> None:
    stream = FakeStream([message(1), DROPPED])
    out = await frames_of(frames(stream))
    assert out == [OPEN, framing.encode_update_event(message(1))]
    assert stream.closed


async def test_backend_failure_mid_stream_ends_without_end_event() -> None:
    stream = FakeStream([message(1), FAILED])
    out = await frames_of(frames(stream))
    assert out == [OPEN, framing.encode_update_event(message(1))] and stream.closed


async def test_closing_the_generator_closes_the_stream() -> None:
    stream = FakeStream([message(1), message(2)])
    gen = frames(stream)
    assert (await gen.__anext__()).startswith(b"retry:")
    await gen.aclose()
    assert stream.closed


# -- the token's expiry ----------------------------------------------------------------------------


class WaitingStream(FakeStream):
    """Waits as a real stream does: nothing comes, `next` returns None after `wait_seconds`."""

    def __init__(self) -> None:
        super().__init__([])
        self.waits: list[float] = []

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        self.waits.append(wait_seconds)
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(wait_seconds)  # the real stream's wait for its next event
        return None


async def test_a_stream_ends_with_token_expired_when_its_token_expires() -> None:
    # Heartbeats and polls once an hour: only the token's end can wake the generator.
    stream = WaitingStream()
    async with asyncio.timeout(10):
        out = await frames_of(frames(stream, expires_at=time.time() + 0.05))
    assert out == [OPEN, framing.token_expired_frame()]
    assert parse(out[1]) == [("event", "end"), ("data", '{"reason":"token_expired"}')]
    assert stream.waits and all(wait <= 0.05 for wait in stream.waits)
    assert stream.closed


async def test_the_wait_is_bounded_by_the_time_the_token_has_left() -> None:
    stream = WaitingStream()
    gen = frames(stream, heartbeat_seconds=3600.0, expires_at=time.time() + 120)
    assert await anext(gen) == OPEN
    waiting = asyncio.create_task(anext(gen))
    async with asyncio.timeout(10):
        while not stream.waits:  # noqa: ASYNC110  # until the generator waits inside `next`
            await asyncio.sleep(0)
    assert 0 < stream.waits[0] <= 120
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await gen.aclose()


async def test_an_expired_token_ends_the_stream_even_while_updates_flow() -> None:
    stream = FakeStream([message(1), message(2)])
    out = await frames_of(frames(stream, expires_at=time.time() - 1))
    assert out == [OPEN, framing.token_expired_frame()]


async def test_without_expiry_the_wait_is_the_heartbeat() -> None:
    stream = WaitingStream()
    gen = frames(stream, heartbeat_seconds=3600.0, expires_at=None)
    assert await anext(gen) == OPEN
    waiting = asyncio.create_task(anext(gen))
    async with asyncio.timeout(10):
        while not stream.waits:  # noqa: ASYNC110  # until the generator waits inside `next`
            await asyncio.sleep(0)
    assert stream.waits[0] > 3000
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await gen.aclose()


async def test_cancelling_the_consumer_closes_the_stream() -> None:
    release = asyncio.Event()

    class BlockingStream(FakeStream):
        async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
            release.set()
            await asyncio.Event().wait()  # never: the consumer is cancelled while waiting here
            return None

    stream = BlockingStream([])
    gen = frames(stream)
    assert await anext(gen) == OPEN
    task = asyncio.create_task(gen.__anext__())
    async with asyncio.timeout(10):
        await release.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.closed


# -- the response ----------------------------------------------------------------------------------


def scope(spec_version: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "method": "GET", "path": "/"}


async def test_response_headers() -> None:
    response = EventStreamResponse(frames(FakeStream([])), send_timeout=1.0)
    headers = dict(response.headers)
    assert headers["cache-control"] == "no-store"
    assert headers["x-accel-buffering"] == "no"
    assert headers["connection"] == "close"
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

    response = EventStreamResponse(frames(stream), send_timeout=0.05)
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

    response = EventStreamResponse(frames(stream), send_timeout=5.0)
    async with asyncio.timeout(10):
        await response(scope("2.3"), receive, send)
    assert stream.closed


def told_of_disconnect() -> tuple[dict[str, Any], list[Any], list[str]]:
    """A scope whose server offers the disconnect callback (`web.abortable`): the callbacks
    registered (None: forgotten) and the aborts asked for."""
    watchers: list[Any] = []
    aborts: list[str] = []
    extension = {"abort": lambda: aborts.append("abort"), "on_disconnect": watchers.append}
    return {**scope("2.3"), "extensions": {ABORT_EXTENSION: extension}}, watchers, aborts


async def never_receive() -> Message:
    raise AssertionError("the server tells of the disconnect: `receive` is not awaited")


@pytest.mark.parametrize("pending_send", [False, True], ids=["waiting-for-an-event", "in-a-send"])
async def test_the_servers_disconnect_callback_ends_the_stream_as_client_gone(pending_send: bool) -> None:
    stream = FakeStream([message(1)])  # then idle
    record = StreamRecord()
    gone = asyncio.Event()
    http_scope, watchers, aborts = told_of_disconnect()

    async def send(msg: Message) -> None:
        if msg["type"] == "http.response.body" and msg["body"].startswith(b"id:"):
            gone.set()
            if pending_send:
                await asyncio.Event().wait()  # the client's window is shut: the send waits

    async def disconnect() -> None:
        await gone.wait()
        watchers[0]()  # the connection is lost: `connection_lost` calls it

    response = EventStreamResponse(frames(stream, record=record), send_timeout=3600, stream=stream, record=record)
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        group.create_task(disconnect())
        await response(http_scope, never_receive, send)
    assert stream.closed and record.reason == "client_gone"
    assert aborts == []  # nothing to abort: the connection is gone
    assert watchers[-1] is None  # forgotten once the response is over


async def test_a_disconnect_told_before_the_stream_begins_ends_it_at_once() -> None:
    stream = FakeStream([])
    record = StreamRecord()
    http_scope, _, _ = told_of_disconnect()
    extension = http_scope["extensions"][ABORT_EXTENSION]
    extension["on_disconnect"] = lambda callback: callback() if callback is not None else None  # lost already

    async def send(msg: Message) -> None:
        pass  # uvicorn drops what is sent to a lost connection

    # Else it would stream on, idle, for ever: nothing it sends can fail.
    response = EventStreamResponse(frames(stream, record=record), send_timeout=3600, stream=stream, record=record)
    async with asyncio.timeout(10):
        await response(http_scope, never_receive, send)
    assert stream.closed and record.reason == "client_gone"


@pytest.mark.parametrize("header", [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")])
async def test_a_stream_request_with_a_body_has_it_read_until_the_disconnect(header: tuple[bytes, bytes]) -> None:
    # uvicorn stops reading a connection whose body the application leaves unread: neither the
    # body's deadline nor the client's leaving would then be noticed. Starlette's way reads it.
    stream = FakeStream([message(1)])
    http_scope, watchers, _ = told_of_disconnect()
    http_scope["headers"] = [header]
    first_body = asyncio.Event()
    received: list[str] = []

    async def send(msg: Message) -> None:
        if msg["type"] == "http.response.body":
            first_body.set()

    async def receive() -> Message:
        if not received:
            received.append("http.request")
            return {"type": "http.request", "body": b"hello", "more_body": False}
        await first_body.wait()
        received.append("http.disconnect")
        return {"type": "http.disconnect"}

    response = EventStreamResponse(frames(stream), send_timeout=3600)
    async with asyncio.timeout(10):
        await response(http_scope, receive, send)
    assert received == ["http.request", "http.disconnect"] and stream.closed
    assert watchers == []  # the server's callback was not asked for


async def test_a_slow_reader_is_still_aborted_when_the_server_tells_of_disconnects() -> None:
    stream = FakeStream([message(1)])
    record = StreamRecord()
    http_scope, _, aborts = told_of_disconnect()

    async def send(msg: Message) -> None:
        if msg["type"] == "http.response.body" and msg["body"].startswith(b"id:"):
            await asyncio.Event().wait()  # stuck, and the connection is not lost

    response = EventStreamResponse(frames(stream, record=record), send_timeout=0.05, stream=stream, record=record)
    async with asyncio.timeout(10):
        await response(http_scope, never_receive, send)
    assert stream.closed and record.reason == "slow_reader" and aborts == ["abort"]


@pytest.mark.parametrize("name", ["message", "truncated"])
@pytest.mark.parametrize("event_id", ["", "1678886400000-0", "a\nb", "x\0y", "c\rd"])
@pytest.mark.parametrize("data", [UPDATE, b"a\nb", b"a\r\nb", b"c\rd", b"x\0y", b""])
@pytest.mark.parametrize("retry_ms", [None, 3000])
def test_the_update_fast_path_frames_exactly_like_encode_frame(
    name: str, event_id: str, data: bytes, retry_ms: int | None
) -> None:
    expected = framing.encode_frame(
        data, event_id=event_id or None, event=None if name == "message" else name, retry_ms=retry_ms
    )
    assert framing.encode_update_event((name, event_id, data), retry_ms=retry_ms) == expected


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

    response = EventStreamResponse(frames(stream), send_timeout=0.1)
    async with asyncio.timeout(10):
        await response(scope("2.3"), receive, send)
    assert bodies[0] == OPEN
    assert len([b for b in bodies if b.startswith(b"id")]) == 3
    assert bodies[-1] == b""


# -- over a real socket: the server closes the connection when it ends a stream ---------------------

SECRET = "sse-unit-test-secret-" + "x" * 48
BIG = b'{"type":"UPDATE","message":"' + b"m" * 65536 + b'"}'


class ScriptedUpdates(FakeUpdates):
    """Opens the stream the test sets in `next_stream`."""

    def __init__(self, stream: FakeStream) -> None:
        super().__init__()
        self.stream = stream

    async def open_stream(  # type: ignore[override]
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> FakeStream:
        return self.stream


class Flood(FakeStream):
    """An endless supply of 64 KiB updates: a client that does not read falls behind at once."""

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        self.next_calls += 1
        await asyncio.sleep(0)
        return ("message", f"1678886400000-{self.next_calls}", BIG)


@asynccontextmanager
async def live_server(
    stream: FakeStream, http: type[Any] | None = None, *, send_timeout: int = 1
) -> AsyncIterator[int]:
    """uvicorn in this process, as `cli.main` runs it (its protocol, bounds aside: `http`, by
    default the server's own class), on a free port, with the app on fake backends whose run stream
    is `stream`; keep-alive is made an hour long so that only the server's own decision can close a
    connection within a test."""
    settings = replace(
        Settings(),
        jwt_secret=SECRET,
        jwt_public_key=None,
        jwks_url=None,
        sse_heartbeat_seconds=3600,
        sse_send_timeout_seconds=send_timeout,
    )
    app = create_app(settings, fake_backends_factory(FakeRuns(status="RUNNING"), ScriptedUpdates(stream)))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    config = uvicorn.Config(
        app, http=http or ServerProtocol, log_config=None, timeout_keep_alive=3600, timeout_graceful_shutdown=1
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[listener])
    try:
        yield listener.getsockname()[1]
    finally:
        await server.shutdown(sockets=[listener])


class ServerProtocol(AbortableHttpToolsProtocol, DirectWriteHttpToolsProtocol):
    """The protocols `web.transport.protocol_class` puts in front of its bounds, in its order."""


def test_the_servers_protocol_offers_direct_writes_and_aborts() -> None:
    served = protocol_class(Limits(max_header_bytes=8192, header_timeout=5, body_timeout=5, max_connections=10))
    assert issubclass(served, AbortableHttpToolsProtocol) and issubclass(served, DirectWriteHttpToolsProtocol)


async def open_stream_request(port: int, *, receive_buffer: int | None = None) -> socket.socket:
    client = socket.socket()
    if receive_buffer is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, ("127.0.0.1", port))
    token = mint_token(SECRET, user="u1", project="p1")
    request = (
        f"GET /api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}/stream HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    await loop.sock_sendall(client, request.encode())
    return client


async def test_a_stream_the_server_ends_closes_its_connection() -> None:
    # The hub dropped the subscription: the response ends without `end`, and the connection with it
    # (it used to stay open, kept alive for a next request that an SSE client never sends).
    async with live_server(FakeStream([message(1), DROPPED])) as port:
        client = await open_stream_request(port)
        received = b""
        with client:
            async with asyncio.timeout(10):
                while chunk := await asyncio.get_running_loop().sock_recv(client, 65536):
                    received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nconnection: close" in head.lower()
    assert b"retry: 3000" in body and b"id: 1678886400001-0" in body
    assert body.endswith(b"0\r\n\r\n")  # the response is complete, then the connection closed


async def test_the_connection_of_a_client_that_stopped_reading_is_aborted() -> None:
    # The client never reads: the server's buffers fill, its send waits past the send timeout and
    # the stream ends. A plain close would wait for those buffers to drain, i.e. forever: the
    # connection must be reset instead, which the client sees as a hang-up without reading a byte.
    stream = Flood([])
    async with live_server(stream) as port:
        client = await open_stream_request(port, receive_buffer=4096)
        with client:
            poller = select.poll()
            poller.register(client, select.POLLHUP | select.POLLERR | select.POLLRDHUP)
            events = await asyncio.to_thread(poller.poll, 15_000)
            assert events, "the server kept the connection of a client that stopped reading"
            assert events[0][1] & (select.POLLHUP | select.POLLERR)
    assert stream.closed


class Handing(FakeStream):
    """Hands `handed` to the sink while it waits, as the hub does with live updates (an update the
    sink refuses is returned instead, and so are the ones after it), then plays its script."""

    def __init__(self, handed: list[UpdateEvent], script: list[Any]) -> None:
        super().__init__(script)
        self.handed: deque[UpdateEvent] = deque(handed)
        self.taken: list[UpdateEvent] = []

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        if self.handed:
            await asyncio.sleep(0)  # waiting, as the hub's reader reads
            if sink is None or not sink(self.handed[0][1], self.handed[0][2]):
                return self.handed.popleft()
            self.taken.append(self.handed.popleft())
            return await self.next(wait_seconds, sink)
        return await super().next(wait_seconds, sink)


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body, checking every chunk's framing; it must be complete."""
    payload = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", body
            return payload
        assert body[size : size + 2] == b"\r\n", body[: size + 2]
        payload, body = payload + body[:size], body[size + 2 :]


async def stream_body(stream: FakeStream, http: type[Any] | None = None) -> bytes:
    async with live_server(stream, http) as port:
        client = await open_stream_request(port)
        received = b""
        with client:
            async with asyncio.timeout(10):
                while chunk := await asyncio.get_running_loop().sock_recv(client, 65536):
                    received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    return dechunk(body)


async def test_live_updates_are_written_straight_to_the_connection_in_order() -> None:
    stream = Handing([message(1), message(2), message(3)], [message(4), DROPPED])
    payload = await stream_body(stream)
    assert stream.taken == [message(1), message(2), message(3)]  # written by the sink, no wake-up
    ids = [line for line in payload.split(b"\n") if line.startswith(b"id: ")]
    assert ids == [f"id: 1678886400{n:03d}-0".encode() for n in (1, 2, 3, 4)]
    assert payload.startswith(OPEN) and payload.count(UPDATE) == 4


async def test_without_direct_writes_the_same_updates_go_through_send() -> None:
    stream = Handing([message(1), message(2), message(3)], [message(4), DROPPED])
    payload = await stream_body(stream, http=AbortableHttpToolsProtocol)
    assert stream.taken == []  # the sink refused every one: returned by `next` instead
    ids = [line for line in payload.split(b"\n") if line.startswith(b"id: ")]
    assert ids == [f"id: 1678886400{n:03d}-0".encode() for n in (1, 2, 3, 4)]


class Cycle:
    """What the direct writer reads of uvicorn's `RequestResponseCycle`."""

    def __init__(self, transport: object) -> None:
        self.response_started = False
        self.response_complete = False
        self.disconnected = False
        self.chunked_encoding = True
        self.flow = SimpleNamespace(write_paused=False)
        self.transport = transport


def test_the_direct_writer_does_not_keep_its_request_alive() -> None:
    """The request's scope holds the writer: a writer holding the request would make every
    request garbage that only the collector frees."""
    from web.direct_write import _writer

    written: list[bytes] = []
    cycle = Cycle(SimpleNamespace(write=written.append, is_closing=lambda: False))
    cycle.response_started = True
    write = _writer(cycle)  # type: ignore[arg-type]
    gone = weakref.ref(cycle)
    del cycle  # freed by its reference count alone: no collection needed
    assert gone() is None
    assert not write(b"late") and written == []


def test_the_direct_writer_stands_in_for_send_only_inside_a_chunked_body() -> None:
    from web.direct_write import _writer

    written: list[bytes] = []
    transport = SimpleNamespace(write=written.append, is_closing=lambda: False)
    cycle = Cycle(transport)
    write = _writer(cycle)  # type: ignore[arg-type]
    assert not write(b"early")  # before the response's head
    cycle.response_started = True
    assert write(b"abc") and written == [b"3\r\nabc\r\n"]
    for name, value in (("write_paused", True),):
        setattr(cycle.flow, name, value)
        assert not write(b"x")
        setattr(cycle.flow, name, False)
    for name, value in (("disconnected", True), ("response_complete", True), ("chunked_encoding", False)):
        setattr(cycle, name, value)
        assert not write(b"x")
        setattr(cycle, name, not value)
    cycle.chunked_encoding = True
    assert not write(b"")  # an empty chunk would end the body
    transport.is_closing = lambda: True
    assert not write(b"x")
    assert written == [b"3\r\nabc\r\n"]


# -- over a real socket: the server tells the stream its client is gone -----------------------------


class Silent(FakeStream):
    """Waits for an event that never comes, as the stream of a quiet run does."""

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        await asyncio.Event().wait()
        return None


@asynccontextmanager
async def responses_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[list[tuple[EventStreamResponse, asyncio.Event]]]:
    """Every `EventStreamResponse` the server answers with, and an event set once its `__call__`
    has returned (the slot released and the record ended by then)."""
    seen: list[tuple[EventStreamResponse, asyncio.Event]] = []
    answer = EventStreamResponse.__call__

    async def call(self: EventStreamResponse, scope: Any, receive: Any, send: Any) -> None:
        done = asyncio.Event()
        seen.append((self, done))
        try:
            await answer(self, scope, receive, send)
        finally:
            done.set()

    monkeypatch.setattr(EventStreamResponse, "__call__", call)
    yield seen


async def read_until(client: socket.socket, marker: bytes) -> bytes:
    received = b""
    async with asyncio.timeout(10):
        while marker not in received:
            chunk = await asyncio.get_running_loop().sock_recv(client, 65536)
            assert chunk, "the server closed the connection"
            received += chunk
    return received


async def test_a_client_that_disconnects_mid_stream_ends_it_at_once_over_a_real_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Heartbeats once an hour and a stream that never has an event: only the server's word of the
    # disconnect can end it.
    stream = Silent([])
    async with responses_seen(monkeypatch) as seen, live_server(stream, send_timeout=3600) as port:
        client = await open_stream_request(port)
        with client:
            await read_until(client, b"retry: 3000")
        ((response, done),) = seen
        async with asyncio.timeout(10):
            await done.wait()
    assert stream.closed
    assert response.record is not None and response.record.reason == "client_gone"
    assert response.slot is not None and response.slot.released


class SignalsPausedWrites(ServerProtocol):
    """The server's protocol, telling the test when the client's window is shut."""

    paused: asyncio.Event

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused.set()


async def test_a_client_that_disconnects_while_a_send_waits_ends_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # A send timeout of an hour: the stream cannot end as a slow reader within the test.
    stream = Flood([])
    SignalsPausedWrites.paused = asyncio.Event()
    async with responses_seen(monkeypatch) as seen, live_server(stream, SignalsPausedWrites, send_timeout=3600) as port:
        client = await open_stream_request(port, receive_buffer=4096)
        with client:
            async with asyncio.timeout(10):
                await SignalsPausedWrites.paused.wait()  # the stream's send now waits for the client
        ((response, done),) = seen
        async with asyncio.timeout(10):
            await done.wait()
    assert stream.closed
    assert response.record is not None and response.record.reason == "client_gone"
    assert response.slot is not None and response.slot.released


async def test_an_open_stream_costs_the_server_one_task_not_two(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = Silent([])
    served = protocol_class(Limits(max_header_bytes=8192, header_timeout=5, body_timeout=5, max_connections=100))
    async with responses_seen(monkeypatch) as seen, live_server(stream, served, send_timeout=3600) as port:
        first = await open_stream_request(port)
        await read_until(first, b"retry: 3000")
        before = len(asyncio.all_tasks())  # with one stream open: whatever the app started lazily
        clients = [await open_stream_request(port) for _ in range(5)]
        for client in clients:
            await read_until(client, b"retry: 3000")
        assert len(asyncio.all_tasks()) - before == len(clients)  # each stream's own ASGI task only
        for client in [first, *clients]:
            client.close()
        async with asyncio.timeout(10):
            for _, done in seen:
                await done.wait()
    assert all(response.record is not None and response.record.reason == "client_gone" for response, _ in seen)
    assert all(response.slot is not None and response.slot.released for response, _ in seen)


@pytest.mark.parametrize("fast_lane", [True, False], ids=["lane", "connexion"])
def test_a_head_request_gets_the_streams_head_and_holds_no_slot(fast_lane: bool) -> None:
    # uvicorn writes no body for HEAD: a stream behind it would never fail a send and would hold
    # its slot for as long as the client liked. One stream per caller here: two HEADs, then a GET.
    settings = replace(
        Settings(),
        jwt_secret=SECRET,
        jwt_public_key=None,
        jwks_url=None,
        fast_lane=fast_lane,
        max_streams_per_principal=1,
    )
    stream = FakeStream([DROPPED])
    app = create_app(settings, fake_backends_factory(FakeRuns(status="RUNNING"), ScriptedUpdates(stream)))
    headers = {"Authorization": f"Bearer {mint_token(SECRET, user='u1', project='p1')}"}
    path = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}/stream"
    with app.test_client() as client:
        for _ in range(2):
            head = client.head(path, headers=headers)
            assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
            assert head.content == b""
        assert client.get(path, headers=headers).status_code == 200  # the slot was given back
