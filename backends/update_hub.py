"""The per-process fan-out of run updates: ONE Redis reader feeds every open stream.

A stream subscribes to its run's Redis Stream key here; the hub keeps one *feed* per key that has
subscribers, and a single task (`UpdateHub._read_forever`) runs `XREAD BLOCK` over all of those
keys at once, on its own connection, from each feed's position (the id of the last entry it has
delivered). Every entry it reads is put into each subscriber's bounded queue, then the feed's
position moves past it, both without yielding to the event loop, so a subscriber registered at any
moment receives every entry after the feed's position at that moment. Subscribers of one run share
the read; a thousand streams need one reader connection, not a thousand.

Gap-free hand-over from history to live is the caller's part (see `backends.redis_updates`):
subscribe first, then read the stored entries with XRANGE, then take the queue, skipping ids already
sent. Because a feed's position never passes what is stored, the queue starts at or before the end
of that history read, so nothing falls between the two; duplicates are dropped by comparing ids.

A subscriber whose queue overflows (its client reads slower than updates arrive: more than
`queue_size` entries or `queue_bytes` bytes wait) is dropped: its queue is freed and its stream
ends, and the client resumes with `Last-Event-ID`, losing nothing unless the run's bounds trimmed
what it missed (then it is told: `truncated`). When Redis goes away the reader reconnects with
backoff and continues every feed from its position, so open streams simply continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from core.errors import BackendUnavailable
from core.metrics import backend_call_done
from core.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

StreamId = tuple[int, int]
# One stream entry as the hub reads it, `(id, stored JSON)`: one tuple per entry, shared by every
# subscriber of its run, so that the layers above can tell by identity that two streams send the
# same entry (and encode its frame once).
Entry = tuple[StreamId, bytes]
# Takes an entry straight from the hub, synchronously; False: not now (see `Subscription._deliver`).
EntrySink = Callable[[Entry], bool]
MAX_SEQ = 2**64 - 1
# Redis error replies that mean "the server cannot serve this now", not "the command was wrong".
# On a cluster, MOVED and ASK reach this only once the slot's new owner could not be followed either
# (the callers follow them first), so they too mean "not now".
_UNAVAILABLE_REPLIES = frozenset(
    {"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK"}
)
_SCRIPT_REPLY_CODE = re.compile(r": -([A-Z]+) ")
# A full Redis frees memory only when keys expire or an operator acts: no point retrying at once.
FULL_RETRY_AFTER = 30
FULL_MESSAGE = "The update store is full: the update was not stored. Retry later."
UNAVAILABLE_MESSAGE = "The update store (Redis) is unavailable. Retry later."


def parse_id(raw: bytes | str) -> StreamId:
    """`b"1700000000000-0"` → `(1700000000000, 0)`: ids compare as tuples, never as strings."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def entry_data(fields: Any, field: bytes = b"u") -> bytes:
    """The stored JSON of one stream entry (`fields` as redis-py parses it)."""
    data = fields.get(field) if isinstance(fields, dict) else None
    return data if isinstance(data, bytes) else b"null"


def range_entries(raw: Any, field: bytes = b"u") -> list[Entry]:
    """`(id, stored JSON)` pairs of an XRANGE/XREVRANGE answer (or of one key of an XREAD answer)."""
    return [(parse_id(raw_id), entry_data(fields, field)) for raw_id, fields in raw or () if raw_id is not None]


def reply_code(exc: BaseException) -> str | None:
    """The code of a Redis error reply (`OOM`, `READONLY`, ...), wherever redis-py left it: for a
    command of a script on Redis 6, after `-` inside the script's `ERR` (`Error running script ...:
    @user_script:24: -OOM command not allowed ...`); else in `status_code` for the codes redis-py
    knows (it strips them from the text), at the start of the text for the others."""
    if not isinstance(exc, redis_errors.ResponseError):
        return None
    text = str(exc)
    if text.startswith("Error running script"):
        match = _SCRIPT_REPLY_CODE.search(text)
        return match[1] if match else exc.status_code
    return exc.status_code or text.split(" ", 1)[0]


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` means Redis could not be reached or could not serve (→ 503), not a bug."""
    # InvalidResponse: a reply cut short by a server that died mid-answer.
    # SlotNotCoveredError, ClusterError: a cluster client that found no node for a slot (the
    # cluster is reconfiguring, or down) or gave up following redirections.
    if isinstance(
        exc,
        redis_errors.ConnectionError
        | redis_errors.TimeoutError
        | redis_errors.InvalidResponse
        | redis_errors.SlotNotCoveredError
        | redis_errors.ClusterError
        | TimeoutError
        | OSError,
    ):
        return True
    if isinstance(exc, RuntimeError):
        # uvloop: a connection Redis closed between connect and its first command (Redis dying
        # under load) fails the write with this RuntimeError, which redis-py does not wrap.
        return "unable to perform operation on" in str(exc) and "closed" in str(exc)
    return reply_code(exc) in _UNAVAILABLE_REPLIES


class _Throttled:
    """Logs one warning per kind of failure at most every `every` seconds: a Redis that is down
    fails every request, and the access log already has one line per request."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._every) < self._every:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        suffix = f" ({skipped} more since the last such warning)" if skipped else ""
        logger.warning(message + suffix, *args)


_failures = _Throttled(every=10.0)


def as_unavailable(exc: BaseException) -> BackendUnavailable:
    """The client-facing error of a Redis failure; Redis' own text goes to the log only."""
    code = reply_code(exc)
    if code == "OOM":
        _failures.warning("full", "Redis refused a write: maxmemory reached (%s)", exc)
        return BackendUnavailable(FULL_MESSAGE, retry_after=FULL_RETRY_AFTER, backend="redis-full")
    _failures.warning("down", "Redis call failed: %s", exc or type(exc).__name__)
    return BackendUnavailable(UNAVAILABLE_MESSAGE, backend="redis")


async def call(awaitable: Awaitable[T], name: str = "call") -> T:
    """Await one Redis call; unreachable or unserving Redis → `BackendUnavailable`. `name` labels
    the call in the metrics (`core.metrics.backend_call_done`): a short literal per call site.

    Its deadline is the request pool's (`request_pool`): redis-py bounds every phase of a call with
    it (waiting for a free connection, connecting, writing, reading), so a timer of our own around
    each call would only cost (5% of the CPU of a post, measured)."""
    started = time.perf_counter()
    try:
        result = await awaitable
    except (redis_errors.RedisError, TimeoutError, OSError, RuntimeError) as exc:
        backend_call_done("redis", name, started, failed=True)
        if unavailable(exc):
            raise as_unavailable(exc) from exc
        raise
    backend_call_done("redis", name, started, failed=False)
    return result


class Subscription:
    """One stream's view of a feed: a queue of `(id, data)` the hub fills, bounded in entries and
    in bytes (it always takes one entry, whatever its size).

    `max_bytes` defaults to the bytes a run keeps by default (`Settings.max_update_bytes_per_run`);
    the hub passes the configured value.

    A waiting `get` sleeps on a future the hub resolves; its deadline is kept by one timer per
    subscription that is re-armed only when it would fire after the wanted deadline (an early wake
    just waits again), so a delivery costs no timer of its own."""

    __slots__ = (
        "_bytes",
        "_max_bytes",
        "_maxsize",
        "_queue",
        "_sink",
        "_sink_failed",
        "_timer",
        "_timer_at",
        "_waiter",
        "closed_reason",
        "key",
    )

    def __init__(self, key: str, maxsize: int, max_bytes: int = Settings.max_update_bytes_per_run) -> None:
        self.key = key
        self.closed_reason: str | None = None
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0  # of the queued entries' data
        # Made at the first entry queued: with direct delivery (the sink) most streams never queue
        # one, and an empty deque costs 760 bytes a stream.
        self._queue: deque[Entry] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: EntrySink | None = None  # set only while `get` waits on an empty queue
        self._sink_failed = False  # a sink that raised is never offered anything again
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _deliver(self, entry: Entry) -> bool:
        """Called by the hub with an entry it shares among subscribers; False when the queue is
        full (the hub then drops this subscriber).

        While `get` waits on an empty queue with a sink, the entry goes to the sink: the waiting
        consumer is not woken, and nothing is queued. A sink that cannot take it now (its client's
        connection is paused, say) or fails gives it back: it is queued and the consumer woken, and
        the sink is not offered anything more until the consumer waits again, so entries keep
        their order."""
        sink = self._sink
        if sink is not None and not self._queue:
            try:
                if sink(entry):
                    return True
            except Exception:
                logger.exception("an update stream's sink failed; the stream goes on without it")
                self._sink_failed = True
            self._sink = None
        data = entry[1]
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= self._maxsize or (queue and self._bytes + len(data) > self._max_bytes):
            return False
        queue.append(entry)
        self._bytes += len(data)
        self._wake()
        return True

    def _close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._queue = None  # free the memory now; the client resumes from what it received
        self._bytes = 0
        self._sink = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    async def get(self, wait_seconds: float, sink: EntrySink | None = None) -> Entry | None:
        """The next entry; None after `wait_seconds` without one. Raises `StopAsyncIteration` once
        the hub dropped this subscriber (queue overflow, hub closed). While it waits, entries go to
        `sink` if one is given (see `_deliver`), and only what the sink gave back is returned."""
        if not self._queue and self.closed_reason is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(wait_seconds, 0.0)
            self._sink = None if self._sink_failed else sink
            try:
                while True:
                    if self._timer is None or self._timer_at > deadline:
                        if self._timer is not None:
                            self._timer.cancel()
                        self._timer = loop.call_at(deadline, self._on_timer)
                        self._timer_at = deadline
                    waiter = self._waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        self._waiter = None
                    if self._queue or self.closed_reason is not None or loop.time() >= deadline:
                        break
            finally:
                self._sink = None
        if self.closed_reason is not None:
            raise StopAsyncIteration(self.closed_reason)
        if self._queue:
            item = self._queue.popleft()
            self._bytes -= len(item[1])
            return item
        return None


class Hub(Protocol):
    """What a stream needs of the fan-out: `UpdateHub` on one server, and on a cluster
    `backends.redis_cluster.ClusterUpdateHub` (one `UpdateHub` per hash-tag group)."""

    @property
    def connected(self) -> bool: ...

    @property
    def subscriber_count(self) -> int: ...

    @property
    def feed_count(self) -> int: ...

    async def subscribe(self, key: str) -> Subscription: ...

    def unsubscribe(self, sub: Subscription) -> None: ...

    async def close(self) -> None: ...


def _bulk(value: bytes) -> bytes:
    """One argument of a command in Redis' protocol (RESP): its length, then its bytes."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Feed:
    """The hub's state for one key: where its reads continue, and who receives them; and its two
    arguments of the hub's `XREAD`, packed once (the key) and at each move (the position)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.key_arg = _bulk(key.encode())
        self._position: StreamId | None = None  # None while the creator resolves the current last id
        self.position_arg = b""
        self.ready = asyncio.Event()
        self.subscribers: set[Subscription] = set()

    @property
    def position(self) -> StreamId | None:
        return self._position

    @position.setter
    def position(self, value: StreamId) -> None:
        self._position = value
        self.position_arg = _bulk(format_id(value).encode())


class UpdateHub:
    """One `XREAD BLOCK` reader per process over every key that has subscribers.

    `reader` must be a client of its own (single connection, socket timeout above `block_ms`): the
    reader task is its only user. `commands` is the shared pool, used to resolve a new feed's
    starting id and to wake the reader (`CLIENT UNBLOCK`) when the set of keys grows. A subscriber
    whose undelivered entries pass `queue_size` entries or `queue_bytes` bytes is dropped (it
    resumes from Redis); the backend passes the run's own stored bound, `max_update_bytes_per_run`,
    as `queue_bytes`."""

    def __init__(
        self,
        reader: Redis,
        commands: Redis,
        *,
        timeout: float,
        queue_bytes: int,
        block_ms: int = 1000,
        queue_size: int = 1000,
        read_count: int = 500,
        field: bytes = b"u",
    ) -> None:
        self._reader = reader
        self._commands = commands
        self._timeout = timeout
        self._block_ms = block_ms
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._read_count = read_count
        self._field = field
        self._feeds: dict[str, _Feed] = {}
        # `XREAD COUNT c BLOCK b STREAMS`, packed once: the keys and positions follow (`_xread`).
        self._xread_options = b"".join(
            _bulk(arg) for arg in (b"XREAD", b"COUNT", b"%d" % read_count, b"BLOCK", b"%d" % block_ms, b"STREAMS")
        )
        self._wakeup = asyncio.Event()  # set when feeds become readable, or on close
        self._reader_id: int | None = None  # CLIENT ID of the reader's connection, for CLIENT UNBLOCK
        self._wake_sent = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._closing = asyncio.Event()
        self.connected = False  # whether the reader's last call succeeded (for diagnostics and tests)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._read_forever(), name="update-hub-reader")

    async def close(self) -> None:
        """Stop the reader, end every subscription (their streams end) and close the connection."""
        self._closed = True
        self._closing.set()
        self._wakeup.set()
        task, self._task = self._task, None
        while task is not None and not task.done():
            # redis-py on Python 3.11 can swallow a cancellation (its `asyncio.wait_for` around
            # socket writes); the reader also checks `_closed` after every read, so ask again.
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled() and task.exception() is not None:
            logger.error("update hub reader ended with an error", exc_info=task.exception())
        for feed in list(self._feeds.values()):
            for sub in feed.subscribers:
                sub._close("hub closed")
            feed.ready.set()
        self._feeds.clear()
        await self._reader.aclose()

    # -- subscriptions ---------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return sum(len(feed.subscribers) for feed in self._feeds.values())

    @property
    def feed_count(self) -> int:
        return len(self._feeds)

    async def subscribe(self, key: str) -> Subscription:
        """Register a subscriber to `key`; from now on it receives every entry after the feed's
        position, which is never past what is stored. Raises `BackendUnavailable`."""
        if self._closed:
            raise BackendUnavailable("the update stream hub is shutting down", backend="server")
        self.start()
        sub = Subscription(key, self._queue_size, self._queue_bytes)
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    feed = self._feeds.get(key)
                    if feed is not None and not feed.ready.is_set():
                        await feed.ready.wait()  # another subscriber is resolving it; re-check
                        continue
                    if self._closed:
                        raise BackendUnavailable("the update stream hub is shutting down", backend="server")
                    if feed is not None:
                        feed.subscribers.add(sub)
                        return sub
                    await self._create_feed(key, sub)
                    if sub.closed:  # the hub closed meanwhile
                        raise BackendUnavailable("the update stream hub is shutting down", backend="server")
                    break
                await self._wake()
        except BaseException as exc:
            self.unsubscribe(sub)
            if isinstance(exc, TimeoutError):
                raise BackendUnavailable("Redis did not answer in time", backend="redis") from exc
            raise
        return sub

    async def _create_feed(self, key: str, sub: Subscription) -> None:
        """Start reading `key` from its current last entry, with `sub` as the first subscriber
        (registered in the same step as the feed becomes ready, so no unsubscribe can drop the
        feed in between)."""
        feed = _Feed(key)
        self._feeds[key] = feed
        try:
            last = await call(self._commands.xrevrange(key, "+", "-", count=1), "xrevrange")
        except BaseException:
            # Waiters re-check and one of them tries again (or they time out).
            if self._feeds.get(key) is feed:
                del self._feeds[key]
            feed.ready.set()
            raise
        newest = range_entries(last)
        feed.position = newest[0][0] if newest else (0, 0)
        if self._feeds.get(key) is feed:
            feed.subscribers.add(sub)
        else:
            sub._close("hub closed")
        feed.ready.set()
        self._wakeup.set()

    def unsubscribe(self, sub: Subscription) -> None:
        """Release at once (synchronous: safe in a cancelled generator's `finally`). Idempotent."""
        sub._close("unsubscribed")
        feed = self._feeds.get(sub.key)
        if feed is None or sub not in feed.subscribers:
            return
        feed.subscribers.discard(sub)
        if not feed.subscribers:
            del self._feeds[sub.key]

    async def _wake(self) -> None:
        """Make the reader re-issue XREAD with the new key now instead of after its block timeout.
        Best effort: if it is not blocked yet, it will see the key anyway."""
        if self._reader_id is None or self._wake_sent:
            return
        self._wake_sent = True
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError, BackendUnavailable):
            await call(self._commands.client_unblock(self._reader_id), "client_unblock")

    # -- the reader ------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = 0.1
        while not self._closed:
            try:
                await self._read_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis restarting or unreachable: keep every feed and its position, retry with
                # backoff; open streams go on (heartbeats) and continue where they were.
                self.connected = False
                self._reader_id = None
                if not unavailable(exc):
                    logger.exception("update hub reader failed; retrying")
                else:
                    logger.warning("update hub lost Redis (%s); retrying in %.1fs", exc, backoff)
                with contextlib.suppress(Exception):
                    await self._recover(exc)
                with contextlib.suppress(TimeoutError):  # back off before reconnecting; close() ends it
                    async with asyncio.timeout(backoff):
                        await self._closing.wait()
                backoff = min(backoff * 2, 5.0)

    async def _recover(self, exc: Exception) -> None:
        """After a failed read, before the next attempt: drop the reader's connection (it is
        re-made on the next call). A cluster's group hub also follows its slot's owner here."""
        del exc
        await self._reader.connection_pool.disconnect()

    async def _read_once(self) -> None:
        if not self._feeds:
            await self._wait_for_feeds()
            return
        if self._reader_id is None:
            self._reader_id = int(await self._reader.client_id())
        self._wake_sent = False
        feeds = [feed for feed in self._feeds.values() if feed.position is not None]
        if not feeds:
            await self._wait_for_feeds()
            return
        started = time.perf_counter()
        try:
            response = await self._xread(feeds)
        except Exception:
            backend_call_done("redis", "xread", started, failed=True)
            raise
        backend_call_done("redis", "xread", started, failed=False)
        self.connected = True
        self._dispatch(response)

    async def _xread(self, feeds: list[_Feed]) -> Any:
        """`XREAD BLOCK` from every feed's position, as redis-py's `xread` answers it. The command
        is packed here, from each feed's packed arguments: redis-py packs a command by growing one
        buffer argument by argument, which for a thousand feeds (two thousand arguments) costs
        about 5 ms of CPU at every read, most of a core at 200 posts a second; joining the packed
        arguments costs 40 µs. The reader's connection is the hub's alone (see the class)."""
        reader = self._reader
        await reader.initialize()
        connection = reader.connection
        assert connection is not None  # a single-connection client has made it in `initialize`
        head = b"*%d\r\n" % (6 + 2 * len(feeds))
        await connection.send_packed_command(
            b"".join([head, self._xread_options, *[f.key_arg for f in feeds], *[f.position_arg for f in feeds]])
        )
        return reader.response_callbacks["XREAD"](await connection.read_response())

    async def _wait_for_feeds(self) -> None:
        self._wakeup.clear()
        if not self._closed:
            await self._wakeup.wait()

    def _dispatch(self, response: Any) -> None:
        """Deliver one XREAD answer. No await in here: delivering and moving the position are one
        step for every subscriber registering concurrently."""
        for raw_key, entries in response or ():
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            feed = self._feeds.get(key)
            if feed is None or feed.position is None:
                continue
            for entry in range_entries(entries, self._field):
                stream_id = entry[0]
                if stream_id <= feed.position:
                    continue  # the feed was re-created after this read was issued
                for sub in list(feed.subscribers):
                    if not sub._deliver(entry):
                        logger.info("dropping a slow update stream of %s (queue full)", key)
                        sub._close("overflow")
                        self.unsubscribe(sub)
                feed.position = stream_id
                if not feed.subscribers:
                    break
