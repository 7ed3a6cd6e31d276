"""Stream limits (429 with Retry-After and the JSON error body) and the graceful end of streams on
shutdown, through the whole app on fake backends.

Starlette's test client only returns once a response is complete, and these streams stay open, so
the app is driven here at the ASGI level: a lifespan, then requests whose disconnect the test
decides. Nothing sleeps: every wait is on an event, under a deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from starlette.types import Message

from core.errors import BackendUnavailable, TooManyRequests
from core.principals import Principal
from core.protocols import LiveSink, UpdateEvent
from core.settings import Settings
from core.shutdown import ServerShutdown
from core.tokens import mint_token
from handlers.deps import Deps
from handlers.stream_limits import StreamLimiter
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, app_settings, fake_backends_factory
from web.app import begin_shutdown, create_app
from web.sse.frames import update_frames

SECRET = "limits-unit-test-secret-" + "x" * 48
STREAM = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}/stream"
DEADLINE = 10.0


class IdleStream:
    """An open run's stream with nothing to send: `next` waits (really) until told otherwise."""

    def __init__(self, stored: list[UpdateEvent]) -> None:
        self.pending: deque[UpdateEvent] = deque(stored)
        self.finished = False
        self.closed = False
        self._wake = asyncio.Event()

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        if self.pending:
            return self.pending.popleft()
        if self.finished or self.closed:
            raise StopAsyncIteration
        self._wake.clear()
        try:
            async with asyncio.timeout(wait_seconds):
                await self._wake.wait()
        except TimeoutError:
            return None
        return None

    def finish(self) -> None:
        self.finished = True
        self._wake.set()

    async def aclose(self) -> None:
        self.closed = True
        self._wake.set()


class StreamingUpdates(FakeUpdates):
    """`FakeUpdates` whose streams wait like real ones; `fail_open` makes opening fail as Redis would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_open = False
        self.streams: list[IdleStream] = []

    async def open_stream(  # type: ignore[override]
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> IdleStream:
        if self.fail_open:
            raise BackendUnavailable("Redis did not answer")
        stream = IdleStream([("message", f"{1678886400000 + i}-0", d) for i, d in enumerate(self.stored)])
        self.streams.append(stream)
        return stream


# -- an ASGI driver ---------------------------------------------------------------------------------


class Exchange:
    """One request in flight: the response head once sent, its body as it comes, and a disconnect
    the test triggers."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.chunk_arrived = asyncio.Event()
        self.complete = asyncio.Event()
        self._disconnect = asyncio.Event()
        self._request_sent = False
        self.task: asyncio.Task[None] | None = None

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            self.started.set()
        elif message["type"] == "http.response.body":
            if message.get("body"):
                self.chunks.append(message["body"])
                self.chunk_arrived.set()
            if not message.get("more_body", False):
                self.complete.set()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return orjson.loads(self.body)

    async def head(self) -> Exchange:
        async with asyncio.timeout(DEADLINE):
            await self.started.wait()
        return self

    async def until_body_contains(self, needle: bytes) -> None:
        async with asyncio.timeout(DEADLINE):
            while needle not in self.body:
                self.chunk_arrived.clear()
                await self.chunk_arrived.wait()

    async def disconnect(self) -> None:
        self._disconnect.set()
        assert self.task is not None
        async with asyncio.timeout(DEADLINE):
            await self.task

    async def finished(self) -> None:
        assert self.task is not None
        async with asyncio.timeout(DEADLINE):
            await self.task


class Driver:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan: asyncio.Task[None] | None = None
        self.open: list[Exchange] = []

    async def __aenter__(self) -> Driver:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self._lifespan = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        async with asyncio.timeout(DEADLINE):
            assert (await self._from_app.get())["type"] == "lifespan.startup.complete"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for exchange in self.open:
            if exchange.task is not None and not exchange.task.done():
                await exchange.disconnect()
        await self._to_app.put({"type": "lifespan.shutdown"})
        async with asyncio.timeout(DEADLINE):
            assert (await self._from_app.get())["type"] == "lifespan.shutdown.complete"
            assert self._lifespan is not None
            await self._lifespan

    def request(
        self, path: str, *, user: str = "u1", project: str = "p1", method: str = "GET", ttl: int = 3600
    ) -> Exchange:
        token = mint_token(SECRET, user=user, project=project, ttl_seconds=ttl)
        headers = [(b"authorization", f"Bearer {token}".encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": dict(self.state),
        }
        exchange = Exchange()
        exchange.task = asyncio.create_task(self.app(scope, exchange.receive, exchange.send))
        self.open.append(exchange)
        return exchange

    async def stream(self, **kwargs: Any) -> Exchange:
        return await self.request(STREAM, **kwargs).head()


def settings(**overrides: Any) -> Settings:
    base = app_settings(SECRET, sse_heartbeat_seconds=3600, max_streams_per_principal=2, max_streams_per_process=3)
    return replace(base, **overrides)


@pytest.fixture
async def updates() -> StreamingUpdates:
    return StreamingUpdates()


@pytest.fixture
async def driver(updates: StreamingUpdates) -> AsyncIterator[Driver]:
    app = create_app(settings(), fake_backends_factory(FakeRuns(status="RUNNING"), updates))
    async with Driver(app) as d:
        yield d


def limiter(driver: Driver) -> StreamLimiter:
    """The app's own stream limiter (on the dependencies its lifespan built)."""
    deps: Deps = driver.state["deps"]
    return deps.streams


def assert_429(exchange: Exchange) -> dict[str, Any]:
    assert exchange.status == 429
    assert exchange.headers["content-type"].startswith("application/json")
    assert int(exchange.headers["retry-after"]) > 0
    body: dict[str, Any] = exchange.json()
    assert body["status"] == 429 and body["error"] == "Too Many Requests"
    assert body["errorCode"] == "too_many_requests" and body["message"]
    return body


# -- limits ----------------------------------------------------------------------------------------


async def test_streams_beyond_the_per_principal_limit_get_429_with_retry_after(
    driver: Driver, updates: StreamingUpdates
) -> None:
    first, second = await driver.stream(), await driver.stream()
    assert (first.status, second.status) == (200, 200)
    third = await driver.stream()
    await third.finished()
    assert "per caller" in assert_429(third)["message"]
    assert limiter(driver).open_streams == 2

    # Another caller has its own allowance; the same user id in another project is another caller.
    other = await driver.stream(user="u2")
    assert other.status == 200

    await first.disconnect()  # a closed stream gives its place back at once
    again = await driver.stream()
    assert again.status == 200


async def test_streams_beyond_the_per_process_limit_get_429(driver: Driver, updates: StreamingUpdates) -> None:
    opened = [await driver.stream(user=f"user-{i}") for i in range(3)]
    assert [e.status for e in opened] == [200, 200, 200]
    refused = await driver.stream(user="user-new")
    await refused.finished()
    assert "this server" in assert_429(refused)["message"].lower()
    for exchange in opened:
        await exchange.disconnect()
    assert limiter(driver).open_streams == 0
    assert (await driver.stream(user="user-new")).status == 200


async def test_every_way_a_stream_ends_releases_its_place(driver: Driver, updates: StreamingUpdates) -> None:
    count = limiter(driver)
    # Refused before the stream starts: run of another project (404), Redis down (503).
    not_found = await driver.stream(project="p2")
    await not_found.finished()
    assert not_found.status == 404
    updates.fail_open = True
    unavailable = await driver.stream()
    await unavailable.finished()
    assert unavailable.status == 503 and unavailable.headers["retry-after"]
    updates.fail_open = False
    assert count.open_streams == 0

    # The backend ends the stream (the hub dropped a slow subscriber): no `end`, the client resumes.
    stream = await driver.stream()
    assert count.open_streams == 1
    updates.streams[-1].finish()
    await stream.finished()
    assert stream.status == 200 and b"event: end" not in stream.body
    assert count.open_streams == 0

    # The client goes away.
    stream = await driver.stream()
    await stream.disconnect()
    assert count.open_streams == 0 and all(s.closed for s in updates.streams)


async def test_a_closed_run_stream_ends_and_releases(updates: StreamingUpdates) -> None:
    updates.store(RUN_ID, b',"type":"UPDATE","message":"m"}', at_ms=1678886400000)
    app = create_app(settings(), fake_backends_factory(FakeRuns(status="COMPLETED"), updates))
    async with Driver(app) as driver:
        streams = [await driver.stream() for _ in range(5)]  # more than the limit, one after another
        for exchange in streams:
            await exchange.finished()
        assert all(e.status == 200 for e in streams)
        assert all(b'"reason":"run_closed"' in e.body for e in streams)
        assert limiter(driver).open_streams == 0


def test_limiter_counts_per_project_and_principal() -> None:
    limits = StreamLimiter(per_principal=1, per_process=10)
    alice_p1 = Principal(user_id="alice", project_id="p1")
    alice_p2 = Principal(user_id="alice", project_id="p2")
    alice_key = Principal(user_id="alice", kind="apikey", project_id="p1")
    slots = [limits.acquire(p) for p in (alice_p1, alice_p2, alice_key)]
    with pytest.raises(TooManyRequests):
        limits.acquire(alice_p1)
    slots[0].release()
    slots[0].release()  # idempotent
    assert limits.open_streams == 2
    slots.append(limits.acquire(alice_p1))  # alice's place in p1 is free again
    assert limits.open_streams == 3


def test_a_slot_dropped_without_release_gives_its_place_back() -> None:
    limits = StreamLimiter(per_principal=1, per_process=1)
    slot = limits.acquire(Principal(user_id="u"))
    assert limits.open_streams == 1
    del slot  # a response built but never sent
    assert limits.open_streams == 0


async def test_a_stream_sends_retry_at_once(driver: Driver) -> None:
    # Nothing stored, nothing posted, heartbeats once an hour: the client still learns at once that
    # the stream is up, and its reconnection delay.
    stream = await driver.stream()
    await stream.until_body_contains(b"retry: 3000\n: open\n\n")
    assert stream.body == b"retry: 3000\n: open\n\n"


async def test_a_stream_ends_with_token_expired_when_its_token_does_and_gives_its_place_back(
    updates: StreamingUpdates,
) -> None:
    # The token expires in one to two seconds (`exp` is whole seconds) and no leeway is given.
    app = create_app(settings(jwt_leeway_seconds=0), fake_backends_factory(FakeRuns(status="RUNNING"), updates))
    async with Driver(app) as driver:
        stream = await driver.stream(ttl=2)
        assert stream.status == 200
        await stream.finished()
        assert stream.body.endswith(b'event: end\ndata: {"reason":"token_expired"}\n\n')
        assert limiter(driver).open_streams == 0 and all(s.closed for s in updates.streams)


# -- graceful shutdown -----------------------------------------------------------------------------


async def test_shutdown_ends_open_streams_with_a_final_event_and_refuses_new_ones(
    driver: Driver, updates: StreamingUpdates
) -> None:
    updates.store(RUN_ID, b',"type":"UPDATE","message":"m"}', at_ms=1678886400000)
    streams = [await driver.stream(), await driver.stream(user="u2")]
    for exchange in streams:
        await exchange.until_body_contains(b"id: 1678886400000-0")  # idle, waiting for the next one
    begin_shutdown(driver.app)  # what the CLI calls from uvicorn's signal handler
    for exchange in streams:
        await exchange.finished()
        assert exchange.body.endswith(b'event: end\ndata: {"reason":"server_shutdown"}\n\n')
    assert limiter(driver).open_streams == 0 and all(s.closed for s in updates.streams)

    late = await driver.stream()
    await late.finished()
    assert late.status == 503 and late.headers["retry-after"] == "1"
    assert late.json()["errorCode"] == "backend_unavailable"


async def test_shutdown_interrupts_a_wait_and_is_safe_to_trigger_from_another_thread() -> None:
    own = ServerShutdown()
    stream = IdleStream([("message", "1-0", b"{}")])

    async def closed_status() -> str | None:
        return None

    frames = update_frames(stream, heartbeat_seconds=3600, retry_ms=3000, closed_status=closed_status, shutdown=own)
    assert (await anext(frames)).startswith(b"retry: 3000\n")
    assert b"id: 1-0" in await anext(frames)
    waiting = asyncio.create_task(anext(frames))
    async with asyncio.timeout(DEADLINE):
        while not own._waits:  # noqa: ASYNC110  # until the generator waits inside `next`
            await asyncio.sleep(0)
    await asyncio.to_thread(own.trigger)
    async with asyncio.timeout(DEADLINE):
        last = await waiting
    assert last == b'event: end\ndata: {"reason":"server_shutdown"}\n\n'
    with pytest.raises(StopAsyncIteration):
        await anext(frames)
    assert stream.closed and not own._waits


async def test_the_stop_signal_is_the_app_s_own(updates: StreamingUpdates) -> None:
    """Two apps in one process: stopping one leaves the other's streams and new streams alone."""
    stopped = create_app(settings(), fake_backends_factory(FakeRuns(status="RUNNING"), updates))
    other = create_app(settings(), fake_backends_factory(FakeRuns(status="RUNNING"), StreamingUpdates()))
    async with Driver(stopped) as first, Driver(other) as second:
        begin_shutdown(stopped)
        late = await first.stream()
        await late.finished()
        assert late.status == 503
        open_one = await second.stream()
        await open_one.until_body_contains(b": open")
        assert limiter(second).open_streams == 1


def test_the_stop_signal_reaches_the_app_through_uvicorn_s_wrappers() -> None:
    """What the CLI's signal handler does: find the app in uvicorn's loaded app (wrapped in its
    proxy-headers and, at trace level, message-logger middlewares) and trigger its stop signal."""
    import uvicorn

    built: list[Any] = []

    def factory() -> Any:
        built.append(create_app(settings(), fake_backends_factory()))
        return built[-1]

    config = uvicorn.Config(factory, factory=True, proxy_headers=True, log_level="trace", log_config=None)
    config.load()
    assert config.loaded_app is not built[0]  # wrapped
    begin_shutdown(config.loaded_app)
    assert built[0].shutdown.is_set
    begin_shutdown(None)  # a signal before the app exists: nothing to tell, no error
