"""`StreamLimiter.take` with a shared count (`SHARED_STREAM_LIMITS`), on a fake `StreamSlots`: the
local counts first, the shared refusal and a shared store down leave nothing held, and a slot
gives its shared place back exactly once. Then `RedisStreamSlots` over a fake cluster client: the
slot map read once for every first opening, and within the timeout; `close` bounded. The Redis
implementation is tested on a real Redis in tests/integration/test_workers.py (and on a real
cluster in tests/integration/test_redis_cluster_updates.py)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT

from backends.redis_stream_slots import RedisStreamSlots
from core.errors import BackendUnavailable, TooManyRequests
from core.principals import Principal
from core.protocols import StreamSlots
from handlers.stream_limits import StreamLimiter

ALICE = Principal(user_id="alice", project_id="p1")
BOB = Principal(user_id="bob", project_id="p1")


@dataclass
class FakeSlots:
    """A shared count in memory, as every process would see it; `down` makes it unreachable and
    `gate` holds every acquire until it is set."""

    held: dict[str, list[str]] = field(default_factory=dict)
    asked: int = 0
    released: list[tuple[str, str]] = field(default_factory=list)
    down: bool = False
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def acquire(self, owner: str, limit: int) -> str | None:
        self.asked += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise BackendUnavailable("down", backend="redis")
        ids = self.held.setdefault(owner, [])
        if len(ids) >= limit:
            return None
        ids.append(f"slot-{self.asked}")
        return ids[-1]

    def release(self, owner: str, slot_id: str) -> None:
        self.released.append((owner, slot_id))
        self.held[owner].remove(slot_id)

    async def close(self) -> None:
        pass


def limiter(shared: StreamSlots | None, *, per_principal: int = 1, per_process: int = 10) -> StreamLimiter:
    return StreamLimiter(per_principal=per_principal, per_process=per_process, shared=shared)


async def test_without_a_shared_count_take_is_the_local_acquire() -> None:
    limits = limiter(None)
    slot = await limits.take(ALICE)
    with pytest.raises(TooManyRequests):
        await limits.take(ALICE)
    slot.release()
    assert limits.open_streams == 0


async def test_a_caller_at_the_shared_limit_is_refused_and_holds_nothing_here() -> None:
    shared = FakeSlots()
    # Another process holds alice's one stream.
    other_process = limiter(shared)
    there = await other_process.take(ALICE)
    limits = limiter(shared)
    with pytest.raises(TooManyRequests) as refused:
        await limits.take(ALICE)
    assert "limit per caller" in str(refused.value) and refused.value.retry_after > 0
    assert limits.open_streams == 0  # the local slot taken first was given back
    assert (await limits.take(BOB)).released is False  # another caller is not affected
    there.release()
    assert (await limits.take(ALICE)).released is False  # her place is free everywhere again


async def test_the_local_counts_refuse_before_asking_the_shared_one() -> None:
    shared = FakeSlots()
    limits = limiter(shared, per_principal=5, per_process=1)
    held = await limits.take(ALICE)
    asked = shared.asked
    with pytest.raises(TooManyRequests) as refused:
        await limits.take(BOB)
    assert "This server has 1 update streams open" in str(refused.value)
    assert shared.asked == asked  # no round trip for a refusal this process can tell alone
    held.release()


async def test_a_shared_count_that_is_down_is_backend_unavailable_and_holds_nothing() -> None:
    limits = limiter(FakeSlots(down=True))
    with pytest.raises(BackendUnavailable):
        await limits.take(ALICE)
    assert limits.open_streams == 0


async def test_a_slot_gives_its_shared_place_back_once() -> None:
    shared = FakeSlots()
    limits = limiter(shared)
    slot = await limits.take(ALICE)
    slot.release()
    slot.release()
    assert len(shared.released) == 1
    assert shared.held[StreamLimiter.shared_owner(StreamLimiter.owner_of(ALICE))] == []


async def test_a_slot_dropped_without_release_gives_its_shared_place_back() -> None:
    shared = FakeSlots()
    limits = limiter(shared)
    slot = await limits.take(ALICE)
    del slot  # a response built but never sent
    assert len(shared.released) == 1 and limits.open_streams == 0


async def test_an_opening_cancelled_while_asking_the_shared_count_holds_nothing_here() -> None:
    shared = FakeSlots(gate=asyncio.Event())
    limits = limiter(shared)
    opening = asyncio.create_task(limits.take(ALICE))
    await shared.entered.wait()  # the opening holds its local slot and waits on the shared count
    assert limits.open_streams == 1
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    assert limits.open_streams == 0


def test_owners_are_named_unambiguously_in_the_shared_count() -> None:
    # A project id and a ref that would run together as plain text stay apart.
    assert StreamLimiter.shared_owner(("a:b", "c")) != StreamLimiter.shared_owner(("a", "b:c"))
    assert StreamLimiter.shared_owner((None, "user:x")) != StreamLimiter.shared_owner(("None", "user:x"))


# -- RedisStreamSlots on a cluster, over a fake client ------------------------------------------------


class Utf8:
    def encode(self, value: str) -> bytes:
        return value.encode()


class FakeClusterClient(RedisCluster):
    """What `RedisStreamSlots` asks of a cluster client, without a cluster: the slot map's reads
    (counted; each answers once `answer` is set, never if it stays unset), takes that succeed,
    and give-backs (`ZREM`) that answer once `give_back` is set."""

    def __init__(self, *, answers: bool = True, gives_back: bool = True) -> None:  # nothing to connect
        self.reads = 0
        self.started = asyncio.Event()  # set by the first read of the map
        self.answer = asyncio.Event()
        self.give_back = asyncio.Event()
        for event, is_set in ((self.answer, answers), (self.give_back, gives_back)):
            if is_set:
                event.set()
        self.sent: list[tuple[EncodableT, ...]] = []
        self.given_back: list[str] = []
        self.give_backs_cancelled = 0
        self.closed = False

    def get_encoder(self) -> Any:
        return Utf8()  # what a registered script asks of it for its SHA

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        self.reads += 1
        self.started.set()
        await self.answer.wait()
        return self

    async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
        self.sent.append(args)
        if args[0] == "ZREM":
            try:
                await self.give_back.wait()
            except asyncio.CancelledError:
                self.give_backs_cancelled += 1
                raise
            self.given_back.extend(str(slot_id) for slot_id in args[2:])
            return len(args) - 2
        return 1  # EVALSHA of the take: taken

    async def aclose(self) -> None:
        self.closed = True

    @property
    def takes(self) -> int:
        return sum(1 for command in self.sent if command[0] == "EVALSHA")


async def test_concurrent_first_openings_on_a_cluster_share_one_read_of_the_slot_map() -> None:
    client = FakeClusterClient(answers=False)
    slots = RedisStreamSlots(client, timeout=5.0)
    openings = [asyncio.create_task(slots.acquire(f"caller-{i}", 1)) for i in range(10)]
    await client.started.wait()  # the one read is under way, every opening waiting for it
    client.answer.set()
    taken = await asyncio.gather(*openings)
    assert all(taken) and client.reads == 1 and client.takes == 10
    assert await slots.acquire("caller-x", 1) is not None
    assert client.reads == 1  # read once: later openings do not read it again
    await slots.close()


async def test_a_slot_map_no_node_answers_is_unavailable_within_the_timeout_for_every_opening() -> None:
    client = FakeClusterClient(answers=False)  # its nodes never answer: only the deadline ends the read
    slots = RedisStreamSlots(client, timeout=0.05)
    failures = await asyncio.gather(*(slots.acquire(f"caller-{i}", 1) for i in range(10)), return_exceptions=True)
    assert all(isinstance(failure, BackendUnavailable) and failure.backend == "redis" for failure in failures)
    assert all("unavailable" in str(failure) for failure in failures)  # fixed text, not Redis' words
    assert client.reads == 1  # not one read per opening
    assert client.takes == 0 and slots.held == 0
    # The next opening reads the map again (a failure is not kept); once it answers, it opens.
    client.answer.set()
    assert await slots.acquire("caller-0", 1) is not None
    assert client.reads == 2
    await slots.close()


async def test_close_gives_back_every_slot_still_held() -> None:
    client = FakeClusterClient()
    slots = RedisStreamSlots(client, timeout=5.0)
    held = {await slots.acquire("alice", 2), await slots.acquire("bob", 2)}
    await slots.close()
    assert set(client.given_back) == held and client.give_backs_cancelled == 0
    assert slots.held == 0 and client.closed


async def test_close_waits_a_bounded_time_for_give_backs_and_leaves_the_rest_to_their_leases() -> None:
    client = FakeClusterClient(gives_back=False)  # Redis never answers a ZREM
    # The renewal period is far beyond the wait: close must not wait for it.
    slots = RedisStreamSlots(client, timeout=0.05, renew_seconds=29.0)
    assert await slots.acquire("alice", 1) is not None
    await slots.close()
    # The give-back was sent, then cancelled at the close's bound; the slot's lease ends it.
    assert [command[0] for command in client.sent] == ["EVALSHA", "ZREM"]
    assert client.give_backs_cancelled == 1 and client.given_back == []
    assert slots.held == 0 and client.closed
