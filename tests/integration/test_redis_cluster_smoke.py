"""Groundwork for run updates on Redis Cluster: what redis-py's cluster client and a real cluster
(3 primaries, 3 replicas, `tests/support/redis_cluster.py`) do with the keys and calls the updates
backend would use.

- A run's keys share one hash tag (`{run:<id>}`), so the append script and a many-key XREAD of one
  run are accepted; an XREAD over two runs' keys is refused (CROSSSLOT), even when one node holds
  both slots.
- `WAIT` counts the replicas that acknowledged the writes of *its own connection*, so it must follow
  the write on the connection that made it: the test takes that connection from the node that owns
  the key's slot (`RedisCluster.get_node_from_key`, `ClusterNode.acquire_connection`).
- A primary killed with SIGKILL loses no write its replica acknowledged, and the client follows the
  failover (and a MOVED answer) without being rebuilt.

No sleeps stand in for synchronisation: every wait is on a condition, under a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterCrossSlotError, MovedError, NoScriptError, RedisClusterException

from backends.redis_updates import _APPEND, append_args
from tests.support.redis_cluster import HOST, LocalCluster, running_cluster

pytestmark = pytest.mark.services

WAIT_MS = 5000  # how long WAIT may wait for a replica; it returns as soon as enough acknowledged


def run_keys(run_id: str) -> list[str]:
    """The append script's keys for one run (stream, trim marker, stored bytes), in one slot."""
    tag = f"{{run:{run_id}}}"
    return [f"{tag}:updates", f"{tag}:trimmed", f"{tag}:bytes"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as started:
        yield started


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    startup = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    rc = RedisCluster(startup_nodes=startup, socket_timeout=10, socket_connect_timeout=5)
    await rc.initialize()
    try:
        yield rc
    finally:
        await rc.aclose()


async def append_acknowledged(rc: RedisCluster, run_id: str, message: str, replicas: int) -> tuple[str, int]:
    """Run the updates backend's append script for `run_id`, then `WAIT replicas` on the same
    connection; the new id and how many replicas hold it. A MOVED or NOSCRIPT answer means the
    script did not run, so trying again (on the slot's new owner) cannot store it twice; any other
    failure may have stored it and is not retried."""
    keys = run_keys(run_id)
    rest = f',"workflow_run_id":"{run_id}","type":"UPDATE","message":"{message}"}}'.encode()
    args = append_args(rest, max_updates=1000, max_bytes=10_000_000, ttl_seconds=3600)
    script = rc.register_script(_APPEND)
    for _ in range(3):
        node = rc.get_node_from_key(keys[0])
        assert node is not None
        connection = node.acquire_connection()
        try:
            try:
                await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                new_id = await node.parse_response(connection, "EVALSHA")
            except NoScriptError:
                await connection.send_command("SCRIPT", "LOAD", _APPEND)
                await node.parse_response(connection, "SCRIPT")
                continue
            except MovedError as moved:
                await rc.nodes_manager.move_slot(moved)
                continue
            await connection.send_command("WAIT", replicas, WAIT_MS)
            acknowledged = await node.parse_response(connection, "WAIT")
        finally:
            node.release(connection)
        return new_id.decode(), int(acknowledged)
    raise AssertionError("the append script found no node that would run it")


def owner(rc: RedisCluster, run_id: str) -> ClusterNode:
    """The primary holding `run_id`'s slot, as the client's slot cache has it."""
    node = rc.get_node_from_key(run_keys(run_id)[0])
    assert node is not None
    return node


def entry_ids(entries: Any) -> list[str]:
    return [entry_id.decode() for entry_id, _ in entries]


def spread_runs(rc: RedisCluster, count: int) -> list[str]:
    """`count` run ids whose keys, together, land on every primary."""
    while True:
        runs = [str(uuid.uuid4()) for _ in range(count)]
        owners = {owner(rc, run) for run in runs}
        if len(owners) == len(rc.get_primaries()):
            return runs


async def test_a_runs_keys_share_a_slot_so_xadd_and_xread_work(client: RedisCluster) -> None:
    runs = spread_runs(client, 12)
    for run in runs:
        stream, marker, _ = run_keys(run)
        assert client.keyslot(stream) == client.keyslot(marker)
        await client.xadd(stream, {"u": f"first of {run}"})
        await client.xadd(marker, {"u": f"marker of {run}"})
        # Two keys of one run: one slot, one XREAD.
        read: Any = await client.xread({stream: "0", marker: "0"})
        got = {key.decode(): [fields[b"u"].decode() for _, fields in entries] for key, entries in read}
        assert got == {stream: [f"first of {run}"], marker: [f"marker of {run}"]}


async def test_an_xread_across_slots_is_refused(client: RedisCluster) -> None:
    # Two runs in different slots of the same primary: the node holds both and still refuses.
    first = str(uuid.uuid4())
    node = owner(client, first)
    second = next(
        run
        for run in (str(uuid.uuid4()) for _ in range(10_000))
        if owner(client, run) == node and client.keyslot(run_keys(run)[0]) != client.keyslot(run_keys(first)[0])
    )
    keys = [run_keys(first)[0], run_keys(second)[0]]
    for key in keys:
        await client.xadd(key, {"u": "x"})
    # The server's CROSSSLOT reply (redis-py raises it as its own class, without the code).
    with pytest.raises(ClusterCrossSlotError):
        await node.execute_command("XREAD", "STREAMS", *keys, "0", "0")
    # redis-py's cluster client refuses it before sending.
    with pytest.raises(RedisClusterException, match="same key slot"):
        await client.xread(dict.fromkeys(keys, "0"))


async def test_wait_on_the_writing_connection_counts_the_replicas(cluster: LocalCluster, client: RedisCluster) -> None:
    replicated = {f"{HOST}:{p.port}" for p in cluster.primaries() if cluster.replicas_of(p)}
    run = next(r for r in spread_runs(client, 12) if owner(client, r).name in replicated)
    new_id, acknowledged = await append_acknowledged(client, run, "hello", replicas=1)
    assert acknowledged == 1
    stored: Any = await client.xrange(run_keys(run)[0])
    assert entry_ids(stored) == [new_id]
    assert stored[0][1][b"u"].startswith(b'{"timestamp":')


async def test_acknowledged_writes_survive_a_failover(cluster: LocalCluster, client: RedisCluster) -> None:
    runs = spread_runs(client, 9)
    acknowledged: dict[str, list[str]] = {run: [] for run in runs}
    for round_ in range(5):
        for run in runs:
            new_id, replicas = await append_acknowledged(client, run, f"before {round_}", replicas=1)
            assert replicas == 1
            acknowledged[run].append(new_id)

    victim_run = runs[0]
    victim = owner(client, victim_run)
    promoted = cluster.kill_primary(cluster.node(int(victim.port)))

    # The client still holds the dead node for those slots: its next call fails to connect,
    # re-reads the topology and lands on the promoted replica.
    for run in runs:
        assert entry_ids(await client.xrange(run_keys(run)[0])) == acknowledged[run]
    assert owner(client, victim_run).port == promoted.port

    # A node that does not own the slot answers MOVED; the client follows it.
    elsewhere = next(n for n in client.get_primaries() if n.port != promoted.port)
    moved_id = await client.execute_command("XADD", run_keys(victim_run)[0], "*", "u", "moved", target_nodes=elsewhere)
    assert moved_id.decode() in entry_ids(await client.xrange(run_keys(victim_run)[0]))

    # The promoted primary has no replica left: WAIT says so, which is what a post requiring one
    # replica would refuse on.
    new_id, replicas = await append_acknowledged(client, victim_run, "after", replicas=1)
    assert replicas == 0
    assert entry_ids(await client.xrange(run_keys(victim_run)[0]))[-1] == new_id
