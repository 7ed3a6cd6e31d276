"""The per-caller open-stream limit counted across every process and replica (`SHARED_STREAM_LIMITS=1`).

Without it each process counts its own streams (`handlers.stream_limits`), so a caller may hold
`MAX_STREAMS_PER_PRINCIPAL` streams in every worker process of every replica. With it, each open
stream also holds a *slot* in Redis, and a stream is refused (429) once its caller holds the limit
there, whichever process serves it.

Design: one sorted set per caller, a lease per slot.

- **Key**: `wfr:stream-slots:{<digest>}`, where the digest (SHA-256 of the caller's project and
  ref) is the whole hash tag: one key per caller, so a caller's slots live in one Redis Cluster
  slot, and no caller-chosen character (a `{` or `}` in a ref) can shape the key.
- **Members** are slot ids (random, one per open stream), **scores** the time (Redis' own `TIME`,
  in ms, the same clock for every host) at which the slot's lease ends.
- **Taking** a slot is one script: drop the members whose lease has ended, count the rest, add the
  new one with a lease of `lease_seconds` unless the caller already holds `limit`. The key expires
  a lease after its last write, so a caller whose processes all died leaves nothing behind.
- **Keeping** slots: each process renews the leases of the slots it holds every `renew_seconds`
  (one script call per caller with open streams, `ZADD XX`: a slot given back meanwhile is never
  brought back). A process that dies (SIGKILL, OOM, a lost host) stops renewing: its slots are
  free again within `lease_seconds` at most.
- **Giving back** is a `ZREM`, sent at once without the caller waiting for it (the stream is
  already over); if it is lost (Redis down at that moment), the lease ends the slot.

Bounds: every call waits at most the backend timeout (`BACKEND_TIMEOUT_SECONDS`), and so does
reading a cluster's slot map before the first take (`backends.redis_cluster.SlotMap`: one read at a
time, shared by every caller that needs it); `close` waits at most `CLOSE_WAIT_SECONDS` for its
give-backs. A slot costs Redis one member (about 60 bytes); a process sends one renewal per caller with
open streams per `renew_seconds`, at most `RENEWALS_AT_ONCE` at a time. While Redis is down, opening
a stream is 503 (as every Redis-backed call); streams already open stay open, and if the outage
outlasts the lease their slots are forgotten: their callers may then open up to the limit again
until those streams end (the count errs towards letting streams open, never towards refusing
forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from backends.redis_cluster import BoundedRedisCluster, SlotMap
from backends.redis_updates import NO_MAINTENANCE, request_pool
from backends.update_hub import call
from core.errors import BackendUnavailable
from core.settings import Settings

log = logging.getLogger("workflow_runs.stream_slots")

KEY_PREFIX = "wfr:stream-slots:"
LEASE_SECONDS = 30.0  # a dead process's slots are free again within this
RENEW_SECONDS = 10.0  # a live process renews its slots this often: two renewals may fail in a row
RENEWALS_AT_ONCE = 32  # renewal calls in flight at once, so a renewal never takes the whole pool
MAX_CONNECTIONS = 8  # the pool of one process's slot calls
MEMBERS_PER_CALL = 500  # slot ids per renewal call (Lua's `unpack` has a stack limit)
# How long `close` waits for the give-backs still under way (and for the renewal task to stop): a
# stopping process should not hang on a Redis that does not answer. A slot not given back by then
# is still freed, by its lease, within `LEASE_SECONDS`.
CLOSE_WAIT_SECONDS = 1.0

# KEYS[1] the caller's set; ARGV: slot id, limit, lease (ms). 1 if taken, 0 if at the limit.
# `replicate_commands` lets Redis 6 write after `TIME` (Redis 7 always replicates effects).
_TAKE = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""

# KEYS[1] the caller's set; ARGV: lease (ms), then the slot ids this process still holds. Only the
# ids still there are renewed (XX): one given back or expired meanwhile stays gone.
_RENEW = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = now + lease
  args[#args + 1] = ARGV[i]
end
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', unpack(args))
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return renewed
"""


def slots_key(owner: str) -> str:
    """A caller's key: the digest is the whole hash tag (one cluster slot per caller)."""
    digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{KEY_PREFIX}{{{digest}}}"


class RedisStreamSlots:
    """`core.protocols.StreamSlots` on Redis (a server, or a cluster with `redis_cluster`); build it
    with `RedisStreamSlots.from_settings(settings)` and `close()` it when the app stops."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
        timeout: float = Settings.backend_timeout_seconds,
    ) -> None:
        if not 0 < renew_seconds < lease_seconds:
            raise ValueError("renew_seconds must be above 0 and below lease_seconds")
        self._client = client
        self._close_wait = min(timeout, CLOSE_WAIT_SECONDS)
        # A cluster client reads the slot map once, before any take: a burst of first calls on a
        # cold client would each start it, over connections still being set up (measured: errors).
        self._slot_map = SlotMap(client, timeout=timeout) if isinstance(client, RedisCluster) else None
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._renew_seconds = renew_seconds
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}  # key -> slot ids this process holds there
        self._loop: asyncio.AbstractEventLoop | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> RedisStreamSlots:
        """A small pool of its own on `settings.redis_url` (every call bounded by the backend
        timeout, no retries of a take: it is not idempotent); nothing is asked of Redis yet."""
        timeout = float(settings.backend_timeout_seconds)
        client: Redis | RedisCluster
        if settings.redis_cluster:
            # Bounded as the updates' cluster client: a call beyond the bound waits for one to end
            # (redis-py's own per-node bound would fail it at once, a 503 or a missed renewal).
            client = BoundedRedisCluster.from_url(
                settings.redis_url,
                max_calls=MAX_CONNECTIONS,
                wait_seconds=timeout,
                max_connections=MAX_CONNECTIONS,  # per node: never reached, `max_calls` bounds them all
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                client_name="wfr-stream-slots",
                # Only a redirection or a connection refused before sending is tried again: a take
                # that may have run is never resent (its id would count twice until its lease ended).
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 0),
                maint_notifications_config=NO_MAINTENANCE,
            )
        else:
            client = Redis(
                connection_pool=request_pool(settings.redis_url, MAX_CONNECTIONS, timeout, "wfr-stream-slots")
            )
        return cls(client, timeout=timeout, **kwargs)

    @property
    def held(self) -> int:
        """The slots this process holds (for its tests and logs)."""
        return sum(len(ids) for ids in self._held.values())

    async def acquire(self, owner: str, limit: int) -> str | None:
        """A new slot of `owner`'s, by id; None when `owner` already holds `limit` live slots.
        `BackendUnavailable` when Redis cannot be reached (the slot is then not held)."""
        if self._closed:
            raise BackendUnavailable("stream slots closed: the server is stopping", backend="server")
        self._start_renewing()
        if self._slot_map is not None:
            await self._slot_map.ensure_fresh()  # BackendUnavailable within the timeout
        key, slot_id = slots_key(owner), secrets.token_hex(12)
        # Held (renewed) from before the call: if the call is cut off after Redis ran it, the slot
        # is given back below rather than left to its lease.
        self._held.setdefault(key, set()).add(slot_id)
        try:
            taken = await call(self._take(keys=[key], args=[slot_id, limit, self._lease_ms]), "stream_slot_take")
        except BaseException:
            self._forget(key, slot_id)
            self._give_back_later(key, slot_id)  # Redis may have run it before the call failed
            raise
        if not taken:
            self._forget(key, slot_id)
        return slot_id if taken else None

    def release(self, owner: str, slot_id: str) -> None:
        """Give the slot back, without waiting for Redis (a lost release ends with its lease).
        Never raises: it runs in `finally` blocks and finalisers."""
        key = slots_key(owner)
        if self._forget(key, slot_id):
            self._give_back_later(key, slot_id)

    async def close(self) -> None:
        """Stop renewing and give back every slot still held, then close the pool. Best effort,
        and short: the give-backs are waited for at most `CLOSE_WAIT_SECONDS` (or the backend
        timeout, if shorter), then cancelled; a slot not given back is freed by its lease, within
        `LEASE_SECONDS`, as a dead process's."""
        self._closed = True
        renewing, self._renewing = self._renewing, None
        if renewing is not None:
            renewing.cancel()
            await self._settle({renewing})
        held, self._held = self._held, {}
        for key, ids in held.items():
            self._give_back_later(key, *ids)
        if self._giving_back:
            await self._settle(set(self._giving_back))
        await self._client.aclose()
        if isinstance(self._client, Redis):  # its pool was given to it, so it is ours to close
            await self._client.connection_pool.disconnect()

    async def renew_once(self) -> None:
        """Renew the lease of every slot this process holds (what the renewal task does each
        `renew_seconds`); a failure is logged, and the next round tries again."""
        keys = list(self._held)
        gate = asyncio.Semaphore(RENEWALS_AT_ONCE)

        async def renew(key: str) -> None:
            ids = sorted(self._held.get(key, ()))
            async with gate:
                for start in range(0, len(ids), MEMBERS_PER_CALL):
                    chunk = ids[start : start + MEMBERS_PER_CALL]
                    await call(self._renew(keys=[key], args=[self._lease_ms, *chunk]), "stream_slot_renew")

        results = await asyncio.gather(*(renew(key) for key in keys), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning(
                "renewing the leases of open streams failed for %d of %d callers: %r", len(failed), len(keys), failed[0]
            )

    # --- internals ---

    async def _settle(self, tasks: set[asyncio.Task[None]]) -> None:
        """Let `tasks` end within the close wait, then cancel those still running. The second wait,
        as short, is for a cancellation redis-py on Python 3.11 can swallow (its `wait_for` around
        socket writes): such a task is left to fail on the pool closed next."""
        _, late = await asyncio.wait(tasks, timeout=self._close_wait)
        if not late:
            return
        for task in late:
            task.cancel()
        log.info("%d stream slot calls still under way at close were cancelled", len(late))
        await asyncio.wait(late, timeout=self._close_wait)

    def _forget(self, key: str, slot_id: str) -> bool:
        ids = self._held.get(key)
        if ids is None or slot_id not in ids:
            return False
        ids.discard(slot_id)
        if not ids:
            del self._held[key]
        return True

    def _start_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._loop = asyncio.get_running_loop()
            self._renewing = self._loop.create_task(self._renew_forever(), name="stream-slot-leases")

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_seconds)
            if self._held:
                await self.renew_once()

    def _give_back_later(self, key: str, *slot_ids: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # nothing was ever taken here, or too late: the leases end the slots
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn_give_back(key, slot_ids)
        else:  # a finaliser on another thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._spawn_give_back, key, slot_ids)

    def _spawn_give_back(self, key: str, slot_ids: tuple[str, ...]) -> None:
        task = asyncio.get_running_loop().create_task(self._give_back(key, slot_ids))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _give_back(self, key: str, slot_ids: tuple[str, ...]) -> None:
        try:
            await call(self._client.zrem(key, *slot_ids), "stream_slot_release")
        except Exception as exc:  # logged: the lease ends the slot anyway
            log.warning("giving back %d stream slots failed (their lease ends them): %r", len(slot_ids), exc)
