"""`Subscription`, the hub's per-stream queue: waits, wakes and deadlines without Redis."""

from __future__ import annotations

import asyncio
import time

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
    loop.call_later(0.01, sub._deliver, (1, 0), b"{}")
    async with asyncio.timeout(1):
        assert await sub.get(30.0) == ((1, 0), b"{}")


async def test_an_earlier_timer_left_from_a_longer_wait_does_not_end_a_later_wait_early() -> None:
    sub = Subscription("k", 10)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, sub._deliver, (1, 0), b"a")
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
    assert sub._deliver((1, 0), b"a")
    assert not sub._deliver((2, 0), b"b")
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
