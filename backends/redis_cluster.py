"""Run updates on a Redis Cluster (`REDIS_CLUSTER=1`): the same log per run, in hash-tag groups.

Keys
    A cluster runs a script or a many-key XREAD only when all its keys are in one slot. Every key of
    a run therefore carries one hash tag, and runs are spread over `redis_cluster_groups` tags
    (groups): `wfr:updates:{<tag>}:<run_id>`, `wfr:updates-trimmed:{<tag>}:<run_id>`,
    `wfr:updates-bytes:{<tag>}:<run_id>`. A run's group is a stable hash of its id (CRC-32, the same
    in every process and release); the tag is never built from the run id (an id beginning with
    `}` would give an empty tag). The tags are chosen once, deterministically, so that group `k`'s
    slot lies at the start of the `k`-th of `groups` equal slot ranges: any contiguous allocation
    of slots to primaries spreads the groups evenly over them.

Live path
    One `UpdateHub` (`GroupHub`) per group with open streams, each with a reader connection to the
    primary that owns its group's slot: its `XREAD BLOCK` covers the group's open runs, which all
    live in that one slot. On a connection error, `MOVED` or `TRYAGAIN`, a group's hub keeps every
    feed's position, re-reads the slot owner (`MOVED` names it; otherwise the cluster's slot map is
    fetched again), reconnects there and reads on from the kept positions: exactly once and in
    order as on one server (`backends.update_hub`). A failover thus costs the open streams a pause,
    not a reconnect.

Posts
    The append script runs on the slot's primary through one connection of that node
    (`ClusterNode.execute_pipeline`), followed on the same connection by `WAIT n timeout` when
    `redis_min_replicas` is set. `MOVED`, `ASK`, `TRYAGAIN` and `NOSCRIPT` mean the script did not
    run: the post follows the redirection (or loads the script) and is sent again. Anything else
    after sending (a connection lost, a timeout) may have stored it: it is never resent, the post
    is answered 503 and the slot map is re-read before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import zlib
from binascii import crc_hqx
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.retry import Retry

from backends.redis_updates import (
    _APPEND,
    NO_MAINTENANCE,
    RedisUpdatesBackend,
    append_args,
    check_replicated,
    encode_update,
)
from backends.update_hub import Subscription, UpdateHub, as_unavailable, call, logger
from core.errors import BackendUnavailable
from core.settings import Settings

SLOTS = REDIS_CLUSTER_HASH_SLOTS
POST_ATTEMPTS = 3  # sends of one post: the first, and after up to two redirections or NOSCRIPT
COMMAND_CONNECTIONS_PER_NODE = 4  # the hubs' commands to one node (a feed's start, CLIENT UNBLOCK)
# Connection settings of the cluster client that the hubs' per-node clients must share.
_SHARED_KWARGS = frozenset({"username", "password", "credential_provider", "connection_class"})


# -- keys ---------------------------------------------------------------------------------------


def _crc16_slot(data: bytes) -> int:
    """The slot of a key that is all tag (Redis Cluster's CRC16, as `redis.crc.key_slot`)."""
    return crc_hqx(data, 0) % SLOTS


@functools.cache
def group_tags(groups: int) -> tuple[str, ...]:
    """The hash tag of each of `groups` groups (at most one per slot): group `k`'s slot lies in
    the first eighth of the `k`-th of `groups` equal slot ranges (exactly at its start once the
    ranges are 8 slots or fewer). Found by one deterministic pass over `g0`, `g1`, ...: the same in
    every process (about 2 500 candidates for 64 groups)."""
    groups = min(max(groups, 1), SLOTS)
    width = max(1, SLOTS // groups // 8)
    starts = [k * SLOTS // groups for k in range(groups)]
    tags: list[str | None] = [None] * groups
    missing = groups
    i = 0
    while missing:
        candidate = f"g{i}"
        i += 1
        slot = _crc16_slot(candidate.encode())
        k = slot * groups // SLOTS
        if tags[k] is None and slot - starts[k] < width:
            tags[k] = candidate
            missing -= 1
    return tuple(tag for tag in tags if tag is not None)


def group_of(run_id: str, groups: int) -> int:
    """A run's group: stable across processes and releases (CRC-32 of its UTF-8 id, not `hash`)."""
    return zlib.crc32(run_id.encode("utf-8", "surrogatepass")) % min(max(groups, 1), SLOTS)


class ClusterKeys:
    """The key names of runs on a cluster, and the group a key belongs to."""

    def __init__(self, groups: int) -> None:
        self.tags = group_tags(groups)
        self.groups = len(self.tags)
        self._group_of_tag = {tag: k for k, tag in enumerate(self.tags)}

    def tag(self, run_id: str) -> str:
        return self.tags[group_of(run_id, self.groups)]

    def stream(self, run_id: str) -> str:
        return f"wfr:updates:{{{self.tag(run_id)}}}:{run_id}"

    def marker(self, run_id: str) -> str:
        return f"wfr:updates-trimmed:{{{self.tag(run_id)}}}:{run_id}"

    def stored_bytes(self, run_id: str) -> str:
        return f"wfr:updates-bytes:{{{self.tag(run_id)}}}:{run_id}"

    def append_keys(self, run_id: str) -> list[str]:
        """The keys of the append script, in its order (stream, trim marker, stored bytes)."""
        tag = self.tag(run_id)
        return [
            f"wfr:updates:{{{tag}}}:{run_id}",
            f"wfr:updates-trimmed:{{{tag}}}:{run_id}",
            f"wfr:updates-bytes:{{{tag}}}:{run_id}",
        ]

    def group_of_key(self, key: str) -> int:
        """The group of one of these keys (its tag is the first `{...}`)."""
        start = key.index("{") + 1
        return self._group_of_tag[key[start : key.index("}", start)]]

    def group_key(self, group: int) -> str:
        """A key in the group's slot (for asking who owns it)."""
        return f"{{{self.tags[group]}}}"


class BoundedRedisCluster(RedisCluster):
    """redis-py's cluster client with today's pool behaviour: at most `max_calls` calls at once
    (each on one connection of one node), a call beyond them waits up to `wait_seconds` for one
    to end. redis-py's own bound (connections per node) fails at once instead of waiting."""

    def __init__(self, *args: Any, max_calls: int, wait_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = asyncio.Semaphore(max_calls)
        self._wait_seconds = wait_seconds

    async def acquire(self) -> None:
        if not self.calls.locked():
            await self.calls.acquire()  # returns at once: no timer
            return
        try:
            async with asyncio.timeout(self._wait_seconds):
                await self.calls.acquire()
        except TimeoutError as exc:
            raise redis_errors.ConnectionError("no free Redis connection in time") from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.acquire()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self.calls.release()


# -- the slot map -------------------------------------------------------------------------------


class SlotMap:
    """A cluster client's slot map, read when first needed and again once marked `stale`.

    `stale` is set by whoever saw a node fail; the next caller that needs the map re-reads it
    first, so a healthy cluster costs a caller one attribute check.

    A read is bounded as one call is: one at a time per process (whoever needs the map while it
    is being read waits for that read instead of queueing another), the whole read (every node
    redis-py tries in turn, each with its own connect and read timeouts) ends within `timeout`
    seconds, and a caller waits for it at most `timeout` seconds. A read that fails or runs out of
    time is `BackendUnavailable` (503, Redis' own words in the log only) for every caller waiting
    on it, and leaves the map stale for the next one. The updates' `Topology` and the shared stream
    count (`backends.redis_stream_slots`) both read their client's map through it."""

    def __init__(self, client: RedisCluster, *, timeout: float) -> None:
        self._cluster = client
        self.timeout = timeout
        self.stale = True  # not read yet
        self._initialized = False
        self._reading: asyncio.Future[None] | None = None

    async def ensure_fresh(self) -> None:
        if self.stale or self._reading is not None:
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the slot map, or wait for the read under way; `BackendUnavailable` when it
        fails or takes longer than `timeout`."""
        reading = self._reading
        if reading is None:
            reading = self._reading = asyncio.ensure_future(call(self._read_map(), "cluster_slots"))
            reading.add_done_callback(self._read_done)
        try:
            async with asyncio.timeout(self.timeout):
                # Shielded: a caller that gives up (its client left) leaves the read to the others.
                await asyncio.shield(reading)
        except BackendUnavailable:
            raise
        except Exception as exc:  # this caller's deadline, or a refusal no retry would change
            raise as_unavailable(exc) from exc

    def _read_done(self, reading: asyncio.Future[None]) -> None:
        if self._reading is reading:
            self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved: every caller may have stopped waiting for it

    async def _read_map(self) -> None:
        # Not stale from the start of the read: a node failure seen meanwhile marks it again.
        self.stale = False
        try:
            async with asyncio.timeout(self.timeout):
                if self._initialized:
                    await self._cluster.nodes_manager.initialize()
                else:  # the client's own first set-up (slot map and command table), done once
                    await self._cluster.initialize()
                    self._initialized = True
        except redis_errors.RedisClusterException as exc:  # no node answered: not a RedisError
            self.stale = True
            raise redis_errors.ConnectionError(str(exc)) from exc
        except BaseException:
            self.stale = True
            raise


class Topology(SlotMap):
    """Who owns which slot, as the cluster client's slot map says; re-read (`SlotMap`) after a
    failure. Also the posts' place among the client's `max_calls`."""

    def __init__(self, client: BoundedRedisCluster, *, timeout: float) -> None:
        super().__init__(client, timeout=timeout)
        self.client = client

    def owner(self, key: str) -> ClusterNode:
        """The primary of `key`'s slot; `SlotNotCoveredError` when no node holds it."""
        node = self.client.get_node_from_key(key)
        if node is None:
            raise redis_errors.SlotNotCoveredError(f"no node holds the slot of {key}")
        return node

    async def moved(self, exc: redis_errors.AskError) -> None:
        """A MOVED answer names the slot's new owner: take it without re-reading the whole map."""
        await self.client.nodes_manager.move_slot(exc)

    def node_at(self, host: str, port: int) -> ClusterNode | None:
        return self.client.get_node(host=host, port=port)

    async def acquire(self) -> None:
        """A call's place among the client's `max_calls` (see `BoundedRedisCluster`)."""
        await self.client.acquire()

    def release(self) -> None:
        self.client.calls.release()


def _outcome_unknown(result: object) -> bool:
    """Whether a reply means the connection failed after the post was sent (it may be stored)."""
    return isinstance(result, redis_errors.ConnectionError | redis_errors.TimeoutError | TimeoutError | OSError)


async def append_on_owner(
    topology: Topology,
    sha: str,
    keys: Sequence[str],
    args: Sequence[bytes | int],
    *,
    min_replicas: int,
    wait_timeout_ms: int,
) -> Any:
    """Run the append script on the primary of `keys`' slot, and `WAIT` on the same connection
    when `min_replicas` is set; the script's reply (the new id)."""
    await topology.ensure_fresh()
    node = topology.owner(keys[0])
    asking = False
    for _ in range(POST_ATTEMPTS):
        commands = [PipelineCommand(0, "ASKING")] if asking else []
        script = PipelineCommand(len(commands), "EVALSHA", sha, len(keys), *keys, *args)
        commands.append(script)
        if min_replicas:
            commands.append(PipelineCommand(len(commands), "WAIT", min_replicas, wait_timeout_ms))
        await topology.acquire()
        try:
            await node.execute_pipeline(commands)
        except BaseException:
            topology.stale = True  # not sent, or sent on a connection that failed: no retry
            raise
        finally:
            topology.release()
        stored = script.result
        asking = False
        if isinstance(stored, redis_errors.NoScriptError):
            # Under the same bound as every call: after a flush, each post in flight lands here.
            await topology.acquire()
            try:
                await node.execute_command("SCRIPT", "LOAD", _APPEND)
            finally:
                topology.release()
            continue
        if isinstance(stored, redis_errors.MovedError):
            await topology.moved(stored)
            node = topology.owner(keys[0])
            continue
        if isinstance(stored, redis_errors.AskError):  # the slot is migrating: ask its target once
            target = topology.node_at(stored.host, stored.port)
            if target is None:
                topology.stale = True
                raise stored
            node, asking = target, True
            continue
        if isinstance(stored, redis_errors.TryAgainError):  # keys split by a migration: not run
            await asyncio.sleep(0.05)
            continue
        if _outcome_unknown(stored) or isinstance(stored, redis_errors.ClusterDownError):
            topology.stale = True
        return check_replicated(stored, commands[-1].result, min_replicas) if min_replicas else _raised(stored)
    raise redis_errors.ClusterError("the append script found no node that would run it")


def _raised(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


# -- the live path ------------------------------------------------------------------------------


class NodeClients:
    """Plain clients of single nodes, for the hubs: a reader each (a connection of its own, as
    `UpdateHub` wants) and a small shared pool per node for their other commands."""

    def __init__(self, cluster: RedisCluster, *, timeout: float, block_ms: int, client_name: str) -> None:
        shared = cluster.get_connection_kwargs()
        self._kwargs: dict[str, Any] = {k: v for k, v in shared.items() if k in _SHARED_KWARGS or k.startswith("ssl_")}
        self._timeout = timeout
        self._block_ms = block_ms
        self._client_name = client_name
        self._commands: dict[str, Redis] = {}

    def _pool(self, node: ClusterNode, size: int, socket_timeout: float, name: str) -> BlockingConnectionPool:
        return BlockingConnectionPool(
            host=node.host,
            port=int(node.port),
            max_connections=size,
            timeout=self._timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=name,
            maint_notifications_config=NO_MAINTENANCE,
            **self._kwargs,
        )

    def reader(self, node: ClusterNode) -> Redis:
        pool = self._pool(node, 1, self._block_ms / 1000 + self._timeout, f"{self._client_name}-hub")
        return Redis(connection_pool=pool, single_connection_client=True)

    def commands(self, node: ClusterNode) -> Redis:
        client = self._commands.get(node.name)
        if client is None:
            pool = self._pool(node, COMMAND_CONNECTIONS_PER_NODE, self._timeout, self._client_name)
            client = self._commands[node.name] = Redis(connection_pool=pool)
        return client

    async def aclose(self) -> None:
        clients, self._commands = list(self._commands.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
                await client.connection_pool.disconnect()


class GroupHub(UpdateHub):
    """Today's hub for one group, reading from the group's current slot owner: after a failed
    read it re-reads the owner and, when it changed, reads from the new one (positions kept).

    The reader's `CLIENT ID` (`_reader_id`) is a number of the reader's node only (each node
    counts its own clients): it is forgotten whenever the reader moves, and a wake (`CLIENT
    UNBLOCK`) is sent only while the reader is on the node new feeds are resolved on (`_owner`,
    whose pool `_commands` is), so it reaches the connection that is blocked or no one."""

    def __init__(
        self, topology: Topology, clients: NodeClients, group_key: str, *, node: ClusterNode, **kwargs: Any
    ) -> None:
        super().__init__(clients.reader(node), clients.commands(node), **kwargs)
        self._topology = topology
        self._clients = clients
        self._group_key = group_key
        self._node = node  # the reader's node
        self._owner = node  # the group's owner as last seen, whose pool `_commands` is

    @property
    def _node_name(self) -> str:
        """The name of the reader's node (the integration tests check it follows the slot)."""
        return self._node.name

    async def subscribe(self, key: str) -> Subscription:
        try:
            await self._topology.ensure_fresh()
            owner = self._topology.owner(self._group_key)
            self._owner, self._commands = owner, self._clients.commands(owner)
            return await super().subscribe(key)
        except BackendUnavailable:
            self._topology.stale = True
            raise

    async def _wake(self) -> None:
        # On another node the reader's id is some other client's. And the reader, blocked on a
        # node that no longer owns the group, needs no wake: Redis ends that read itself (MOVED,
        # within a second) or its connection fails, and the reader follows; a wake sent there
        # could only wait on a node that may be down. No await between this check and the
        # base's use of `_commands` and `_reader_id`.
        if self._owner.name == self._node.name:
            await super()._wake()

    async def _read_once(self) -> None:
        # Only the reader task replaces the reader: it is its only user.
        node = self._topology.owner(self._group_key)
        if node.name != self._node.name:
            await self._follow(node)
        await super()._read_once()

    async def _follow(self, node: ClusterNode) -> None:
        old, self._reader = self._reader, self._clients.reader(node)
        self._owner, self._commands = node, self._clients.commands(node)
        self._node = node
        self._reader_id = None  # the old node's number: on the new node it may be anyone's
        logger.info("update hub of %s now reads from %s", self._group_key, node.name)
        await _close_reader(old)

    async def _recover(self, exc: Exception) -> None:
        if isinstance(exc, redis_errors.MovedError):
            await self._topology.moved(exc)
        else:
            self._topology.stale = True
            await self._topology.refresh()
        node = self._topology.owner(self._group_key)
        if node.name != self._node.name:
            await self._follow(node)
        else:
            await super()._recover(exc)

    async def close(self) -> None:
        await super().close()
        await _close_reader(self._reader)  # `UpdateHub.close` hands its connection back to its pool


async def _close_reader(reader: Redis) -> None:
    """Close a hub's reader now, its connection included: `aclose` alone hands the connection back
    to the reader's own pool (given to the client, so the client does not close it), where it would
    stay open until the pool is collected. Bounded: a disconnect waits at most the connect timeout."""
    with contextlib.suppress(Exception):
        await reader.aclose(close_connection_pool=True)


class ClusterUpdateHub:
    """The hub of a cluster backend: one `GroupHub` per group that has had open streams (so at
    most `redis_cluster_groups` reader connections per process), each created on first use."""

    def __init__(
        self,
        topology: Topology,
        keys: ClusterKeys,
        clients: NodeClients,
        *,
        timeout: float,
        queue_bytes: int,
        block_ms: int = 1000,
        queue_size: int = 1000,
    ) -> None:
        self._topology = topology
        self._keys = keys
        self._clients = clients
        self._hub_kwargs: dict[str, Any] = {
            "timeout": timeout,
            "queue_bytes": queue_bytes,
            "block_ms": block_ms,
            "queue_size": queue_size,
        }
        self._hubs: dict[int, GroupHub] = {}
        self._closed = False

    @property
    def hubs(self) -> dict[int, GroupHub]:
        return self._hubs

    @property
    def connected(self) -> bool:
        """Whether every group hub with open streams read successfully last time."""
        return all(hub.connected for hub in self._hubs.values() if hub.feed_count)

    @property
    def subscriber_count(self) -> int:
        return sum(hub.subscriber_count for hub in self._hubs.values())

    @property
    def feed_count(self) -> int:
        return sum(hub.feed_count for hub in self._hubs.values())

    async def subscribe(self, key: str) -> Subscription:
        if self._closed:
            raise BackendUnavailable("the update stream hub is shutting down", backend="server")
        group = self._keys.group_of_key(key)
        hub = self._hubs.get(group)
        if hub is None:
            await self._topology.ensure_fresh()  # bounded by the backend timeout itself
            hub = self._hubs.get(group)  # another stream may have made it meanwhile
            if hub is None:
                if self._closed:
                    raise BackendUnavailable("the update stream hub is shutting down", backend="server")
                group_key = self._keys.group_key(group)
                node = self._topology.owner(group_key)
                hub = GroupHub(self._topology, self._clients, group_key, node=node, **self._hub_kwargs)
                self._hubs[group] = hub
                hub.start()
        return await hub.subscribe(key)

    def unsubscribe(self, sub: Subscription) -> None:
        hub = self._hubs.get(self._keys.group_of_key(sub.key))
        if hub is None:
            sub._close("unsubscribed")
        else:
            hub.unsubscribe(sub)

    async def close(self) -> None:
        self._closed = True
        hubs, self._hubs = list(self._hubs.values()), {}
        await asyncio.gather(*(hub.close() for hub in hubs))
        await self._clients.aclose()


# -- the backend --------------------------------------------------------------------------------


class RedisClusterUpdatesBackend(RedisUpdatesBackend):
    """`RedisUpdatesBackend` on a Redis Cluster: the same scripts and streams, under the group
    keys, with posts sent to their slot's primary (and acknowledged by `WAIT` when asked)."""

    def __init__(
        self,
        client: BoundedRedisCluster,
        hub: ClusterUpdateHub,
        topology: Topology,
        keys: ClusterKeys,
        *,
        max_bytes: int,
        min_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        super().__init__(client, hub, max_bytes=max_bytes, min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
        self.cluster = client
        self.cluster_hub = hub
        self.topology = topology
        self.keys = keys

    def _stream_key(self, run_id: str) -> str:
        return self.keys.stream(run_id)

    def _marker_key(self, run_id: str) -> str:
        return self.keys.marker(run_id)

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        rest = encode_update(run_id, update)
        args = append_args(
            rest, max_updates=self._max_updates, max_bytes=self._max_bytes, ttl_seconds=self._ttl_seconds
        )
        stored = append_on_owner(
            self.topology,
            self._append_script.sha,
            self.keys.append_keys(run_id),
            args,
            min_replicas=self._min_replicas,
            wait_timeout_ms=self._wait_timeout_ms,
        )
        new_id = await call(stored, "append")
        return new_id.decode() if isinstance(new_id, bytes) else str(new_id)

    async def ping(self) -> None:
        await call(self.cluster.ping(target_nodes=RedisCluster.RANDOM), "ping")

    async def close(self) -> None:
        await self.cluster_hub.close()
        await self.cluster.aclose()


async def open_cluster_backend(
    url: str,
    settings: Settings,
    *,
    max_connections: int = 32,
    hub_block_ms: int = 1000,
    queue_size: int = 1000,
    client_name: str = "wfr-updates",
) -> RedisClusterUpdatesBackend:
    """The cluster backend for `url` (any node: the client finds the others). Nothing is asked of
    the cluster yet: the slot map is read by the first call that needs it."""
    timeout = float(settings.backend_timeout_seconds)
    client = BoundedRedisCluster.from_url(
        url,
        max_calls=max_connections,
        wait_seconds=timeout,
        max_connections=max_connections,  # per node: never reached, `max_calls` bounds them all
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        client_name=client_name,
        # Reads may be tried again on another node after a failure; posts never go through this
        # retry (`append_on_owner` sends them itself).
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        maint_notifications_config=NO_MAINTENANCE,
    )
    assert isinstance(client, BoundedRedisCluster)
    topology = Topology(client, timeout=timeout)
    keys = ClusterKeys(settings.redis_cluster_groups)
    clients = NodeClients(client, timeout=timeout, block_ms=hub_block_ms, client_name=client_name)
    hub = ClusterUpdateHub(
        topology,
        keys,
        clients,
        timeout=timeout,
        queue_bytes=settings.max_update_bytes_per_run,
        block_ms=hub_block_ms,
        queue_size=queue_size,
    )
    return RedisClusterUpdatesBackend(
        client,
        hub,
        topology,
        keys,
        max_bytes=settings.max_update_bytes_per_run,
        min_replicas=settings.redis_min_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
