"""Run updates on Redis: a bounded, ordered, resumable log per run.

Storage
    One Redis Stream per run, `wfr:updates:<run_id>`. Each entry has one field, `u`, holding the
    final JSON bytes of the update exactly as clients receive it, so reading never decodes and
    re-encodes. A post runs one Lua script, atomic like every script, so no reader ever sees half of
    it: it stamps the time, appends with `XADD ... MAXLEN <n>` (exact), where `n` drops the oldest
    entries while the run would hold more than 1000 entries or more than `max_update_bytes_per_run`
    bytes of JSON (never the entry just added), and sets the keys' TTL to 90 days. Redis 6.2 has no
    `XADD key <ms>-*`, so the script picks the id itself: `ts = max(now_ms, last_ms + 1)`, id
    `ts-0`, and writes `{"timestamp":ts` in front of the rest of the JSON that Python serialised.
    Timestamps are therefore unique and increasing within a run and equal to the entry id's
    milliseconds, which makes `since` (epoch ms) exact: resuming with `since` = the last timestamp
    seen loses nothing, even for updates posted in the same millisecond (a burst of more than 1000
    posts a second runs ahead of the clock until it ends).

    The run's stored bytes (the sum of its entries' JSON lengths) are kept in
    `wfr:updates-bytes:<run_id>` (same TTL), updated by the same script on every add and trim, so
    the bound costs no scan. The script counts them again from the stream when the counter is
    missing while entries exist (written before the counter existed, or lost), and starts from
    zero when the stream is empty, so the counter cannot drift.

    When a post trims entries, the script records the id of the newest entry ever trimmed in
    `wfr:updates-trimmed:<run_id>` (same TTL). A stream resumed from a cursor older than that id has
    really lost updates and is told so (`truncated`); one whose cursor is older than the oldest kept
    entry but not older than the marker has lost nothing and is not.

    A full Redis (`maxmemory` reached, `noeviction`) refuses the script's `XADD`, its first write,
    so a refused post leaves nothing behind; it is a 503 (`BackendUnavailable`), never a loss.

Streams
    `open_stream` subscribes to the process's `UpdateHub` first, then reads what is stored after the
    cursor page by page, then continues with the hub's live entries, dropping ids at or before the
    last one returned. See `backends.update_hub` for why this has neither gap nor duplicate. A page
    is read by a script (with the trim marker, so the truncation check sees one snapshot) that
    stops at `HISTORY_PAGE` entries or `HISTORY_PAGE_BYTES` bytes, whichever comes first: replaying
    a run of large updates holds about one MiB per stream at a time, not the whole run.

Failures
    Every call has a deadline (`backend_timeout_seconds`, kept by the connection pool); a Redis
    that cannot be reached or cannot serve raises `BackendUnavailable` (503 with Retry-After). Posts
    are never retried by the client library, so a post is stored at most once. The posts asked in
    one turn of the event loop go out as one pipeline (`backends.redis_batch`), each with its own
    reply or error.

Replicas
    With `redis_min_replicas` = N > 0 a post is the script followed by `WAIT N redis_wait_timeout_ms`
    in one pipeline, on the connection that ran the script (WAIT counts the replicas holding *that
    connection's* writes; it cannot run inside a script); posts batched together share the WAIT.
    Fewer than N in time: `BackendUnavailable` (stored on the primary, maybe lost by a failover,
    never resent). N = 0, the default, sends the script alone, as before. On a Redis Cluster
    (`redis_cluster`) the backend is `backends.redis_cluster`'s: the same scripts and streams under
    hash-tagged key names.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from backends.redis_batch import ScriptBatcher, stored
from backends.update_hub import (
    MAX_SEQ,
    UNAVAILABLE_MESSAGE,
    Entry,
    EntrySink,
    Hub,
    StreamId,
    Subscription,
    UpdateHub,
    _failures,
    call,
    entry_data,
    format_id,
    parse_id,
    range_entries,
)
from core.errors import BackendUnavailable, InvalidInput, PayloadTooLarge
from core.protocols import LiveSink, UpdateEvent
from core.settings import Settings

MAX_UPDATES_PER_RUN = 1000
TTL_SECONDS = 90 * 24 * 3600
MAX_MESSAGE_BYTES = 65_536  # UTF-8 bytes of `message`
MAX_DETAILS_BYTES = 262_144  # bytes of `details` serialised as JSON
DEFAULT_TYPE = "UPDATE"
FIELD = b"u"
HISTORY_PAGE = 100  # entries of one history page at most...
HISTORY_PAGE_BYTES = 1_048_576  # ...and bytes: the page ends before the entry that would pass this

_STREAM_ID = re.compile(r"\A([0-9]{1,20})(?:-([0-9]{1,20}))?\Z")

# KEYS[1] the run's stream, KEYS[2] its trim marker, KEYS[3] its stored-bytes counter.
# ARGV[1] the update's JSON after the timestamp (`,"workflow_run_id":...}`), ARGV[2] max entries,
# ARGV[3] TTL in seconds, ARGV[4] max stored bytes. Returns the new entry's id.
# Every read comes first and the XADD (which also trims, by count: `MAXLEN =`) is the first write:
# a full Redis (noeviction) refuses the script there, before anything changed, and once it has
# written Redis lets the rest run (a script is never half done).
_APPEND = """
local key, marker, sizes = KEYS[1], KEYS[2], KEYS[3]
local maxlen, ttl, maxbytes = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if last[1] then
  local last_id = last[1][1]
  local last_ms = tonumber(string.sub(last_id, 1, string.find(last_id, '-', 1, true) - 1))
  if last_ms >= ts then ts = last_ms + 1 end
end
local ts_text = string.format('%d', ts)
local id = ts_text .. '-0'
local data = '{"timestamp":' .. ts_text .. ARGV[1]
local len = redis.call('XLEN', key)
local total = 0
if len > 0 then
  total = tonumber(redis.call('GET', sizes))
  if not total then
    -- No counter beside stored entries: count them once, a page at a time.
    total = 0
    local from = '-'
    repeat
      local page = redis.call('XRANGE', key, from, '+', 'COUNT', 100)
      for _, entry in ipairs(page) do total = total + #entry[2][2] end
      if page[1] then from = '(' .. page[#page][1] end
    until #page < 100
  end
end
-- With the new entry the log holds `kept` entries of `total` bytes: pick the oldest to drop while
-- either bound is passed, never the new one. Their sizes are needed, so they are read, in small
-- growing batches: a steady-state post reads one.
local kept = len + 1
total = total + #data
local doomed, from = nil, '-'
local want = kept - maxlen
while kept > 1 and (kept > maxlen or total > maxbytes) do
  if want < 1 then want = 1 elseif want > 64 then want = 64 end
  local page = redis.call('XRANGE', key, from, '+', 'COUNT', want)
  if not page[1] then break end
  for _, entry in ipairs(page) do
    if kept <= 1 or (kept <= maxlen and total <= maxbytes) then break end
    kept = kept - 1
    total = total - #entry[2][2]
    doomed = entry[1]
  end
  from = '(' .. doomed
  want = want * 2
end
redis.call('XADD', key, 'MAXLEN', kept, id, 'u', data)
if doomed then redis.call('SET', marker, doomed) end
redis.call('SET', sizes, string.format('%d', total), 'EX', ttl)
redis.call('EXPIRE', key, ttl)
redis.call('EXPIRE', marker, ttl)
return id
"""

# KEYS[1] the run's stream, KEYS[2] its trim marker. ARGV[1] where to start (`-`, or `(<id>`:
# after that id), ARGV[2] max entries, ARGV[3] max bytes: the page ends before the entry that would
# pass them (it always holds one entry, whatever its size). Read in small batches, so the script
# itself never holds much more than the page. Returns {marker or nil, more (0 or 1), id, json, ...}.
_READ_PAGE = """
local key, from = KEYS[1], ARGV[1]
local maxcount, maxbytes = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {redis.call('GET', KEYS[2]), 0}
local taken, bytes, full = 0, 0, false
while not full do
  local want = maxcount - taken
  if want > 10 then want = 10 end
  local batch = redis.call('XRANGE', key, from, '+', 'COUNT', want)
  for _, entry in ipairs(batch) do
    local data = entry[2][2]
    if taken > 0 and bytes + #data > maxbytes then
      full = true
      break
    end
    out[#out + 1] = entry[1]
    out[#out + 1] = data
    taken = taken + 1
    bytes = bytes + #data
    from = '(' .. entry[1]
  end
  if full or taken >= maxcount then
    full = true
    out[2] = 1
  elseif #batch < want then
    break
  end
end
return out
"""


def stream_key(run_id: str) -> str:
    return f"wfr:updates:{run_id}"


# The other keys of a run use prefixes that differ from `wfr:updates:` and from each other before
# the run id starts, so no run id can make one key name equal another.


def trim_marker_key(run_id: str) -> str:
    return f"wfr:updates-trimmed:{run_id}"


def stored_bytes_key(run_id: str) -> str:
    return f"wfr:updates-bytes:{run_id}"


def append_keys(run_id: str) -> list[str]:
    """The keys of the append script (`_APPEND`), in its order."""
    return [stream_key(run_id), trim_marker_key(run_id), stored_bytes_key(run_id)]


def append_args(rest: bytes, *, max_updates: int, max_bytes: int, ttl_seconds: int) -> list[bytes | int]:
    """The arguments of the append script (`_APPEND`), in its order."""
    return [rest, max_updates, ttl_seconds, max_bytes]


def check_replicated(stored: Any, acknowledged: Any, wanted: int) -> Any:
    """The append script's reply once `WAIT wanted` (sent right after it, on its connection) came
    back: errors are raised as they came, and fewer replicas than wanted is `BackendUnavailable`.
    The entry is then stored on the primary but may not survive a failover: the poster is told
    503, as after a timeout (stored at most once, possibly delivered)."""
    if isinstance(stored, BaseException):
        raise stored
    if isinstance(acknowledged, BaseException):
        raise acknowledged
    if int(acknowledged) < wanted:
        _failures.warning("replicas", "Redis stored a post on %s of %s replicas in time", acknowledged, wanted)
        raise BackendUnavailable(UNAVAILABLE_MESSAGE + " (not replicated)", backend="redis")
    return stored


def parse_event_id(text: str) -> StreamId:
    """A client's `Last-Event-ID` (`ms-seq`, or bare `ms`); `InvalidInput` when it is not one.

    A part beyond 64 bits fits the documented pattern (20 digits) but no id has it: it is read as
    the largest cursor meaning the same thing ("after every id of that millisecond", or "after
    every id there is"), so every value the document allows is accepted."""
    match = _STREAM_ID.match(text.strip())
    if match is None:
        raise InvalidInput("Last-Event-ID must be an update id such as 1678886400000-0.")
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms > MAX_SEQ:
        return MAX_SEQ, MAX_SEQ
    return ms, min(seq, MAX_SEQ)


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
    """`UpdatesBackend` on Redis Streams; build it with `await RedisUpdatesBackend.from_url(...)`,
    which passes the settings' bytes bound of a run (`max_update_bytes_per_run`) as `max_bytes`."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        hub: Hub,
        *,
        max_bytes: int,
        max_updates: int = MAX_UPDATES_PER_RUN,
        ttl_seconds: int = TTL_SECONDS,
        min_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._client = client
        self.hub = hub
        self._max_updates = max_updates
        self._max_bytes = max_bytes
        self._ttl_seconds = ttl_seconds
        self._min_replicas = min_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._append_script = client.register_script(_APPEND)
        if isinstance(client, Redis):  # the cluster backend sends each post to its slot's owner
            self._appends = ScriptBatcher(
                client,
                _APPEND,
                self._append_script.sha,
                min_replicas=min_replicas,
                wait_timeout_ms=wait_timeout_ms,
                check=functools.partial(check_replicated, wanted=min_replicas) if min_replicas else stored,
            )
        self._read_page_script = client.register_script(_READ_PAGE)

    # The key names; the cluster backend (`backends.redis_cluster`) puts a group's hash tag in them.
    def _stream_key(self, run_id: str) -> str:
        return stream_key(run_id)

    def _marker_key(self, run_id: str) -> str:
        return trim_marker_key(run_id)

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
        plus the hub's own reader connection; the hub's task starts now. Redis need not be up yet.
        The bytes bound (`max_update_bytes_per_run`) caps both what a run keeps and what a stream's
        undelivered live updates may hold. With `redis_cluster` set, `url` names any node of a
        Redis Cluster and the backend is `backends.redis_cluster`'s."""
        if settings.redis_cluster:
            from backends.redis_cluster import open_cluster_backend

            return await open_cluster_backend(
                url,
                settings,
                max_connections=max_connections,
                hub_block_ms=hub_block_ms,
                queue_size=queue_size,
                client_name=client_name,
            )
        timeout = float(settings.backend_timeout_seconds)
        max_bytes = settings.max_update_bytes_per_run
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
        hub = UpdateHub(
            reader, client, timeout=timeout, block_ms=hub_block_ms, queue_size=queue_size, queue_bytes=max_bytes
        )
        hub.start()
        return cls(
            client,
            hub,
            max_bytes=max_bytes,
            min_replicas=settings.redis_min_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        rest = encode_update(run_id, update)
        args = append_args(
            rest, max_updates=self._max_updates, max_bytes=self._max_bytes, ttl_seconds=self._ttl_seconds
        )
        new_id = await call(self._appends(append_keys(run_id), args), "append")
        return new_id.decode() if isinstance(new_id, bytes) else str(new_id)

    async def read_since(self, run_id: str, since_ms: int) -> bytes:
        """The stored updates after `since_ms` as one JSON array: at most the run's bytes bound plus
        a comma between entries. Built with one join (no intermediate copies of the whole body)."""
        start = max(since_ms, -1) + 1
        if start > MAX_SEQ:
            return b"[]"
        entries = await call(self._client.xrange(self._stream_key(run_id), f"{start}-0", "+"), "xrange")
        if not entries:
            return b"[]"
        parts = [b"["]
        for _, fields in entries:
            parts += (entry_data(fields, FIELD), b",")
        del entries  # the parsed reply: its entries live on in `parts` only
        parts[-1] = b"]"
        return b"".join(parts)

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
        key = self._stream_key(run_id)
        subscription = await self.hub.subscribe(key)
        try:
            if cursor is None and skip_history:
                last = range_entries(await call(self._client.xrevrange(key, "+", "-", count=1), "xrevrange"))
                cursor = last[0][0] if last else (0, 0)
            stream = RunUpdateStream(self, run_id, subscription, cursor)
            await stream.load_page()
        except BaseException:
            self.hub.unsubscribe(subscription)
            raise
        return stream

    async def read_page(self, run_id: str, cursor: StreamId | None) -> HistoryPage:
        """Stored entries after `cursor`, at most `HISTORY_PAGE` of them and `HISTORY_PAGE_BYTES`
        bytes (always at least one when there is one), with the trim marker, in one snapshot."""
        if cursor == (MAX_SEQ, MAX_SEQ):
            return HistoryPage([], None, more=False)  # the largest id there is: nothing comes after it
        start = "-" if cursor is None else f"({format_id(cursor)}"
        keys = [self._stream_key(run_id), self._marker_key(run_id)]
        reply = await call(
            self._read_page_script(keys=keys, args=[start, HISTORY_PAGE, HISTORY_PAGE_BYTES]), "read_page"
        )
        marker, more, flat = reply[0], reply[1], reply[2:]
        entries = [(parse_id(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return HistoryPage(entries, parse_id(marker) if marker else None, more=bool(more))

    async def ping(self) -> None:
        await call(self._client.ping(), "ping")

    async def close(self) -> None:
        await self.hub.close()
        if isinstance(self._client, Redis):
            await self._appends.close()
        await self._client.aclose()
        if isinstance(self._client, Redis):
            await self._client.connection_pool.disconnect()


@functools.lru_cache(maxsize=64)
def _id_text(stream_id: StreamId) -> str:
    """`format_id`, once per entry rather than once per stream: the streams of a run take the same
    entry one after another."""
    return format_id(stream_id)


@dataclass(frozen=True)
class HistoryPage:
    """One page of a run's stored updates: `(id, JSON)` pairs, the trim marker, and whether more
    may follow (the page stopped at its count or bytes bound rather than at the end)."""

    entries: list[tuple[StreamId, bytes]]
    marker: StreamId | None
    more: bool


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
        # A list, not a deque: it holds one history page at most, and an empty deque costs 760
        # bytes a stream, for the whole life of the stream.
        self._pending: list[UpdateEvent] = []
        self._reading_history = True
        self._draining = False
        self._ended = False

    async def load_page(self) -> None:
        history = await self._backend.read_page(self._run_id, self._cursor)
        page, marker = history.entries, history.marker
        if page and self._cursor is not None and marker is not None and marker > self._cursor:
            # Entries after the cursor were trimmed before they could be sent: say so, then go on
            # from the oldest kept one.
            oldest = format_id(page[0][0])
            self._pending.append(("truncated", "", orjson.dumps({"reason": "truncated", "oldest_id": oldest})))
        for stream_id, data in page:
            self._pending.append(("message", format_id(stream_id), data))
            self._cursor = stream_id
        if not history.more:
            self._reading_history = False
            self._ended = self._draining

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._reading_history:
                await self.load_page()
                continue
            if self._ended:
                raise StopAsyncIteration("end of the stored updates")
            item = await self._subscription.get(wait_seconds, None if sink is None else self._live(sink))
            if item is None:
                return None
            stream_id, data = item
            if self._cursor is not None and stream_id <= self._cursor:
                continue  # already returned from the history read
            self._cursor = stream_id
            return ("message", _id_text(stream_id), data)

    def _live(self, sink: LiveSink) -> EntrySink:
        """The hub's sink for this stream: the entries after the cursor, handed on to `sink`."""

        def take(entry: Entry) -> bool:
            stream_id, data = entry
            if self._cursor is not None and stream_id <= self._cursor:
                return True  # already returned from the history read
            if not sink(_id_text(stream_id), data):
                return False
            self._cursor = stream_id
            return True

        return take

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
