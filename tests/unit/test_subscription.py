"""`Subscription`, the hub's per-stream queue: waits, wakes and deadlines without Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from backends.update_hub import Subscription


async def test_get_returns_none_after_the_wait() -> None:
    sub = Subscription("k", 10)
    started = time.monotonic()
    assert await sub.get(0.05) is None
    assert time.monotonic() - started >= 0.045


async def test_a_delivery_wakes_a_waiting_get() -> None:
    sub = Subscription("k", 10)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, sub._deliver, ((1, 0), b"{}"))
    async with asyncio.timeout(1):
        assert await sub.get(30.0) == ((1, 0), b"{}")


async def test_an_earlier_timer_left_from_a_longer_wait_does_not_end_a_later_wait_early() -> None:
    sub = Subscription("k", 10)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, sub._deliver, ((1, 0), b"a"))
    assert await sub.get(0.05) == ((1, 0), b"a")  # leaves its timer armed
    started = time.monotonic()
    assert await sub.get(0.1) is None  # the old timer fires first: the wait goes on to its end
    assert time.monotonic() - started >= 0.095


async def test_a_shorter_wait_re_arms_the_timer() -> None:
    sub = Subscription("k", 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await sub.get(30.0)  # cancelled: its 30 s timer stays armed
    started = time.monotonic()
    assert await sub.get(0.05) is None
    assert time.monotonic() - started < 1.0


async def test_close_wakes_the_waiter_and_drops_the_timer() -> None:
    sub = Subscription("k", 10)
    asyncio.get_running_loop().call_later(0.01, sub._close, "overflow")
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(1):
            await sub.get(30.0)
    assert sub._timer is None


async def test_a_full_queue_refuses_the_delivery() -> None:
    sub = Subscription("k", 1)
    assert sub._deliver(((1, 0), b"a"))
    assert not sub._deliver(((2, 0), b"b"))
    assert await sub.get(0) == ((1, 0), b"a")


def test_redis_failures_that_mean_unavailable() -> None:
    from redis import exceptions as redis_errors

    from backends.update_hub import unavailable

    assert unavailable(redis_errors.ConnectionError("refused"))
    assert unavailable(redis_errors.InvalidResponse("Protocol Error: reply cut short"))
    assert unavailable(redis_errors.ResponseError("LOADING Redis is loading the dataset in memory"))
    assert not unavailable(redis_errors.ResponseError("ERR wrong number of arguments"))
    # seen as a 500 under a Redis SIGKILL (tests/integration/test_faults.py): uvloop's write on a
    # transport Redis had just closed
    closed = "unable to perform operation on <TCPTransport closed=True reading=False>; the handler is closed"
    assert unavailable(RuntimeError(closed))
    assert not unavailable(RuntimeError("some other bug"))


# -- the sink: entries handed over while `get` waits ----------------------------------------------


def taking(taken: list[object]) -> Callable[[tuple[tuple[int, int], bytes]], bool]:
    def take(entry: tuple[tuple[int, int], bytes]) -> bool:
        taken.append(entry)
        return True

    return take


async def wait_with(sub: Subscription, sink: Callable[[tuple[tuple[int, int], bytes]], bool]) -> asyncio.Task[Any]:
    """`sub.get` waiting with `sink`, in a task that has reached its wait."""
    task = asyncio.create_task(sub.get(30.0, sink))
    await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait
    assert sub._waiter is not None
    return task


async def test_while_get_waits_entries_go_to_the_sink_without_waking_it() -> None:
    sub = Subscription("k", 10)
    taken: list[object] = []
    task = await wait_with(sub, taking(taken))
    first, second = ((1, 0), b"a"), ((2, 0), b"b")
    assert sub._deliver(first) and sub._deliver(second)
    assert taken == [first, second]
    assert taken[0] is first  # the hub's entry itself, shared by every subscriber
    assert not sub._queue and sub._waiter is not None and not sub._waiter.done()  # nobody woken
    sub._close("unsubscribed")
    with pytest.raises(StopAsyncIteration):
        await task
    assert sub._sink is None


async def test_an_entry_the_sink_refuses_is_returned_and_the_later_ones_queue_behind_it() -> None:
    sub = Subscription("k", 10)
    offered: list[object] = []

    def refuse(entry: object) -> bool:
        offered.append(entry)
        return False

    task = await wait_with(sub, refuse)
    assert sub._deliver(((1, 0), b"a")) and sub._deliver(((2, 0), b"b"))
    assert offered == [((1, 0), b"a")]  # not offered again until the consumer waits again: order kept
    assert await task == ((1, 0), b"a")
    assert await sub.get(0, refuse) == ((2, 0), b"b")  # a queued entry is returned, never offered
    assert offered == [((1, 0), b"a")]


async def test_a_failing_sink_loses_nothing() -> None:
    sub = Subscription("k", 10)

    def broken(entry: object) -> bool:
        raise RuntimeError("a bug in the sink")

    task = await wait_with(sub, broken)
    assert sub._deliver(((1, 0), b"a"))
    assert await task == ((1, 0), b"a")
    offered: list[object] = []
    task = await wait_with(sub, taking(offered))  # a stream whose sink failed once waits on as before
    assert sub._deliver(((2, 0), b"b"))
    assert await task == ((2, 0), b"b") and offered == []


async def test_the_sink_is_offered_nothing_once_get_returned() -> None:
    sub = Subscription("k", 10)
    taken: list[object] = []
    assert await sub.get(0, taking(taken)) is None
    assert sub._deliver(((1, 0), b"a"))
    assert taken == [] and await sub.get(0) == ((1, 0), b"a")
