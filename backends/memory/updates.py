"""Run updates in memory: the `UpdatesBackend` of mock mode and of the unit tests.

It keeps what `backends.redis_updates` keeps, the same way: per run an ordered log of the update's
final JSON bytes, ids `ms-0` with `ms = max(now, last + 1)` (so `timestamp` is unique, increasing
and equal to the id's milliseconds), at most `max_updates` entries and `max_bytes` bytes (oldest
dropped first, never the newest), and the id of the newest entry ever dropped (a stream resumed
before it is told `truncated`). The stored JSON is written by the same encoder
(`encode_update`), so bodies, limits and refusals are the real backend's.

A stream subscribes to its run's log before it reads what is stored after its cursor, then
takes live entries, dropping ids at or before the last one returned: no gap, no duplicate, as with
Redis. A subscriber that falls more than `queue_size` entries behind is dropped (its stream ends;
the client resumes by id), as the hub drops one.

What grows is bounded as with Redis (the bounds are `backends.redis_updates`'s and
`backends.update_hub`'s, imported):

- a run's log: `MAX_UPDATES_PER_RUN` (1000) entries and MAX_UPDATE_BYTES_PER_RUN bytes, and it
  is emptied `ttl_seconds` (`TTL_SECONDS`, 90 days) after its last post, as Redis expires the
  run's keys;
- the logs: one per run asked about, and only runs that exist are (the handlers look the run up,
  `find_run`, before any update operation); no request creates a run;
- a stream: `queue_size` (1000, the hub's default) live entries, or `max_bytes` bytes of them
  (the bound the hub is given), unread, then it is dropped, as the hub's `Subscription`; the
  number of streams is the handlers' stream limits'.

Nothing here is shared between processes, and nothing survives a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from backends.redis_updates import MAX_UPDATES_PER_RUN, TTL_SECONDS, encode_update, parse_event_id
from backends.update_hub import MAX_SEQ, StreamId, format_id
from core.protocols import LiveSink, UpdateEvent

DEFAULT_MAX_BYTES = 8_388_608  # Settings.max_update_bytes_per_run's default
QUEUE_SIZE = 1000  # live entries a stream may hold unread, as the hub's queue


class RunLog:
    """One run's stored updates and the streams subscribed to it."""

    def __init__(self) -> None:
        self.entries: deque[tuple[StreamId, bytes]] = deque()
        self.stored_bytes = 0
        self.trimmed: StreamId | None = None  # the newest id ever dropped
        self.subscribers: set[MemoryUpdateStream] = set()
        self.expires_ms: int | None = None  # when what is stored expires (set by each post)

    def expire(self, now_ms: int) -> None:
        """Empty the log once its time has passed, as Redis drops the run's keys (streams open on
        it stay subscribed, as a Redis reader outlives the key it waits on)."""
        if self.expires_ms is not None and now_ms >= self.expires_ms:
            self.entries.clear()
            self.stored_bytes = 0
            self.trimmed = None
            self.expires_ms = None

    def after(self, cursor: StreamId | None) -> list[tuple[StreamId, bytes]]:
        return [entry for entry in self.entries if cursor is None or entry[0] > cursor]


class MemoryUpdates:
    """`core.protocols.UpdatesBackend` in this process's memory."""

    def __init__(
        self,
        *,
        max_updates: int = MAX_UPDATES_PER_RUN,
        max_bytes: int = DEFAULT_MAX_BYTES,
        queue_size: int = QUEUE_SIZE,
        ttl_seconds: int = TTL_SECONDS,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._logs: dict[str, RunLog] = {}
        self._max_updates = max_updates
        self._max_bytes = max_bytes
        self._queue_size = queue_size
        self._ttl_ms = ttl_seconds * 1000
        self._clock_ms = clock_ms

    def log(self, run_id: str) -> RunLog:
        log = self._logs.get(run_id)
        if log is None:
            log = self._logs[run_id] = RunLog()
        log.expire(self._clock_ms())
        return log

    def _stored(self, run_id: str) -> RunLog | None:
        """The run's log as it stands now (expired entries gone), or None when it has none."""
        log = self._logs.get(run_id)
        if log is not None:
            log.expire(self._clock_ms())
        return log

    def stored_updates(self, run_id: str) -> list[bytes]:
        """The JSON of every update stored for the run, oldest first."""
        log = self._stored(run_id)
        return [] if log is None else [data for _, data in log.entries]

    def store(self, run_id: str, data: bytes, *, at_ms: int | None = None) -> str:
        """Store one update's final JSON after its `{"timestamp":<ms>` (as `encode_update` writes
        it), at `at_ms` or now (later than the run's last entry either way); its id."""
        log = self.log(run_id)
        ms = self._clock_ms() if at_ms is None else at_ms
        if log.entries:
            ms = max(ms, log.entries[-1][0][0] + 1)
        entry_id: StreamId = (ms, 0)
        entry = b'{"timestamp":%d' % ms + data
        log.entries.append((entry_id, entry))
        log.stored_bytes += len(entry)
        log.expires_ms = self._clock_ms() + self._ttl_ms  # each post renews the run's keys' TTL
        while len(log.entries) > 1 and (len(log.entries) > self._max_updates or log.stored_bytes > self._max_bytes):
            dropped_id, dropped = log.entries.popleft()
            log.stored_bytes -= len(dropped)
            log.trimmed = dropped_id
        for stream in list(log.subscribers):
            stream.deliver(entry_id, entry)
        return format_id(entry_id)

    # -- UpdatesBackend ----------------------------------------------------------------------

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        return self.store(run_id, encode_update(run_id, update))

    async def read_since(self, run_id: str, since_ms: int) -> bytes:
        log = self._stored(run_id)
        if log is None:
            return b"[]"
        return b"[" + b",".join(data for (ms, _), data in log.entries if ms > since_ms) + b"]"

    async def open_stream(
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> MemoryUpdateStream:
        cursor: StreamId | None = None
        if after_id is not None:
            cursor = parse_event_id(after_id)
        elif since_ms is not None:
            cursor = (min(max(since_ms, 0), MAX_SEQ), MAX_SEQ)  # after every id of that millisecond
        log = self.log(run_id)
        if cursor is None and skip_history:
            cursor = log.entries[-1][0] if log.entries else (0, 0)
        return MemoryUpdateStream(log, cursor, queue_size=self._queue_size, queue_bytes=self._max_bytes)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        for log in self._logs.values():
            for stream in list(log.subscribers):
                stream.drop()


class MemoryUpdateStream:
    """One open stream of a run's updates (`core.protocols.UpdateStream`)."""

    def __init__(
        self, log: RunLog, cursor: StreamId | None, *, queue_size: int, queue_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self._log = log
        self._cursor = cursor  # the last id returned (or skipped past); None: from the oldest
        self._pending: deque[UpdateEvent] = deque()
        self._live: deque[tuple[StreamId, bytes]] = deque()
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._live_bytes = 0  # of the live entries' data
        self._waiter: asyncio.Future[None] | None = None
        self._draining = False
        self._ended = False
        log.subscribers.add(self)  # before the history read: nothing posted meanwhile is missed
        self._load_stored()

    def _load_stored(self) -> None:
        page = self._log.after(self._cursor)
        marker = self._log.trimmed
        if page and self._cursor is not None and marker is not None and marker > self._cursor:
            oldest = format_id(page[0][0])
            self._pending.append(("truncated", "", orjson.dumps({"reason": "truncated", "oldest_id": oldest})))
        for entry_id, data in page:
            self._pending.append(("message", format_id(entry_id), data))
            self._cursor = entry_id

    def deliver(self, entry_id: StreamId, data: bytes) -> None:
        """A live entry of the run (called by the backend as it stores one)."""
        if len(self._live) >= self._queue_size or (self._live and self._live_bytes + len(data) > self._queue_bytes):
            self.drop()  # too far behind: the client resumes by id, as when the hub drops it
            return
        self._live.append((entry_id, data))
        self._live_bytes += len(data)
        self._wake()

    def drop(self) -> None:
        self._log.subscribers.discard(self)
        self._live.clear()
        self._live_bytes = 0
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Thread-safe: a test may store from outside the loop that serves the stream.
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        del sink  # in memory, every update is returned: nothing to save by handing it over
        while True:
            if self._pending:
                return self._pending.popleft()
            while self._live:
                entry_id, data = self._live.popleft()
                self._live_bytes -= len(data)
                if self._cursor is not None and entry_id <= self._cursor:
                    continue  # already returned from the stored ones
                self._cursor = entry_id
                return ("message", format_id(entry_id), data)
            if self._ended:
                raise StopAsyncIteration("end of the stored updates")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(max(wait_seconds, 0.0)):
                    await self._waiter
            except TimeoutError:
                return None
            finally:
                self._waiter = None

    def finish(self) -> None:
        if self._draining:
            return
        self._draining = True
        self._log.subscribers.discard(self)
        self._live.clear()
        self._live_bytes = 0
        self._load_stored()  # what is stored after the last id returned, then the end
        self._ended = True
        self._wake()

    async def aclose(self) -> None:
        self._log.subscribers.discard(self)
        self._pending.clear()
        self._live.clear()
        self._live_bytes = 0
        self._ended = True


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
