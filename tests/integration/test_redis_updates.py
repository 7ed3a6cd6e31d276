"""The Redis updates backend and its hub against a real Redis (the session's, or one of their own).

No sleeps stand in for synchronisation: every wait is on a condition, under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from backends.errors import BackendUnavailable, InvalidInput, PayloadTooLarge
from backends.protocol import UpdateEvent
from backends.redis_updates import (
    MAX_DETAILS_BYTES,
    MAX_MESSAGE_BYTES,
    TTL_SECONDS,
    RedisUpdatesBackend,
    RunUpdateStream,
    stream_key,
)
from server import sse, stack
from server.settings import Settings
from tests.conftest import Services

pytestmark = pytest.mark.services

DEADLINE = 30.0


def new_run() -> str:
    return str(uuid.uuid4())


async def open_stream(
    backend: RedisUpdatesBackend,
    run_id: str,
    *,
    after_id: str | None = None,
    since_ms: int | None = None,
    skip_history: bool = False,
) -> RunUpdateStream:
    return await backend.open_stream(run_id, after_id=after_id, since_ms=since_ms, skip_history=skip_history)


@contextlib.asynccontextmanager
async def updates_backend(url: str, **kwargs: Any) -> AsyncIterator[RedisUpdatesBackend]:
    settings = kwargs.pop("settings", None) or Settings(backend_timeout_seconds=5)
    backend = await RedisUpdatesBackend.from_url(url, settings, **kwargs)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def backend(services: Services) -> AsyncIterator[RedisUpdatesBackend]:
    async with updates_backend(services.redis_url) as b:
        yield b


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[Redis]:
    client = Redis.from_url(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def until(predicate: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Wait for state the test cannot be notified of (hub internals) under a deadline."""
    async with asyncio.timeout(deadline):
        while not predicate():  # noqa: ASYNC110  # polls a condition under a deadline
            await asyncio.sleep(0.01)


async def take(stream: RunUpdateStream, count: int) -> list[UpdateEvent]:
    """The next `count` events (updates and control events), waiting for live ones."""
    out: list[UpdateEvent] = []
    async with asyncio.timeout(DEADLINE):
        while len(out) < count:
            event = await stream.next(1.0)
            if event is not None:
                out.append(event)
    return out


async def take_until(stream: RunUpdateStream, last_id: str) -> list[UpdateEvent]:
    """Every event up to and including the update `last_id` (a sentinel posted by the test)."""
    out: list[UpdateEvent] = []
    async with asyncio.timeout(DEADLINE):
        while not out or out[-1][1] != last_id:
            event = await stream.next(1.0)
            if event is not None:
                out.append(event)
    return out


def ids(events: list[UpdateEvent]) -> list[str]:
    return [event_id for name, event_id, _ in events if name == "message"]


def sent_ids(frames: list[bytes]) -> list[str]:
    return [line[4:].decode() for frame in frames for line in frame.split(b"\n") if line.startswith(b"id: ")]


class Waiting:
    """Wraps a stream to tell when its consumer is waiting inside `next` (to cancel it there)."""

    def __init__(self, stream: RunUpdateStream) -> None:
        self.stream = stream
        self.waiting = asyncio.Event()

    async def next(self, wait_seconds: float) -> UpdateEvent | None:
        self.waiting.set()
        return await self.stream.next(wait_seconds)

    def finish(self) -> None:
        self.stream.finish()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def first_frame(gen: AsyncGenerator[bytes, None]) -> bytes:
    return await anext(gen)


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


async def post_many(backend: RedisUpdatesBackend, run_id: str, count: int, *, concurrency: int = 50) -> list[str]:
    """Post `count` updates (message = index), at most `concurrency` at a time; ids in post order."""
    out: list[str] = []
    for start in range(0, count, concurrency):
        batch = range(start, min(start + concurrency, count))
        out += await asyncio.gather(*(backend.append(run_id, {"message": str(i)}) for i in batch))
    return sorted(out, key=id_key)


# -- storage ---------------------------------------------------------------------------------------


async def test_stored_json_has_the_seed_shape_defaults_and_field_order(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    first = await backend.append(run_id, {})
    await backend.append(
        run_id,
        {"workstream_id": "w-1", "details": {"progress": 50}, "message": "Processing", "type": "PROGRESS"},
    )
    await backend.append(run_id, {"type": "THOUGHT", "details": None})
    raw = await backend.read_since(run_id, 0)
    messages = orjson.loads(raw)
    assert [list(m) for m in messages] == [
        ["timestamp", "workflow_run_id", "type", "message"],
        ["timestamp", "workflow_run_id", "type", "message", "details", "workstream_id"],
        ["timestamp", "workflow_run_id", "type", "message", "details"],
    ]
    assert messages[0] == {
        "timestamp": id_key(first)[0],
        "workflow_run_id": run_id,
        "type": "UPDATE",
        "message": "UPDATE",
    }
    assert messages[1]["details"] == {"progress": 50} and messages[1]["workstream_id"] == "w-1"
    assert messages[2]["message"] == "THOUGHT" and messages[2]["details"] is None
    assert raw.startswith(b'[{"timestamp":') and b"\n" not in raw


async def test_details_orjson_refuses_are_still_stored(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    await backend.append(run_id, {"details": {"big": 2**70, "lone": "\ud800"}})
    (message,) = json.loads(await backend.read_since(run_id, 0))  # orjson refuses lone surrogates
    assert message["details"] == {"big": 2**70, "lone": "\ud800"}


async def test_size_limits(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    await backend.append(run_id, {"message": "é" * (MAX_MESSAGE_BYTES // 2)})  # exactly at the limit
    with pytest.raises(PayloadTooLarge):
        await backend.append(run_id, {"message": "é" * (MAX_MESSAGE_BYTES // 2) + "x"})
    at_limit = "x" * (MAX_DETAILS_BYTES - 2)  # the JSON string adds its two quotes
    await backend.append(run_id, {"details": at_limit})
    with pytest.raises(PayloadTooLarge):
        await backend.append(run_id, {"details": at_limit + "x"})
    with pytest.raises(InvalidInput):
        await backend.append(run_id, {"message": 5})
    assert len(orjson.loads(await backend.read_since(run_id, 0))) == 2


async def test_1100_posts_keep_the_newest_1000_in_order_with_a_90_day_ttl(
    backend: RedisUpdatesBackend, redis: Redis
) -> None:
    run_id = new_run()
    posted = await post_many(backend, run_id, 1100)
    assert len(set(posted)) == 1100

    messages = orjson.loads(await backend.read_since(run_id, 0))
    assert [f"{m['timestamp']}-0" for m in messages] == posted[100:]
    timestamps = [m["timestamp"] for m in messages]
    assert timestamps == sorted(timestamps) and len(set(timestamps)) == 1000  # unique: `since` is exact

    ttl = await redis.ttl(stream_key(run_id))
    assert TTL_SECONDS - 60 <= ttl <= TTL_SECONDS

    cut = messages[599]["timestamp"]
    later = orjson.loads(await backend.read_since(run_id, cut))
    assert later == messages[600:]
    assert orjson.loads(await backend.read_since(run_id, messages[-1]["timestamp"])) == []
    assert orjson.loads(await backend.read_since(run_id, 2**64 + 5)) == []
    assert orjson.loads(await backend.read_since(new_run(), 0)) == []


async def test_truncated_is_announced_only_when_updates_were_really_lost(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    posted = await post_many(backend, run_id, 1005)
    sentinel = await backend.append(run_id, {"message": "sentinel"})
    kept = posted[6:]  # 1006 posts: posted[0..5] were trimmed
    kept_after = [*kept, sentinel]

    async def events(after_id: str | None = None, since_ms: int | None = None) -> list[UpdateEvent]:
        stream = await open_stream(backend, run_id, after_id=after_id, since_ms=since_ms)
        try:
            return await take_until(stream, sentinel)
        finally:
            await stream.aclose()

    truncated = orjson.dumps({"reason": "truncated", "oldest_id": kept[0]})
    # Resuming after a trimmed entry that had trimmed successors: lost, say so, then the oldest kept.
    got = await events(after_id=posted[0])
    assert got[0] == ("truncated", "", truncated) and ids(got) == kept_after
    # Resuming after the newest trimmed entry: nothing lost although it is older than the oldest kept.
    got = await events(after_id=posted[5])
    assert got[0][0] == "message" and ids(got) == kept_after
    # The same with `since` (timestamps are the ids' milliseconds).
    got = await events(since_ms=id_key(posted[4])[0])
    assert got[0] == ("truncated", "", truncated) and ids(got) == kept_after
    got = await events(since_ms=id_key(posted[5])[0])
    assert got[0][0] == "message" and ids(got) == kept_after
    got = await events(since_ms=0)
    assert got[0][0] == "truncated"
    # No cursor: everything stored, nothing to announce.
    got = await events()
    assert got[0][0] == "message" and ids(got) == kept_after


# -- streams ---------------------------------------------------------------------------------------


async def test_three_streams_opened_before_and_during_200_concurrent_posts_get_each_once_in_order(
    backend: RedisUpdatesBackend,
) -> None:
    run_id = new_run()
    before_a = await open_stream(backend, run_id)
    before_b = await open_stream(backend, run_id, skip_history=True)

    done = 0
    halfway = asyncio.Event()

    async def post(i: int) -> str:
        nonlocal done
        new_id = await backend.append(run_id, {"message": str(i)})
        done += 1
        if done >= 60:
            halfway.set()
        return new_id

    posting = asyncio.gather(*(post(i) for i in range(200)))
    await halfway.wait()
    during = await open_stream(backend, run_id)  # part history, part live
    during_skip = await open_stream(backend, run_id, skip_history=True)
    posted = sorted(await posting, key=id_key)

    streams = [before_a, before_b, during]
    try:
        for stream in streams:
            got = await take(stream, 200)
            assert ids(got) == posted  # all 200, each once, in post order, nothing else
            assert [e[0] for e in got] == ["message"] * 200
        # Opened with skipHistory while posts were landing: exactly the ones after its start.
        sentinel = await backend.append(run_id, {"message": "sentinel"})
        got_skip = ids(await take_until(during_skip, sentinel))
        assert got_skip[-1] == sentinel and got_skip[:-1] == posted[len(posted) - len(got_skip) + 1 :]
        # Nothing more is pending on the others: the next event is the sentinel.
        for stream in streams:
            assert ids(await take(stream, 1)) == [sentinel]
        assert backend.hub.feed_count == 1 and backend.hub.subscriber_count == 4  # one shared read
    finally:
        for stream in [*streams, during_skip]:
            await stream.aclose()
    assert backend.hub.feed_count == 0 and backend.hub.subscriber_count == 0


async def test_resume_after_a_cut_by_last_event_id_or_since_loses_nothing(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    posted = await post_many(backend, run_id, 80)
    first = await open_stream(backend, run_id)
    seen = await take(first, 50)
    await first.aclose()
    assert ids(seen) == posted[:50]
    last_id, last_timestamp = seen[-1][1], orjson.loads(seen[-1][2])["timestamp"]

    by_id = await open_stream(backend, run_id, after_id=last_id)
    by_since = await open_stream(backend, run_id, since_ms=last_timestamp, skip_history=True)
    try:
        more = await post_many(backend, run_id, 20)  # live ones after the reconnect
        sentinel = await backend.append(run_id, {"message": "sentinel"})
        expected = [*posted[50:], *more, sentinel]
        assert ids(await take_until(by_id, sentinel)) == expected
        assert ids(await take_until(by_since, sentinel)) == expected
    finally:
        await by_id.aclose()
        await by_since.aclose()


async def test_a_closed_run_stream_delivers_what_is_stored_then_ends(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    posted = await post_many(backend, run_id, 250)  # more than one history page

    async def closed_status() -> str | None:
        return "COMPLETED"

    stream = await backend.open_stream(run_id, after_id=posted[9], since_ms=None, skip_history=False)
    gen = sse.update_frames(
        stream, heartbeat_seconds=3600, retry_ms=3000, closed_status=closed_status, status_at_open="COMPLETED"
    )
    async with asyncio.timeout(DEADLINE):
        frames = [frame async for frame in gen]
    assert frames[-1] == sse.end_frame("COMPLETED")
    assert frames[0].startswith(b"retry: 3000\nid: ")
    assert sent_ids(frames) == posted[10:]
    assert backend.hub.subscriber_count == 0


async def test_run_closing_mid_stream_drains_updates_posted_just_before(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    closed: list[str] = []

    async def closed_status() -> str | None:
        return closed[0] if closed else None

    stream = await backend.open_stream(run_id, after_id=None, since_ms=None, skip_history=True)
    gen = sse.update_frames(stream, heartbeat_seconds=0.05, retry_ms=3000, closed_status=closed_status)
    first = await backend.append(run_id, {"message": "working"})
    frames = [await anext(gen)]
    assert f"id: {first}".encode() in frames[0]
    # The workflow's last updates land, then it closes; the hub may not have delivered them yet.
    last = await post_many(backend, run_id, 30)
    closed.append("COMPLETED")
    async with asyncio.timeout(DEADLINE):
        frames += [frame async for frame in gen]
    assert frames[-1] == sse.end_frame("COMPLETED")
    assert sent_ids(frames) == [first, *last]


async def test_200_streams_opened_and_dropped_leave_nothing_behind(services: Services, redis: Redis) -> None:
    name = f"wfr-leak-{uuid.uuid4().hex[:8]}"
    max_connections = 8

    async def connections() -> dict[str, int]:
        counts: dict[str, int] = {}
        for client in await redis.client_list():
            counts[client["name"]] = counts.get(client["name"], 0) + 1
        return counts

    async with updates_backend(services.redis_url, client_name=name, max_connections=max_connections) as backend:
        runs = [new_run() for _ in range(20)]
        await backend.append(runs[0], {"message": "warm up"})
        tasks_before = len(asyncio.all_tasks())

        async def open_one(i: int) -> RunUpdateStream:
            return await backend.open_stream(runs[i % 20], after_id=None, since_ms=None, skip_history=i % 2 == 0)

        streams = await asyncio.gather(*(open_one(i) for i in range(200)))
        assert backend.hub.subscriber_count == 200 and backend.hub.feed_count == 20
        during = await connections()
        assert during.get(f"{name}-hub") == 1  # one reader for all 200 streams
        assert during.get(name, 0) <= max_connections  # requests share a bounded pool

        # Half are dropped by their consumer, half by cancelling the SSE generator while it waits
        # for an update (what a disconnecting client causes).
        async def never() -> str | None:
            return None

        waiting = [Waiting(s) for s in streams[100:]]
        consumers = [
            asyncio.create_task(
                first_frame(
                    sse.update_frames(w, heartbeat_seconds=3600, retry_ms=1, closed_status=never, poll_seconds=3600)
                )
            )
            for w in waiting
        ]
        for s in streams[:100]:
            await s.aclose()
        assert backend.hub.subscriber_count == 100
        async with asyncio.timeout(DEADLINE):
            for w in waiting:
                await w.waiting.wait()
        for task in consumers:
            task.cancel()
        results = await asyncio.gather(*consumers, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

        assert backend.hub.subscriber_count == 0 and backend.hub.feed_count == 0
        assert len(asyncio.all_tasks()) == tasks_before
        after = await connections()
        assert after.get(f"{name}-hub") == 1 and after.get(name, 0) <= max_connections
    # close() released every connection (Redis notices the closed sockets a moment later).
    async with asyncio.timeout(DEADLINE):
        while name in (final := await connections()) or f"{name}-hub" in final:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_cancelled_sse_generator_unsubscribes_at_once(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    stream = await backend.open_stream(run_id, after_id=None, since_ms=None, skip_history=True)

    async def never() -> str | None:
        return None

    waiting = Waiting(stream)
    gen = sse.update_frames(waiting, heartbeat_seconds=3600, retry_ms=1, closed_status=never, poll_seconds=3600)
    first = await backend.append(run_id, {})
    assert f"id: {first}".encode() in await anext(gen)
    waiting.waiting.clear()
    task = asyncio.create_task(first_frame(gen))
    await waiting.waiting.wait()  # the generator waits inside stream.next for the next update
    assert backend.hub.subscriber_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.hub.subscriber_count == 0 and backend.hub.feed_count == 0  # released at once


async def test_a_slow_subscriber_is_dropped_and_resumes_without_loss(services: Services) -> None:
    async with updates_backend(services.redis_url, queue_size=5) as backend:
        run_id = new_run()
        stream = await backend.open_stream(run_id, after_id=None, since_ms=None, skip_history=True)
        posted = await post_many(backend, run_id, 20, concurrency=1)
        await until(lambda: stream._subscription.closed)  # the hub gave up on it
        with pytest.raises(StopAsyncIteration):
            async with asyncio.timeout(DEADLINE):
                while True:
                    await stream.next(1.0)
        await stream.aclose()
        assert backend.hub.subscriber_count == 0
        resumed = await backend.open_stream(run_id, after_id=None, since_ms=0, skip_history=True)
        try:
            assert ids(await take(resumed, 20)) == posted
        finally:
            await resumed.aclose()


# -- Redis unavailable -----------------------------------------------------------------------------


async def test_unreachable_redis_is_backend_unavailable() -> None:
    url = f"redis://127.0.0.1:{stack.free_port()}/0"  # nothing listens there
    async with updates_backend(url, settings=Settings(backend_timeout_seconds=2)) as backend:
        calls: list[Callable[[], Awaitable[Any]]] = [
            backend.ping,
            lambda: backend.append(new_run(), {}),
            lambda: backend.read_since(new_run(), 0),
            lambda: backend.open_stream(new_run(), after_id=None, since_ms=None, skip_history=False),
        ]
        for make_call in calls:
            with pytest.raises(BackendUnavailable):
                await make_call()
        assert backend.hub.subscriber_count == 0 and backend.hub.feed_count == 0


async def test_open_streams_survive_a_redis_restart(tmp_path: Path) -> None:
    port = stack.free_port()
    redis_child = stack.start_redis(tmp_path, port=port)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        async with updates_backend(url, settings=Settings(backend_timeout_seconds=2)) as backend:
            run_id = new_run()
            before = await backend.append(run_id, {"message": "before"})
            stream = await backend.open_stream(run_id, after_id=None, since_ms=None, skip_history=False)
            assert ids(await take(stream, 1)) == [before]
            await until(lambda: backend.hub.connected)

            redis_child.stop()
            with pytest.raises(BackendUnavailable):
                await backend.append(run_id, {"message": "lost: Redis is down"})
            await until(lambda: not backend.hub.connected)
            assert await stream.next(0.0) is None  # still open, nothing to send

            redis_child = stack.start_redis(tmp_path, port=port)  # same data directory (AOF)
            after = await backend.append(run_id, {"message": "after"})
            assert ids(await take(stream, 1)) == [after]
            await stream.aclose()
            # The stored log survived the restart too.
            assert [m["message"] for m in orjson.loads(await backend.read_since(run_id, 0))] == ["before", "after"]
    finally:
        redis_child.stop()


async def test_cursors_at_the_edges_of_the_id_space(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    posted = await post_many(backend, run_id, 3)
    max_id = 2**64 - 1
    from_start = [await open_stream(backend, run_id, since_ms=-5), await open_stream(backend, run_id, after_id="0-0")]
    past_the_end = [
        await open_stream(backend, run_id, since_ms=max_id),
        await open_stream(backend, run_id, after_id=f"{max_id}-{max_id}"),
    ]
    try:
        for stream in from_start:
            assert ids(await take(stream, 3)) == posted
        for stream in past_the_end:
            assert await stream.next(0.0) is None
    finally:
        for stream in [*from_start, *past_the_end]:
            await stream.aclose()
    for bad in [f"{max_id + 1}-0", "12-ab", "-1"]:
        with pytest.raises(InvalidInput):
            await open_stream(backend, run_id, after_id=bad)
    assert backend.hub.subscriber_count == 0
