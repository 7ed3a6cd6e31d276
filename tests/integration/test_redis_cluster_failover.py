"""A primary of the Redis Cluster killed (SIGKILL) while posts flow and streams are open, with
`REDIS_MIN_REPLICAS=1`: one backend object throughout, never restarted.

- Every post answered OK is stored after the failover (its replica had acknowledged it).
- Every stream opened before the kill carries on by itself once the replica has taken over: it
  receives each stored update once, in order; the only updates it may have that the log lost are
  posts that were answered 503 (stored on the dead primary, never acknowledged).
- A stream resumed by `Last-Event-ID` after the failover gets exactly the rest.

The killed node is then started again (it rejoins as the replica of the promoted one), so that posts
to its slots can be acknowledged again. No sleeps stand in for synchronisation: every wait is on a
condition, under a deadline (the posters pause between posts only to bound the load).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Iterator

import orjson
import pytest

from backends.redis_cluster import RedisClusterUpdatesBackend
from backends.redis_updates import RunUpdateStream
from backends.update_hub import parse_id
from core.errors import BackendUnavailable
from core.settings import Settings
from tests.integration.test_redis_updates import new_run, updates_backend
from tests.support.redis_cluster import LocalCluster, running_cluster
from tests.support.waits import wait_until

pytestmark = pytest.mark.services

GROUPS = 16
RUNS_PER_PRIMARY = 3
POSTERS = 4
POST_PAUSE = 0.01  # between one poster's posts: bounds the load on the 2-core test box, not a wait
DEADLINE = 60.0


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("redis-cluster-failover")) as started:
        yield started


class Flow:
    """Posters over every run until told to stop: what was acknowledged, and what was refused."""

    def __init__(self, backend: RedisClusterUpdatesBackend, runs: list[str]) -> None:
        self.backend = backend
        self.runs = runs
        self.acked: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        self.refused: dict[str, set[str]] = collections.defaultdict(set)
        self.stop = asyncio.Event()
        self._counter = itertools.count()

    def acked_count(self, runs: list[str] | None = None) -> int:
        return sum(len(self.acked[run]) for run in runs or self.runs)

    async def poster(self, offset: int) -> None:
        turn = offset
        while not self.stop.is_set():
            run = self.runs[turn % len(self.runs)]
            turn += 1
            message = f"m{next(self._counter)}"
            try:
                self.acked[run].append((await self.backend.append(run, {"message": message}), message))
            except BackendUnavailable:
                self.refused[run].add(message)  # stored at most once, maybe; never acknowledged
            await asyncio.sleep(POST_PAUSE)

    async def post_until_acked(self, run: str, message: str) -> str:
        async with asyncio.timeout(DEADLINE):
            while True:
                try:
                    return await self.backend.append(run, {"message": message})
                except BackendUnavailable:
                    self.refused[run].add(message)
                    await asyncio.sleep(0.1)  # a client's back-off before retrying


async def read_until(stream: RunUpdateStream, sentinel: str, out: list[tuple[str, str]]) -> None:
    """Collect `(id, message)` of every update until the sentinel message."""
    async with asyncio.timeout(DEADLINE * 2):
        while not out or out[-1][1] != sentinel:
            event = await stream.next(1.0)
            if event is not None:
                name, event_id, data = event
                assert name == "message", event  # never `truncated`: the runs stay within bounds
                out.append((event_id, orjson.loads(data)["message"]))


async def test_a_primary_killed_under_posts_and_open_streams_loses_no_acknowledged_update(
    cluster: LocalCluster,
) -> None:
    settings = Settings(
        backend_timeout_seconds=3,
        redis_cluster=True,
        redis_cluster_groups=GROUPS,
        redis_min_replicas=1,
        redis_wait_timeout_ms=500,
    )
    async with updates_backend(cluster.url, settings=settings) as plain:
        assert isinstance(plain, RedisClusterUpdatesBackend)
        backend = plain
        await backend.topology.refresh()

        def owner(run: str) -> str:
            return backend.topology.owner(backend.keys.stream(run)).name

        by_owner: dict[str, list[str]] = collections.defaultdict(list)
        while len(by_owner) < 3 or min(len(runs) for runs in by_owner.values()) < RUNS_PER_PRIMARY:
            run = new_run()
            if len(by_owner[owner(run)]) < RUNS_PER_PRIMARY:
                by_owner[owner(run)].append(run)
        runs = [run for group in by_owner.values() for run in group]
        victim_name = owner(runs[0])
        victim_runs = by_owner[victim_name]
        victim = next(node for node in cluster.nodes if node.address == victim_name)

        flow = Flow(backend, runs)
        sentinels = {run: f"sentinel-{run}" for run in runs}
        streams = {
            run: [await backend.open_stream(run, after_id=None, since_ms=None, skip_history=False)] for run in runs
        }
        received: dict[str, list[list[tuple[str, str]]]] = {run: [[]] for run in runs}
        cursors: dict[str, list[str | None]] = {run: [None] for run in runs}  # where each stream began
        readers = [asyncio.create_task(read_until(streams[run][0], sentinels[run], received[run][0])) for run in runs]
        posters = [asyncio.create_task(flow.poster(i)) for i in range(POSTERS)]
        try:
            await wait_until(lambda: flow.acked_count(victim_runs) >= 30, DEADLINE, "posts before the kill")
            # Streams opened while posts flow, from the middle of what is stored.
            for run in runs:
                resume_after = flow.acked[run][len(flow.acked[run]) // 2][0]
                stream = await backend.open_stream(run, after_id=resume_after, since_ms=None, skip_history=False)
                streams[run].append(stream)
                cursors[run].append(resume_after)
                received[run].append([])
                readers.append(asyncio.create_task(read_until(stream, sentinels[run], received[run][-1])))

            killed_at = time.monotonic()
            promoted = await asyncio.to_thread(cluster.kill_primary, victim)
            failover_seconds = time.monotonic() - killed_at
            # The hubs of the victim's groups follow the slots to the promoted replica by themselves.
            victim_groups = {backend.keys.group_of_key(backend.keys.stream(run)) for run in victim_runs}

            def followed() -> bool:
                hubs = backend.cluster_hub.hubs
                return all(hubs[g]._node_name == promoted.address and hubs[g].connected for g in victim_groups)

            await wait_until(followed, DEADLINE, "the victim's groups read from the promoted replica")
            others_before = flow.acked_count([r for r in runs if r not in victim_runs])
            await wait_until(
                lambda: flow.acked_count([r for r in runs if r not in victim_runs]) >= others_before + 20,
                DEADLINE,
                "posts to the other primaries go on",
            )

            # The promoted replica has no replica of its own: its posts are refused until the killed
            # node rejoins as one.
            await asyncio.to_thread(cluster.restart, victim)
            victim_acked = flow.acked_count(victim_runs)
            await wait_until(lambda: flow.acked_count(victim_runs) >= victim_acked + 10, DEADLINE, "acknowledged again")
        finally:
            flow.stop.set()
            await asyncio.gather(*posters)
        assert any(flow.refused[run] for run in victim_runs), "the kill never hit a post"

        for run in runs:
            flow.acked[run].append((await flow.post_until_acked(run, sentinels[run]), sentinels[run]))
        try:
            await asyncio.gather(*readers)
        finally:
            for run_streams in streams.values():
                for stream in run_streams:
                    await stream.aclose()

        for run in runs:
            log = [(f"{m['timestamp']}-0", m["message"]) for m in orjson.loads(await backend.read_since(run, 0))]
            assert len(log) < 1000  # nothing trimmed: the log is every stored update
            log = log[: [message for _, message in log].index(sentinels[run]) + 1]
            stored = set(log)
            assert [entry for entry in flow.acked[run] if entry not in stored] == []  # no acknowledged loss
            for got, cursor in zip(received[run], cursors[run], strict=True):
                got_ids = [parse_id(event_id) for event_id, _ in got]
                assert got_ids == sorted(set(got_ids))  # each once, in order
                after = parse_id(cursor) if cursor else (0, 0)
                expected = [entry for entry in log if parse_id(entry[0]) > after]
                assert [entry for entry in expected if entry not in set(got)] == []  # nothing lost
                extra = [message for entry_id, message in got if (entry_id, message) not in stored]
                assert set(extra) <= flow.refused[run]  # only refused posts the failover dropped
            # The stream opened at the start got everything stored.
            assert [entry for entry in log if entry not in set(received[run][0])] == []

            # Resuming by id after the failover: exactly the rest of the log.
            middle = log[len(log) // 2][0]
            resumed = await backend.open_stream(run, after_id=middle, since_ms=None, skip_history=False)
            rest: list[tuple[str, str]] = []
            try:
                await read_until(resumed, sentinels[run], rest)
            finally:
                await resumed.aclose()
            assert rest == log[len(log) // 2 + 1 :]
        assert backend.hub.subscriber_count == 0
        print(
            f"\nfailover: {failover_seconds:.1f}s to promote; acknowledged {flow.acked_count()} posts, "
            f"refused {sum(map(len, flow.refused.values()))}"
        )
