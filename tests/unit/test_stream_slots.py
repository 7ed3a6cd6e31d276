"""`StreamLimiter.take` with a shared count (`SHARED_STREAM_LIMITS`), on a fake `StreamSlots`: the
local counts first, the shared refusal and a shared store down leave nothing held, and a slot
gives its shared place back exactly once. The Redis implementation is tested on a real Redis in
tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

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
