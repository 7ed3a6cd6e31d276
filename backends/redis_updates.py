"""Run updates on Redis: a bounded, ordered, resumable log per run (DESIGN.md, decision 4).

Storage
    One Redis Stream per run, `wfr:updates:<run_id>`. Each entry has one field, `u`, holding the
    final JSON bytes of the update exactly as clients receive it, so reading never decodes and
    re-encodes. A post runs one Lua script, atomic like every script, so no reader ever sees half of
    it: it stamps the time, appends with `XADD ... MAXLEN 1000` (exact, oldest dropped first), and
    sets the key's TTL to 90 days. Redis 6.2 has no `XADD key <ms>-*`, so the script picks the id
    itself: `ts = max(now_ms, last_ms + 1)`, id `ts-0`, and writes `{"timestamp":ts` in front of the
    rest of the JSON that Python serialised. Timestamps are therefore unique and increasing within a
    run and equal to the entry id's milliseconds, which makes `since` (epoch ms) exact: resuming
    with `since` = the last timestamp seen loses nothing, even for updates posted in the same
    millisecond (a burst of more than 1000 posts a second runs ahead of the clock until it ends).

    When a post trims an entry, the script records the id of the newest entry ever trimmed in
    `wfr:updates-trimmed:<run_id>` (same TTL). A stream resumed from a cursor older than that id has
    really lost updates and is told so (`truncated`); one whose cursor is older than the oldest kept
    entry but not older than the marker has lost nothing and is not.

Streams
    `open_stream` subscribes to the process's `UpdateHub` first, then reads what is stored after the
    cursor page by page (XRANGE, with the trim marker in the same MULTI so the truncation check sees
    one snapshot), then continues with the hub's live entries, dropping ids at or before the last
    one returned. See `backends.update_hub` for why this has neither gap nor duplicate.

Failures
    Every call has a deadline (`backend_timeout_seconds`, kept by the connection pool); a Redis
    that cannot be reached or cannot serve raises `BackendUnavailable` (503 with Retry-After). Posts
    are never retried by the client library, so a post is stored at most once.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from backends.errors import InvalidInput, PayloadTooLarge
from backends.protocol import UpdateEvent
from backends.update_hub import (
    MAX_SEQ,
    StreamId,
    Subscription,
    UpdateHub,
    call,
    entry_data,
    format_id,
    parse_id,
    range_entries,
)
from server.settings import Settings

MAX_UPDATES_PER_RUN = 1000
TTL_SECONDS = 90 * 24 * 3600
MAX_MESSAGE_BYTES = 65_536  # UTF-8 bytes of `message`
MAX_DETAILS_BYTES = 262_144  # bytes of `details` serialised as JSON
DEFAULT_TYPE = "UPDATE"
FIELD = b"u"
HISTORY_PAGE = 100

_STREAM_ID = re.compile(r"\A(\d{1,20})(?:-(\d{1,20}))?\Z")

# KEYS[1] the run's stream, KEYS[2] its trim marker.
# ARGV[1] the update's JSON after the timestamp (`,"workflow_run_id":...}`), ARGV[2] max length,
# ARGV[3] TTL in seconds. Returns the new entry's id.
_APPEND = """
local key, marker = KEYS[1], KEYS[2]
local maxlen, ttl = tonumber(ARGV[2]), ARGV[3]
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if last[1] then
  local last_id = last[1][1]
  local last_ms = tonumber(string.sub(last_id, 1, string.find(last_id, '-', 1, true) - 1))
  if last_ms >= ts then ts = last_ms + 1 end
end
local overflow = redis.call('XLEN', key) + 1 - maxlen
if overflow > 0 then
  local doomed = redis.call('XRANGE', key, '-', '+', 'COUNT', overflow)
  redis.call('SET', marker, doomed[#doomed][1])
end
local ts_text = string.format('%d', ts)
local id = ts_text .. '-0'
redis.call('XADD', key, 'MAXLEN', maxlen, id, 'u', '{"timestamp":' .. ts_text .. ARGV[1])
redis.call('EXPIRE', key, ttl)
redis.call('EXPIRE', marker, ttl)
return id
"""


def stream_key(run_id: str) -> str:
    return f"wfr:updates:{run_id}"


def trim_marker_key(run_id: str) -> str:
    # A different prefix, so no run id can make one key name equal another.
    return f"wfr:updates-trimmed:{run_id}"


def parse_event_id(text: str) -> StreamId:
    """A client's `Last-Event-ID` (`ms-seq`, or bare `ms`); `InvalidInput` when it is not one."""
    match = _STREAM_ID.match(text.strip())
    if match is None or int(match[1]) > MAX_SEQ or int(match[2] or 0) > MAX_SEQ:
        raise InvalidInput("Last-Event-ID must be an update id such as 1678886400000-0.")
    return int(match[1]), int(match[2] or 0)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    # Integers beyond 64 bits, lone surrogates: valid JSON that orjson refuses.
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"The update cannot be stored as JSON: {exc}") from exc


def encode_update(run_id: str, update: dict[str, Any]) -> bytes:
    """The stored JSON after `{"timestamp":<ts>`, in the seed's field order, with its defaults.
    Raises `PayloadTooLarge` beyond the documented limits, `InvalidInput` for wrong types."""
    kind = update.get("type")
    kind = DEFAULT_TYPE if kind is None else kind
    message = update.get("message")
    message = kind if message is None else message
    workstream = update.get("workstream_id")
    if not isinstance(kind, str) or not isinstance(message, str):
        raise InvalidInput("`type` and `message` must be strings.")
    if workstream is not None and not isinstance(workstream, str):
        raise InvalidInput("`workstream_id` must be a string.")
    if len(message.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise PayloadTooLarge(f"`message` is larger than {MAX_MESSAGE_BYTES} bytes (UTF-8).")
    parts = [b',"workflow_run_id":', _dumps(run_id), b',"type":', _dumps(kind), b',"message":', _dumps(message)]
    if "details" in update:
        details = _dumps(update["details"])
        if len(details) > MAX_DETAILS_BYTES:
            raise PayloadTooLarge(f"`details` is larger than {MAX_DETAILS_BYTES} bytes once serialised as JSON.")
        parts += [b',"details":', details]
    if workstream is not None:
        parts += [b',"workstream_id":', _dumps(workstream)]
    parts.append(b"}")
    return b"".join(parts)


# redis-py 8 turns "maintenance notifications" on by default (RESP3), and with them on its pool
# skips the check that drops a pooled connection the server has closed: after a Redis restart every
# idle connection would fail one request with 503. Off: the pool reconnects them, and our own
# timeouts are never "relaxed" by a maintenance notice either.
NO_MAINTENANCE = MaintNotificationsConfig(enabled=False)


def request_pool(url: str, max_connections: int, timeout: float, client_name: str) -> BlockingConnectionPool:
    """The pool requests use: bounded (a request waits up to `timeout` for a free connection),
    every call bounded by `timeout`, and no retries (a retried post could be stored twice)."""
    return BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        client_name=client_name,
        maint_notifications_config=NO_MAINTENANCE,
    )


class RedisUpdatesBackend:
    """`UpdatesBackend` on Redis Streams; build it with `await RedisUpdatesBackend.from_url(...)`."""

    def __init__(
        self,
        client: Redis,
        hub: UpdateHub,
        *,
        max_updates: int = MAX_UPDATES_PER_RUN,
        ttl_seconds: int = TTL_SECONDS,
    ) -> None:
        self._client = client
        self.hub = hub
        self._max_updates = max_updates
        self._ttl_seconds = ttl_seconds
        self._append_script = client.register_script(_APPEND)

    @classmethod
    async def from_url(
        cls,
        url: str,
        settings: Settings,
        *,
        max_connections: int = 32,
        hub_block_ms: int = 1000,
        queue_size: int = 1000,
        client_name: str = "wfr-updates",
    ) -> RedisUpdatesBackend:
        """A bounded pool for requests (waiting up to the backend timeout for a free connection)
        plus the hub's own reader connection; the hub's task starts now. Redis need not be up yet."""
        timeout = float(settings.backend_timeout_seconds)
        client = Redis(connection_pool=request_pool(url, max_connections, timeout, client_name))
        reader = Redis.from_url(
            url,
            single_connection_client=True,
            socket_timeout=hub_block_ms / 1000 + timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"{client_name}-hub",
            maint_notifications_config=NO_MAINTENANCE,
        )
        hub = UpdateHub(reader, client, timeout=timeout, block_ms=hub_block_ms, queue_size=queue_size)
        hub.start()
        return cls(client, hub)

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        rest = encode_update(run_id, update)
        keys = [stream_key(run_id), trim_marker_key(run_id)]
        new_id = await call(self._append_script(keys=keys, args=[rest, self._max_updates, self._ttl_seconds]))
        return new_id.decode() if isinstance(new_id, bytes) else str(new_id)

    async def read_since(self, run_id: str, since_ms: int) -> bytes:
        start = max(since_ms, -1) + 1
        if start > MAX_SEQ:
            return b"[]"
        entries = await call(self._client.xrange(stream_key(run_id), f"{start}-0", "+"))
        return b"[" + b",".join(entry_data(fields, FIELD) for _, fields in entries or ()) + b"]"

    async def open_stream(
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> RunUpdateStream:
        """Subscribe, resolve the cursor and read the first page of history now, so that a Redis
        that is down answers 503 before the stream starts. Cursor precedence: `after_id`
        (Last-Event-ID) > `since_ms` > `skip_history` (the current last id) > everything stored."""
        cursor: StreamId | None = None
        if after_id is not None:
            cursor = parse_event_id(after_id)
        elif since_ms is not None:
            cursor = (min(max(since_ms, 0), MAX_SEQ), MAX_SEQ)  # after every id of that millisecond
        key = stream_key(run_id)
        subscription = await self.hub.subscribe(key)
        try:
            if cursor is None and skip_history:
                last = range_entries(await call(self._client.xrevrange(key, "+", "-", count=1)))
                cursor = last[0][0] if last else (0, 0)
            stream = RunUpdateStream(self, run_id, subscription, cursor)
            await stream.load_page()
        except BaseException:
            self.hub.unsubscribe(subscription)
            raise
        return stream

    async def read_page(
        self, run_id: str, cursor: StreamId | None
    ) -> tuple[list[tuple[StreamId, bytes]], StreamId | None]:
        """Up to `HISTORY_PAGE` stored entries after `cursor` and the trim marker, in one snapshot."""
        if cursor == (MAX_SEQ, MAX_SEQ):
            return [], None  # the largest id there is: nothing can come after it
        start = "-" if cursor is None else f"({format_id(cursor)}"
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xrange(stream_key(run_id), start, "+", count=HISTORY_PAGE)
            pipe.get(trim_marker_key(run_id))
            entries, marker = await call(pipe.execute())
        return range_entries(entries, FIELD), (parse_id(marker) if marker else None)

    async def ping(self) -> None:
        await call(self._client.ping())

    async def close(self) -> None:
        await self.hub.close()
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


class RunUpdateStream:
    """One open stream of a run's updates: stored ones after the cursor, then live ones.

    `next(wait_seconds)` returns the next `(event, id, data)`, or None when nothing came within
    `wait_seconds` (the caller's heartbeat); it is safe to cancel. `finish()` (the run has closed)
    stops live delivery: `next` then returns whatever is stored after the last update returned and
    raises `StopAsyncIteration`. `next` also raises `StopAsyncIteration` when the hub dropped the
    subscription (the client fell too far behind, or the process is shutting down)."""

    def __init__(
        self, backend: RedisUpdatesBackend, run_id: str, subscription: Subscription, cursor: StreamId | None
    ) -> None:
        self._backend = backend
        self._run_id = run_id
        self._subscription = subscription
        self._cursor = cursor  # the last id returned (or skipped past); None: from the oldest stored
        self._pending: deque[UpdateEvent] = deque()
        self._reading_history = True
        self._draining = False
        self._ended = False

    @property
    def cursor(self) -> str | None:
        return None if self._cursor is None else format_id(self._cursor)

    async def load_page(self) -> None:
        page, marker = await self._backend.read_page(self._run_id, self._cursor)
        if page and self._cursor is not None and marker is not None and marker > self._cursor:
            # Entries after the cursor were trimmed before they could be sent: say so, then go on
            # from the oldest kept one.
            oldest = format_id(page[0][0])
            self._pending.append(("truncated", "", orjson.dumps({"reason": "truncated", "oldest_id": oldest})))
        for stream_id, data in page:
            self._pending.append(("message", format_id(stream_id), data))
            self._cursor = stream_id
        if len(page) < HISTORY_PAGE:
            self._reading_history = False
            self._ended = self._draining

    async def next(self, wait_seconds: float) -> UpdateEvent | None:
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._reading_history:
                await self.load_page()
                continue
            if self._ended:
                raise StopAsyncIteration("end of the stored updates")
            item = await self._subscription.get(wait_seconds)
            if item is None:
                return None
            stream_id, data = item
            if self._cursor is not None and stream_id <= self._cursor:
                continue  # already returned from the history read
            self._cursor = stream_id
            return ("message", format_id(stream_id), data)

    def finish(self) -> None:
        if self._draining:
            return
        self._draining = True
        self._backend.hub.unsubscribe(self._subscription)
        self._reading_history = True  # read what is stored after the cursor, to its end

    async def aclose(self) -> None:
        self._backend.hub.unsubscribe(self._subscription)
        self._pending.clear()
        self._reading_history = False
        self._ended = True
