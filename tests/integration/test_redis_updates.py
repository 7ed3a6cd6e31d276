"""The Redis updates backend and its hub against a real Redis (the session's, or one of their own).

No sleeps stand in for synchronisation: every wait is on a condition, under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tracemalloc
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from backends.redis_updates import (
    HISTORY_PAGE,
    HISTORY_PAGE_BYTES,
    MAX_DETAILS_BYTES,
    MAX_MESSAGE_BYTES,
    TTL_SECONDS,
    RedisUpdatesBackend,
    RunUpdateStream,
    stored_bytes_key,
    stream_key,
    trim_marker_key,
)
from backends.update_hub import FULL_MESSAGE, FULL_RETRY_AFTER, UNAVAILABLE_MESSAGE, format_id, range_entries
from cli import stack
from core.errors import BackendUnavailable, InvalidInput, PayloadTooLarge
from core.protocols import LiveSink, UpdateEvent
from core.settings import Settings
from core.shutdown import ServerShutdown
from tests.support.live import Services
from web.sse.frames import update_frames
from web.sse.framing import encode_update_event, end_frame

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

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        self.waiting.set()
        return await self.stream.next(wait_seconds)

    def finish(self) -> None:
        self.stream.finish()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def first_frame(gen: AsyncGenerator[bytes, None]) -> bytes:
    """The next frame that carries an event (an opening frame of only `retry:` and comments, sent
    before anything happens, is skipped)."""
    while True:
        frame = await anext(gen)
        if any(line.startswith(b"data: ") for line in frame.split(b"\n")):
            return frame


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


async def stored(redis: Redis, run_id: str) -> list[tuple[str, bytes]]:
    """`(id, JSON)` of every entry Redis holds for the run, oldest first."""
    return [(format_id(entry_id), data) for entry_id, data in range_entries(await redis.xrange(stream_key(run_id)))]


async def check_bounds(redis: Redis, run_id: str, posted: list[str], max_bytes: int) -> list[tuple[str, bytes]]:
    """The run's log is the newest suffix of `posted` that fits `max_bytes` (one entry at least,
    whatever its size), its bytes counter is exact and its trim marker names the newest dropped."""
    entries = await stored(redis, run_id)
    kept = [entry_id for entry_id, _ in entries]
    assert kept == posted[len(posted) - len(kept) :]
    total = sum(len(data) for _, data in entries)
    assert total <= max_bytes or len(entries) == 1
    assert int(await redis.get(stored_bytes_key(run_id)) or 0) == total
    dropped = posted[: len(posted) - len(kept)]
    if dropped:
        # and no more was dropped than needed: the newest dropped one did not fit beside the kept
        assert (await redis.get(trim_marker_key(run_id))) == dropped[-1].encode()
    return entries


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
    await check_bounds(redis, run_id, posted, 8_388_608)  # the count trimmed; the bytes counter followed

    cut = messages[599]["timestamp"]
    later = orjson.loads(await backend.read_since(run_id, cut))
    assert later == messages[600:]
    assert orjson.loads(await backend.read_since(run_id, messages[-1]["timestamp"])) == []
    assert orjson.loads(await backend.read_since(run_id, 2**64 + 5)) == []
    assert orjson.loads(await backend.read_since(new_run(), 0)) == []


async def test_posts_asked_together_are_stored_in_the_order_asked(backend: RedisUpdatesBackend) -> None:
    # Asked in one turn of the loop, they reach Redis as one pipeline (`backends.redis_batch`).
    run_id = new_run()
    posted = await asyncio.gather(*(backend.append(run_id, {"message": str(i)}) for i in range(50)))
    messages = orjson.loads(await backend.read_since(run_id, 0))
    assert [m["message"] for m in messages] == [str(i) for i in range(50)]
    assert [f"{m['timestamp']}-0" for m in messages] == posted


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


async def test_stored_bytes_are_bounded_oldest_dropped_first_with_an_exact_counter(
    services: Services, redis: Redis
) -> None:
    max_bytes = 20_000
    settings = Settings(backend_timeout_seconds=5, max_update_bytes_per_run=max_bytes)
    rng = random.Random(7)
    async with updates_backend(services.redis_url, settings=settings) as backend:
        run_id = new_run()
        posted: list[str] = []
        for i in range(120):  # sizes from 100 B to 6 KB: most posts drop one or several entries
            posted.append(await backend.append(run_id, {"message": f"{i}:" + "x" * rng.randrange(100, 6000)}))
            await check_bounds(redis, run_id, posted, max_bytes)
        assert 3 < len(await stored(redis, run_id)) < 120
        assert (await redis.ttl(stored_bytes_key(run_id))) > TTL_SECONDS - 60

        # One update larger than the whole bound is still stored, alone.
        posted.append(await backend.append(run_id, {"details": "y" * 30_000}))
        entries = await check_bounds(redis, run_id, posted, max_bytes)
        assert [entry_id for entry_id, _ in entries] == posted[-1:]
        posted.append(await backend.append(run_id, {"message": "small"}))
        assert [entry_id for entry_id, _ in await check_bounds(redis, run_id, posted, max_bytes)] == posted[-1:]

        # The counter repairs itself: recounted when missing, restarted when the log is gone.
        posted += await post_many(backend, run_id, 5, concurrency=1)
        await redis.delete(stored_bytes_key(run_id))
        posted.append(await backend.append(run_id, {"message": "recounted"}))
        await check_bounds(redis, run_id, posted, max_bytes)
        await redis.delete(stream_key(run_id))
        fresh = [await backend.append(run_id, {"message": "alone"})]
        await check_bounds(redis, run_id, fresh, max_bytes)


async def test_a_stream_resuming_before_updates_the_bytes_bound_dropped_is_told_truncated(services: Services) -> None:
    settings = Settings(backend_timeout_seconds=5, max_update_bytes_per_run=10_000)
    async with updates_backend(services.redis_url, settings=settings) as backend:
        run_id = new_run()
        posted = [await backend.append(run_id, {"message": f"{i}:" + "z" * 3000}) for i in range(6)]
        kept = [m["timestamp"] for m in orjson.loads(await backend.read_since(run_id, 0))]
        assert kept and [f"{ts}-0" for ts in kept] == posted[-len(kept) :] and len(kept) < len(posted)
        newest_dropped = posted[len(posted) - len(kept) - 1]
        truncated = orjson.dumps({"reason": "truncated", "oldest_id": f"{kept[0]}-0"})
        for after_id, expect_truncated in ((posted[0], True), (newest_dropped, False)):
            stream = await open_stream(backend, run_id, after_id=after_id)
            try:
                got = await take_until(stream, posted[-1])
            finally:
                await stream.aclose()
            assert (got[0] == ("truncated", "", truncated)) is expect_truncated
            assert ids(got) == posted[-len(kept) :]


async def test_history_is_read_in_pages_bounded_in_count_and_bytes(backend: RedisUpdatesBackend) -> None:
    big, small = new_run(), new_run()
    entry = {"message": "m" * (MAX_MESSAGE_BYTES - 16), "details": "d" * (MAX_DETAILS_BYTES - 16)}
    big_ids = [await backend.append(big, entry) for _ in range(12)]
    small_ids = await post_many(backend, small, 250)
    for run_id, posted in ((big, big_ids), (small, small_ids)):
        pages, cursor, more = [], None, True
        while more:
            page = await backend.read_page(run_id, cursor)
            pages.append(page.entries)
            more = page.more
            if page.entries:
                cursor = page.entries[-1][0]
        assert [f"{ms}-{seq}" for page_entries in pages for (ms, seq), _ in page_entries] == posted
        for page_entries in pages:
            assert len(page_entries) <= HISTORY_PAGE
            assert len(page_entries) == 1 or sum(len(data) for _, data in page_entries) <= HISTORY_PAGE_BYTES
        if run_id == big:  # three ~320 KiB entries to a page, not all twelve (~3.8 MiB) at once
            assert max(len(p) for p in pages) == HISTORY_PAGE_BYTES // len(pages[0][0][1]) == 3
        else:
            assert [len(p) for p in pages][:2] == [HISTORY_PAGE, HISTORY_PAGE]


async def test_four_concurrent_replays_of_a_full_run_hold_a_page_each_not_the_run(services: Services) -> None:
    async with updates_backend(services.redis_url) as backend:  # the default bound: 8 MiB
        run_id = new_run()
        entry = {"message": "m" * (MAX_MESSAGE_BYTES - 16), "details": "d" * (MAX_DETAILS_BYTES - 16)}
        for _ in range(30):  # more than 8 MiB: the bound dropped the oldest
            await backend.append(run_id, entry)
        body = await backend.read_since(run_id, 0)
        kept = [f"{m['timestamp']}-0" for m in orjson.loads(body)]
        assert 8_000_000 < len(body) <= 8_388_608 + len(kept) + 1

        async def replay() -> list[str]:
            stream = await open_stream(backend, run_id, since_ms=0)
            got: list[str] = []
            try:
                while (event := await stream.next(0.0)) is not None:
                    encode_update_event(event)  # the frame the client would be sent
                    if event[0] == "message":  # (the first is `truncated`: the bound dropped some)
                        got.append(event[1])
            finally:
                await stream.aclose()
            return got

        tracemalloc.start()
        try:
            got = await asyncio.gather(*(replay() for _ in range(4)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert all(replayed == kept for replayed in got)
        # A page is at most 1 MiB (plus one entry): 4 readers hold a few MiB, where reading each
        # run whole would hold 4 x 8 MiB at least.
        assert peak < 16 * 2**20, peak


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


async def take_through_a_sink(stream: RunUpdateStream, count: int, refuse_every: int) -> tuple[list[UpdateEvent], int]:
    """The next `count` events, as a stream response takes them: live updates handed to its sink
    while it waits (every `refuse_every`-th one refused, as a paused connection does, and so
    returned by `next` instead), the rest returned. Also how many the sink took."""
    out: list[UpdateEvent] = []
    offered = taken = 0

    def sink(event_id: str, data: bytes) -> bool:
        nonlocal offered, taken
        offered += 1
        if offered % refuse_every == 0:
            return False
        out.append(("message", event_id, data))
        taken += 1
        return True

    async with asyncio.timeout(DEADLINE):
        while len(out) < count:
            event = await stream.next(1.0, sink)
            if event is not None:
                out.append(event)
    return out, taken


async def test_streams_taking_live_updates_through_a_sink_get_each_once_in_order(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    history = [await backend.append(run_id, {"message": f"before {i}"}) for i in range(5)]
    streams = [await open_stream(backend, run_id), await open_stream(backend, run_id, skip_history=True)]
    try:
        takers = [
            asyncio.create_task(take_through_a_sink(streams[0], 205, refuse_every=7)),
            asyncio.create_task(take_through_a_sink(streams[1], 200, refuse_every=1000)),
        ]
        posted = sorted(
            await asyncio.gather(*(backend.append(run_id, {"message": str(i)}) for i in range(200))), key=id_key
        )
        (from_start, taken_a), (live_only, taken_b) = await asyncio.gather(*takers)
        assert ids(from_start) == history + posted  # the history, then each live one once, in order
        assert ids(live_only) == posted
        assert taken_a > 0 and taken_b > 0  # the sinks were used (and the refused ones still came)
    finally:
        for stream in streams:
            await stream.aclose()


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
    gen = update_frames(
        stream,
        heartbeat_seconds=3600,
        retry_ms=3000,
        closed_status=closed_status,
        status_at_open="COMPLETED",
        shutdown=ServerShutdown(),
    )
    async with asyncio.timeout(DEADLINE):
        frames = [frame async for frame in gen]
    assert frames[-1] == end_frame("COMPLETED")
    assert frames[0].startswith(b"retry: 3000\n")
    assert sent_ids(frames) == posted[10:]
    assert backend.hub.subscriber_count == 0


async def test_run_closing_mid_stream_drains_updates_posted_just_before(backend: RedisUpdatesBackend) -> None:
    run_id = new_run()
    closed: list[str] = []

    async def closed_status() -> str | None:
        return closed[0] if closed else None

    stream = await backend.open_stream(run_id, after_id=None, since_ms=None, skip_history=True)
    gen = update_frames(
        stream, heartbeat_seconds=0.05, retry_ms=3000, closed_status=closed_status, shutdown=ServerShutdown()
    )
    first = await backend.append(run_id, {"message": "working"})
    frames = [await first_frame(gen)]
    assert f"id: {first}".encode() in frames[0]
    # The workflow's last updates land, then it closes; the hub may not have delivered them yet.
    last = await post_many(backend, run_id, 30)
    closed.append("COMPLETED")
    async with asyncio.timeout(DEADLINE):
        frames += [frame async for frame in gen]
    assert frames[-1] == end_frame("COMPLETED")
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
        shutdown = ServerShutdown()
        consumers = [
            asyncio.create_task(
                first_frame(
                    update_frames(
                        w, heartbeat_seconds=3600, retry_ms=1, closed_status=never, poll_seconds=3600, shutdown=shutdown
                    )
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
    gen = update_frames(
        waiting, heartbeat_seconds=3600, retry_ms=1, closed_status=never, poll_seconds=3600, shutdown=ServerShutdown()
    )
    first = await backend.append(run_id, {})
    assert f"id: {first}".encode() in await first_frame(gen)
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
            with pytest.raises(BackendUnavailable) as refused:
                await make_call()
            assert refused.value.message == UNAVAILABLE_MESSAGE  # never Redis' or the OS's own text
        assert backend.hub.subscriber_count == 0 and backend.hub.feed_count == 0


async def test_a_full_redis_refuses_posts_with_503_and_keeps_everything_it_answered(tmp_path: Path) -> None:
    port = stack.free_port()
    redis_child = stack.start_redis(tmp_path, port=port, maxmemory="3mb")
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    try:
        assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        async with updates_backend(url, settings=Settings(backend_timeout_seconds=5)) as backend:
            runs = [new_run() for _ in range(4)]
            answered: dict[str, list[str]] = {run_id: [] for run_id in runs}
            refused: BackendUnavailable | None = None
            for i in range(1000):  # ~60 KB each: a few MB fill it long before the end
                run_id = runs[i % len(runs)]
                try:
                    answered[run_id].append(await backend.append(run_id, {"message": f"{i}:" + "f" * 60_000}))
                except BackendUnavailable as exc:
                    refused = exc
                    break
            assert refused is not None, "Redis never refused a post"
            assert refused.message == FULL_MESSAGE and refused.retry_after == FULL_RETRY_AFTER
            assert sum(map(len, answered.values())) > 5
            # Still full: refused again, nothing stored, whether alone or several in one pipeline.
            for together in (1, 5):
                refusals = await asyncio.gather(
                    *(backend.append(runs[0], {"message": "g" * 60_000}) for _ in range(together)),
                    return_exceptions=True,
                )
                assert all(isinstance(r, BackendUnavailable) and r.message == FULL_MESSAGE for r in refusals)
            await backend.ping()  # it still serves reads
            for run_id, posted in answered.items():
                stored_ids = [f"{m['timestamp']}-0" for m in orjson.loads(await backend.read_since(run_id, 0))]
                assert stored_ids == posted  # every answered post, and not the refused ones
                stream = await open_stream(backend, run_id, since_ms=0)
                try:
                    assert ids(await take(stream, len(posted))) == posted
                finally:
                    await stream.aclose()
    finally:
        await client.aclose()
        redis_child.stop()


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
        # Beyond 64 bits the documented pattern still allows it: read as the largest cursor.
        await open_stream(backend, run_id, after_id=f"{max_id + 1}-0"),
    ]
    try:
        for stream in from_start:
            assert ids(await take(stream, 3)) == posted
        for stream in past_the_end:
            assert await stream.next(0.0) is None
    finally:
        for stream in [*from_start, *past_the_end]:
            await stream.aclose()
    for bad in ["12-ab", "-1"]:
        with pytest.raises(InvalidInput):
            await open_stream(backend, run_id, after_id=bad)
    assert backend.hub.subscriber_count == 0
