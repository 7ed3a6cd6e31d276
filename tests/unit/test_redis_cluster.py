"""`backends.redis_cluster` without a cluster: the group tags and key names, how a post is sent
to its slot's owner (redirections and NOSCRIPT followed, anything else never sent twice, WAIT
checked), the slot map's bounded reads, and a group hub following its slot to another node,
against fake nodes. The real cluster is `tests/integration/test_redis_cluster_*.py`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, ClassVar, cast

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.crc import key_slot

from backends.redis_cluster import (
    SLOTS,
    BoundedRedisCluster,
    ClusterKeys,
    GroupHub,
    NodeClients,
    Topology,
    append_on_owner,
    group_of,
    group_tags,
)
from core.errors import BackendUnavailable


def slot(key: str) -> int:
    return key_slot(key.encode())


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3, 16, 64, 1000])
def test_group_tags_are_distinct_and_at_the_start_of_equal_slot_ranges(groups: int) -> None:
    tags = group_tags(groups)
    assert len(tags) == len(set(tags)) == groups
    width = max(1, SLOTS // groups // 8)
    for k, tag in enumerate(tags):
        assert 0 <= slot(f"{{{tag}}}") - k * SLOTS // groups < width
        assert "{" not in tag and "}" not in tag


def test_one_group_per_slot_at_most() -> None:
    tags = group_tags(SLOTS * 2)
    assert len(tags) == SLOTS and sorted(slot(f"{{{tag}}}") for tag in tags) == list(range(SLOTS))


def test_tags_and_groups_are_pinned_so_no_release_moves_a_runs_keys() -> None:
    # Changing these would put every run's updates under new key names (lost to readers).
    assert group_tags(64)[:4] == ("g171", "g179", "g402", "g216")
    assert group_tags(1) == ("g2",)
    assert [group_of(run, 64) for run in ["run-1", "0f8fad5b-d9cb-469f-a165-70867728950e", ""]] == [35, 32, 0]


@pytest.mark.parametrize("run_id", ["0f8fad5b-d9cb-469f-a165-70867728950e", "}", "{", "}{x}", "{g1}", "é"])
def test_a_runs_keys_share_its_groups_slot_whatever_its_id(run_id: str) -> None:
    keys = ClusterKeys(64)
    names = keys.append_keys(run_id)
    assert names == [keys.stream(run_id), keys.marker(run_id), keys.stored_bytes(run_id)]
    assert len(set(names)) == 3
    group = group_of(run_id, 64)
    assert {slot(name) for name in names} == {slot(keys.group_key(group))}
    assert all(keys.group_of_key(name) == group for name in names)
    assert names[0] == f"wfr:updates:{{{keys.tags[group]}}}:{run_id}"


def test_runs_spread_over_every_group() -> None:
    keys = ClusterKeys(64)
    counts = [0] * 64
    for i in range(6400):
        counts[keys.group_of_key(keys.stream(str(uuid.UUID(int=i * 7919))))] += 1
    assert min(counts) > 50 and max(counts) < 160


# -- posts --------------------------------------------------------------------------------------


class FakeNode(ClusterNode):
    """Answers each pipeline with the next scripted replies (an exception raised: the send failed)."""

    def __init__(self, port: int, replies: list[list[Any] | BaseException]) -> None:
        super().__init__("127.0.0.1", port)
        self.replies = replies
        self.pipelines: list[list[tuple[Any, ...]]] = []
        self.commands: list[tuple[Any, ...]] = []

    async def execute_pipeline(self, commands: list[PipelineCommand]) -> bool:
        self.pipelines.append([tuple(command.args) for command in commands])
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        for command, result in zip(commands, reply, strict=True):
            command.result = result
        return any(isinstance(result, Exception) for result in reply)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.commands.append(args)
        return b"sha"


class FakeClusterClient:
    """What `Topology` asks of the cluster client to read the slot map: each read (the first set-up,
    or a re-read) is counted, and answers once `answer` is set (never, if it stays unset)."""

    def __init__(self, *, answers: bool = True) -> None:
        self.reads = 0
        self.started = asyncio.Event()  # set by the first read
        self.answer = asyncio.Event()
        if answers:
            self.answer.set()
        self.nodes_manager = self  # a re-read is `nodes_manager.initialize()`

    async def initialize(self) -> FakeClusterClient:
        self.reads += 1
        self.started.set()
        await self.answer.wait()
        return self


class FakeTopology(Topology):
    """The slot map's real reads (shared, bounded) over a fake client; owners and the bound on
    calls faked."""

    def __init__(self, nodes: dict[str, FakeNode], owner: str, client: FakeClusterClient, timeout: float) -> None:
        super().__init__(cast(BoundedRedisCluster, client), timeout=timeout)
        self.fake = client
        self.nodes = nodes
        self.current = owner
        self.in_flight = 0

    @property
    def refreshes(self) -> int:
        return self.fake.reads

    def owner(self, key: str) -> ClusterNode:
        return self.nodes[self.current]

    async def moved(self, exc: redis_errors.AskError) -> None:
        self.current = f"{exc.host}:{exc.port}"

    def node_at(self, host: str, port: int) -> ClusterNode | None:
        return self.nodes.get(f"{host}:{port}")

    async def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


KEYS = ["wfr:updates:{g2}:r", "wfr:updates-trimmed:{g2}:r", "wfr:updates-bytes:{g2}:r"]


def topology(*nodes: FakeNode, client: FakeClusterClient | None = None, timeout: float = 5.0) -> FakeTopology:
    top = FakeTopology({node.name: node for node in nodes}, nodes[0].name, client or FakeClusterClient(), timeout)
    top.stale = client is not None  # read already, unless the test brings its own client
    return top


async def post(top: FakeTopology, min_replicas: int = 1) -> Any:
    return await append_on_owner(
        top, "sha", KEYS, [b"json", 1000, 60, 99], min_replicas=min_replicas, wait_timeout_ms=500
    )


async def test_a_post_is_the_script_then_wait_on_one_connection_of_the_owner() -> None:
    node = FakeNode(7000, [[b"1-0", 1]])
    top = topology(node)
    assert await post(top) == b"1-0"
    assert node.pipelines == [[("EVALSHA", "sha", 3, *KEYS, b"json", 1000, 60, 99), ("WAIT", 1, 500)]]
    assert top.in_flight == 0


async def test_without_min_replicas_no_wait_is_sent() -> None:
    node = FakeNode(7000, [[b"1-0"]])
    assert await post(topology(node), min_replicas=0) == b"1-0"
    assert [command[0] for command in node.pipelines[0]] == ["EVALSHA"]


async def test_noscript_loads_the_script_and_sends_again() -> None:
    node = FakeNode(7000, [[redis_errors.NoScriptError("NOSCRIPT"), 0], [b"2-0", 1]])
    assert await post(topology(node)) == b"2-0"
    assert node.commands[0][:2] == ("SCRIPT", "LOAD") and len(node.pipelines) == 2


async def test_moved_follows_the_slot_to_its_new_owner() -> None:
    old = FakeNode(7000, [[redis_errors.MovedError("3999 127.0.0.1:7001"), 0]])
    new = FakeNode(7001, [[b"3-0", 1]])
    top = topology(old, new)
    assert await post(top) == b"3-0"
    assert len(old.pipelines) == len(new.pipelines) == 1


async def test_ask_sends_asking_first_to_the_migration_target() -> None:
    old = FakeNode(7000, [[redis_errors.AskError("3999 127.0.0.1:7001"), 0]])
    new = FakeNode(7001, [[b"OK", b"4-0", 1]])
    assert await post(topology(old, new)) == b"4-0"
    assert [command[0] for command in new.pipelines[0]] == ["ASKING", "EVALSHA", "WAIT"]


async def test_fewer_replicas_than_asked_is_unavailable_and_not_sent_again() -> None:
    node = FakeNode(7000, [[b"5-0", 0]])
    with pytest.raises(BackendUnavailable):
        await post(topology(node))
    assert len(node.pipelines) == 1


@pytest.mark.parametrize("failure", ["raised", "replied"])
async def test_a_connection_lost_after_sending_is_never_sent_again_and_the_map_is_reread(failure: str) -> None:
    lost = redis_errors.ConnectionError("Connection closed by server.")
    node = FakeNode(7000, [lost if failure == "raised" else [lost, lost]])
    top = topology(node)
    with pytest.raises(redis_errors.ConnectionError):
        await post(top)
    assert len(node.pipelines) == 1 and top.stale and top.in_flight == 0
    node.replies.append([b"6-0", 1])
    assert await post(top) == b"6-0" and top.refreshes == 1  # the next post re-reads the slot map first


async def test_a_script_error_is_raised_as_it_came() -> None:
    node = FakeNode(7000, [[redis_errors.ResponseError("Error running script: @user_script:1: -OOM full "), 0]])
    with pytest.raises(redis_errors.ResponseError, match="OOM"):
        await post(topology(node))
    assert len(node.pipelines) == 1


async def test_endless_redirections_give_up() -> None:
    moved = redis_errors.MovedError("3999 127.0.0.1:7000")
    node = FakeNode(7000, [[moved, 0], [moved, 0], [moved, 0]])
    with pytest.raises(redis_errors.ClusterError):
        await post(topology(node))
    assert len(node.pipelines) == 3


# -- the slot map ---------------------------------------------------------------------------------


async def test_concurrent_posts_on_a_stale_map_share_one_read_of_it() -> None:
    client = FakeClusterClient(answers=False)
    node = FakeNode(7000, [[b"1-0", 1] for _ in range(10)])
    top = topology(node, client=client)
    posts = [asyncio.create_task(post(top)) for _ in range(10)]
    await client.started.wait()  # the one read is under way, every post waiting for it
    client.answer.set()
    assert await asyncio.gather(*posts) == [b"1-0"] * 10
    assert client.reads == 1 and not top.stale and len(node.pipelines) == 10


async def test_a_map_no_node_answers_is_unavailable_within_the_timeout_for_every_waiting_post() -> None:
    client = FakeClusterClient(answers=False)  # its nodes never answer: only the deadline ends the read
    node = FakeNode(7000, [])
    top = topology(node, client=client, timeout=0.05)
    failures = await asyncio.gather(*(post(top) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(failure, BackendUnavailable) and failure.backend == "redis" for failure in failures)
    assert client.reads == 1  # not one read per post
    assert node.pipelines == [] and top.stale
    # The next post reads the map again (a failure is not kept), and fails the same way.
    with pytest.raises(BackendUnavailable):
        await post(top)
    assert client.reads == 2


async def test_a_post_that_gives_up_leaves_the_shared_read_to_the_others() -> None:
    client = FakeClusterClient(answers=False)
    node = FakeNode(7000, [[b"1-0", 1]])
    top = topology(node, client=client)
    leaving = asyncio.create_task(post(top))
    await client.started.wait()
    staying = asyncio.create_task(post(top))
    leaving.cancel()  # its client left
    with pytest.raises(asyncio.CancelledError):
        await leaving
    client.answer.set()
    assert await staying == b"1-0"
    assert client.reads == 1


# -- a group hub following its slot ---------------------------------------------------------------


class FakeReader:
    """A hub's reader connection to one node: its `CLIENT ID` there, XREADs failing with `fails`
    in turn and then blocking (`blocked` set) until the hub stops it; whether it was closed, and
    its connection with it."""

    def __init__(self, client_id: int, fails: list[Exception]) -> None:
        self.id = client_id
        self.fails = fails
        self.blocked = asyncio.Event()
        self.released = False  # handed its connection back to its pool
        self.disconnected = False  # the connection itself closed
        self.connection_pool = self

    async def client_id(self) -> int:
        return self.id

    # The hub packs its XREAD itself and sends it on the reader's one connection (this fake).
    response_callbacks: ClassVar[dict[str, Any]] = {"XREAD": lambda response: response}

    async def initialize(self) -> FakeReader:
        return self

    @property
    def connection(self) -> FakeReader:
        return self

    async def send_packed_command(self, command: bytes) -> None:
        assert command.startswith(b"*") and b"$5\r\nXREAD\r\n" in command

    async def read_response(self) -> Any:
        if self.fails:
            raise self.fails.pop(0)
        self.blocked.set()
        await asyncio.Event().wait()  # blocked: only the hub's close ends it

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.released = True
        if close_connection_pool:
            self.disconnected = True

    async def disconnect(self) -> None:
        self.disconnected = True


class FakeCommands:
    """One node's pool for the hub's other commands: the feeds it resolved, the ids it unblocked."""

    def __init__(self) -> None:
        self.resolved: list[str] = []
        self.unblocked: list[int] = []

    async def xrevrange(self, key: str, *args: Any, count: int) -> list[Any]:
        self.resolved.append(key)
        return []

    async def client_unblock(self, client_id: int) -> bool:
        self.unblocked.append(client_id)
        return True


class FakeClients:
    """`NodeClients` over fake nodes: each node numbers its clients itself (`ids`); `next[node]` is
    the reader the hub gets next for that node (its XREADs failing with that node's `fails`)."""

    def __init__(self, ids: dict[str, int], fails: dict[str, list[Exception]] | None = None) -> None:
        self.ids = ids
        self.next = {name: FakeReader(client_id, (fails or {}).get(name, [])) for name, client_id in ids.items()}
        self.readers: list[FakeReader] = []
        self.pools: dict[str, FakeCommands] = {}

    def reader(self, node: ClusterNode) -> Redis:
        reader = self.next.pop(node.name, None) or FakeReader(self.ids[node.name], [])
        self.readers.append(reader)
        return cast(Redis, reader)

    def commands(self, node: ClusterNode) -> Redis:
        return cast(Redis, self.pools.setdefault(node.name, FakeCommands()))


A, B = "127.0.0.1:7000", "127.0.0.1:7001"
GROUP_KEY = "{g2}"


def group_hub(top: FakeTopology, clients: FakeClients) -> GroupHub:
    node = top.owner(GROUP_KEY)
    return GroupHub(top, cast(NodeClients, clients), GROUP_KEY, node=node, timeout=5.0, queue_bytes=10_000)


async def test_a_hub_whose_slot_moved_reads_from_the_new_owner_and_closes_the_old_reader() -> None:
    top = topology(FakeNode(7000, []), FakeNode(7001, []))
    # Client ids are per node: 7 on B is some other client's connection.
    clients = FakeClients({A: 7, B: 3}, fails={A: [redis_errors.MovedError(f"3999 {B}", status_code="MOVED")]})
    old, new = clients.next[A], clients.next[B]
    hub = group_hub(top, clients)
    try:
        first = await hub.subscribe(KEYS[0])
        await new.blocked.wait()  # the reader task followed by itself (after its backoff)
        assert clients.readers == [old, new]
        assert old.released and old.disconnected  # closed at once, connection included
        assert not new.disconnected
        await hub.subscribe(KEYS[1])  # a new feed wakes the reader where it is blocked, by its id there
        assert clients.pools[B].unblocked == [3] and clients.pools[A].unblocked == []
        assert clients.pools[B].resolved == [KEYS[1]] and not first.closed
    finally:
        await hub.close()
    assert new.disconnected  # the reader's connection closes with the hub


async def test_no_wake_is_sent_while_the_reader_is_on_a_node_that_no_longer_owns_the_group() -> None:
    top = topology(FakeNode(7000, []), FakeNode(7001, []))
    clients = FakeClients({A: 7, B: 3})
    reader = clients.next[A]
    hub = group_hub(top, clients)
    try:
        await hub.subscribe(KEYS[0])
        await reader.blocked.wait()  # XREAD BLOCK on A, as client 7 there
        top.current = B  # a post followed the group's slot to B; the reader has not read since
        await hub.subscribe(KEYS[1])
        assert clients.pools[B].resolved == [KEYS[1]]  # the new feed starts from the slot's owner
        assert clients.pools[B].unblocked == []  # client 7 of B is not the reader
        # Nor is A asked (it may be down): its read ends by itself once it has lost the slot.
        assert clients.pools[A].unblocked == []
        top.current = A  # the slot is A's after all: a wake reaches the reader there again
        await hub.subscribe(KEYS[2])
        assert clients.pools[A].unblocked == [7] and clients.pools[B].unblocked == []
    finally:
        await hub.close()
