"""The updates backend on a real Redis Cluster (`REDIS_CLUSTER=1`, 3 primaries + 3 replicas from
`tests/support/redis_cluster.py`), with every post acknowledged by one replica
(`REDIS_MIN_REPLICAS=1`).

- The backend suite of `test_redis_updates.py` runs again here on the cluster: the tests that
  need only a backend are imported, so this module's `backend` fixture (the cluster one) serves
  them.
- Hash tags: a run's keys share a slot, the groups' slots spread over every primary.
- Streams across groups: one reader connection per group with open streams, each on the primary
  that owns the group; every stream gets its run's updates once, in order, and resumes by id.
- The load test's shape (`test_load.py`) through the real API process on the cluster.
- On one server, `REDIS_MIN_REPLICAS` without replicas refuses posts (503), storing each at most once.

The primary kill under load is `test_redis_cluster_failover.py` (it needs a cluster of its own).
No sleeps stand in for synchronisation: every wait is on a condition, under a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from backends.redis_cluster import ClusterKeys, RedisClusterUpdatesBackend
from backends.redis_updates import RedisUpdatesBackend, stream_key
from cli import stack
from core.errors import BackendUnavailable
from core.settings import Settings
from tests.integration import test_load

# The single-server suite, run again on the cluster (see the module's docstring).
from tests.integration.test_redis_updates import (  # noqa: F401  # collected here, with this module's fixtures
    ids,
    new_run,
    post_many,
    take_until,
    test_a_closed_run_stream_delivers_what_is_stored_then_ends,
    test_cancelled_sse_generator_unsubscribes_at_once,
    test_cursors_at_the_edges_of_the_id_space,
    test_details_orjson_refuses_are_still_stored,
    test_history_is_read_in_pages_bounded_in_count_and_bytes,
    test_resume_after_a_cut_by_last_event_id_or_since_loses_nothing,
    test_run_closing_mid_stream_drains_updates_posted_just_before,
    test_size_limits,
    test_stored_json_has_the_seed_shape_defaults_and_field_order,
    test_three_streams_opened_before_and_during_200_concurrent_posts_get_each_once_in_order,
    test_truncated_is_announced_only_when_updates_were_really_lost,
    updates_backend,
)
from tests.support.live import LiveApi, Services, api_url, start_api
from tests.support.redis_cluster import HOST, LocalCluster, running_cluster

pytestmark = pytest.mark.services

GROUPS = 16  # fewer than the default 64, so that runs share groups in a test of a few dozen runs


def cluster_settings() -> Settings:
    return Settings(
        backend_timeout_seconds=5,
        redis_cluster=True,
        redis_cluster_groups=GROUPS,
        redis_min_replicas=1,
        redis_wait_timeout_ms=5000,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as started:
        yield started


@pytest.fixture
async def backend(cluster: LocalCluster) -> AsyncIterator[RedisUpdatesBackend]:
    async with updates_backend(cluster.url, settings=cluster_settings()) as b:
        assert isinstance(b, RedisClusterUpdatesBackend)
        yield b


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    rc = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes])
    try:
        yield rc
    finally:
        await rc.aclose()


def cluster_backend(backend: RedisUpdatesBackend) -> RedisClusterUpdatesBackend:
    assert isinstance(backend, RedisClusterUpdatesBackend)
    return backend


async def test_a_runs_keys_share_a_slot_and_the_groups_spread_over_every_primary(
    backend: RedisUpdatesBackend, client: RedisCluster, cluster: LocalCluster
) -> None:
    keys = ClusterKeys(GROUPS)
    await client.initialize()

    def owner(key: str) -> str:
        node = client.get_node_from_key(key)
        assert node is not None
        return node.name

    owners = collections.Counter(owner(keys.group_key(k)) for k in range(GROUPS))
    # 16 groups over 3 primaries with contiguous slot ranges: 5 or 6 each.
    assert sorted(owners.values()) == [5, 5, 6]
    assert set(owners) == {f"{HOST}:{node.port}" for node in cluster.primaries()}

    run_id = "}{odd run id"  # braces in a run id do not change its tag: the tag comes first
    posted = await backend.append(run_id, {"message": "hello"})
    stream, marker, sizes = keys.append_keys(run_id)
    assert stream == f"wfr:updates:{{{keys.tag(run_id)}}}:{run_id}"
    assert len({client.keyslot(stream), client.keyslot(marker), client.keyslot(sizes)}) == 1
    stored: Any = await client.xrange(stream)
    assert [entry_id.decode() for entry_id, _ in stored] == [posted]
    assert await client.get(sizes) == str(len(stored[0][1][b"u"])).encode()
    # Nothing under the single server's key names.
    assert await client.exists(stream_key(run_id)) == 0


async def test_streams_in_every_group_share_a_reader_per_group_and_get_each_update_once_in_order(
    backend: RedisUpdatesBackend, cluster: LocalCluster
) -> None:
    b = cluster_backend(backend)
    runs = [new_run() for _ in range(40)]
    groups = {b.keys.group_of_key(b.keys.stream(run)) for run in runs}
    streams = {run: await b.open_stream(run, after_id=None, since_ms=None, skip_history=False) for run in runs}
    try:
        assert len(b.cluster_hub.hubs) == len(groups) and b.hub.feed_count == len(runs)
        posted = dict(
            zip(runs, await asyncio.gather(*(post_many(b, run, 15, concurrency=5) for run in runs)), strict=True)
        )
        sentinels = {run: await b.append(run, {"message": "sentinel"}) for run in runs}
        for run, stream in streams.items():
            assert ids(await take_until(stream, sentinels[run])) == [*posted[run], sentinels[run]]
        # One reader connection per group with open streams, each on the primary that owns it.
        for group, hub in b.cluster_hub.hubs.items():
            owner = b.topology.owner(b.keys.group_key(group))
            assert hub._node_name == owner.name
        readers = 0
        for node in cluster.alive:
            with node.client() as r:
                readers += sum(1 for c in r.client_list() if c["name"] == "wfr-updates-hub")
        assert readers == len(groups)
    finally:
        for stream in streams.values():
            await stream.aclose()
    assert b.hub.subscriber_count == 0 and b.hub.feed_count == 0


async def test_streams_resume_by_id_across_groups_after_a_cut(backend: RedisUpdatesBackend) -> None:
    runs = [new_run() for _ in range(6)]
    posted = {run: await post_many(backend, run, 30) for run in runs}
    for run in runs:
        first = await backend.open_stream(run, after_id=None, since_ms=None, skip_history=False)
        try:
            seen = ids(await take_until(first, posted[run][9]))
        finally:
            await first.aclose()
        assert seen == posted[run][:10]
        resumed = await backend.open_stream(run, after_id=seen[-1], since_ms=None, skip_history=False)
        try:
            later = await post_many(backend, run, 5)
            assert ids(await take_until(resumed, later[-1])) == [*posted[run][10:], *later]
        finally:
            await resumed.aclose()


@dataclass(frozen=True)
class ClusterLiveApi(LiveApi):
    """The API process on the cluster: the same environment plus the cluster's settings."""

    extra_env: tuple[tuple[str, str], ...] = ()

    def env(self) -> dict[str, str]:
        return {**super().env(), **dict(self.extra_env)}


async def test_the_load_test_through_the_api_on_the_cluster(services: Services, cluster: LocalCluster) -> None:
    on_cluster = Services(
        temporal_address=services.temporal_address,
        redis_url=cluster.url,
        data_dir=services.data_dir,
        jwt_secret=services.jwt_secret,
    )
    port = stack.free_port()
    live = ClusterLiveApi(
        base_url=api_url(port),
        services=on_cluster,
        task_queue=f"cluster-{secrets.token_hex(4)}",
        extra_env=(("REDIS_CLUSTER", "1"), ("REDIS_CLUSTER_GROUPS", str(GROUPS)), ("REDIS_MIN_REPLICAS", "1")),
    )
    children: list[stack.Child] = []
    with stack.running(children):
        await asyncio.to_thread(start_api, children, f"api-cluster-{port}", port, live.env(), services.logs)
        await test_load.test_streams_with_forced_disconnects_get_every_update_once_in_order(live)


async def test_min_replicas_on_one_server_without_replicas_refuses_posts_storing_each_at_most_once(
    tmp_path: Path,
) -> None:
    port = stack.free_port()
    child = stack.start_redis(tmp_path, port=port)
    url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(backend_timeout_seconds=5, redis_min_replicas=1, redis_wait_timeout_ms=50)
    redis = Redis.from_url(url)
    try:
        async with updates_backend(url, settings=settings) as backend:
            run_id = new_run()
            await redis.script_flush()  # the first post loads the script (NOSCRIPT), then sends again
            for i in range(3):
                with pytest.raises(BackendUnavailable):
                    await backend.append(run_id, {"message": f"unreplicated {i}"})
            # Stored on the server once each (not resent), and no replica acknowledged them.
            messages = [m["message"] for m in orjson.loads(await backend.read_since(run_id, 0))]
            assert messages == ["unreplicated 0", "unreplicated 1", "unreplicated 2"]
        async with updates_backend(url, settings=Settings(backend_timeout_seconds=5)) as plain:
            await plain.append(run_id, {"message": "no replicas asked"})  # the default: no WAIT
            messages = [m["message"] for m in orjson.loads(await plain.read_since(run_id, 0))]
            assert messages[-1] == "no replicas asked" and len(messages) == 4
    finally:
        await redis.aclose()
        child.stop()


async def test_the_shared_stream_count_works_on_the_cluster_beyond_its_connection_bound(cluster: LocalCluster) -> None:
    """Many callers' takes at once (more than the pool's connections, keys on every primary) each
    wait for a connection instead of failing; the per-caller limit holds; a given-back slot frees
    its place once its give-back has reached Redis."""
    from backends.redis_stream_slots import MAX_CONNECTIONS, RedisStreamSlots

    slots = RedisStreamSlots.from_settings(Settings(redis_cluster=True, redis_url=cluster.url))
    try:
        takers = [f"caller-{i}" for i in range(MAX_CONNECTIONS * 4) for _ in range(3)]
        taken = await asyncio.gather(*(slots.acquire(owner, 2) for owner in takers))
        per_owner = collections.Counter(owner for owner, slot in zip(takers, taken, strict=True) if slot)
        assert len(per_owner) == MAX_CONNECTIONS * 4 and set(per_owner.values()) == {2}
        first_owner = takers[0]
        given_back = next(slot for owner, slot in zip(takers, taken, strict=True) if owner == first_owner and slot)
        slots.release(first_owner, given_back)
        for _ in range(200):  # the give-back is a background ZREM: a take succeeds once it landed
            if await slots.acquire(first_owner, 2) is not None:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("a given-back slot never freed its place")
    finally:
        await slots.close()
