"""`backends.redis_batch.ScriptBatcher` against a fake client: what is sent together, in which
order, what each caller gets back, and what is never sent (twice, or at all). The real Redis is
`tests/integration/test_redis_updates.py`."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Any, cast

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from backends.redis_batch import ScriptBatcher, stored
from backends.redis_updates import check_replicated
from backends.update_hub import unavailable
from core.errors import BackendUnavailable

SHA = "0" * 40


class FakeConnection:
    """Runs `EVALSHA` as "store the first argument" and `WAIT` as `acknowledged`, one reply read
    at a time, as a redis-py connection does."""

    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.replies: list[Any] = []
        self.socket_timeout: float | None = client.socket_timeout
        self.disconnected = False

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return list(commands)

    async def send_packed_command(self, commands: list[tuple[Any, ...]]) -> None:
        self.client.sent.append(commands)
        if self.client.fail_send:
            self.client.fail_send = False
            raise redis_errors.ConnectionError("connection lost")
        self.replies = [self.client.reply(command) for command in commands]

    async def read_response(self) -> Any:
        await asyncio.sleep(0)  # a round trip: other callers run meanwhile
        if self.client.stall_after == 0:
            try:
                await asyncio.Event().wait()  # Redis stops answering
            except BaseException:
                self.disconnected = True  # as redis-py does on any error in a read
                raise
        if self.client.stall_after is not None:
            self.client.stall_after -= 1
        if self.client.fail_after is not None and self.client.fail_after == 0:
            self.client.fail_after = None
            raise redis_errors.ConnectionError("connection lost")
        if self.client.fail_after is not None:
            self.client.fail_after -= 1
        reply = self.replies.pop(0)
        if isinstance(reply, redis_errors.ResponseError):
            raise reply
        return reply


class FakePool:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.gate: asyncio.Event | None = None  # when set: connections wait for it (a busy pool)
        self.waiting = asyncio.Event()  # someone waits at the gate
        self.in_use = 0

    async def get_connection(self) -> FakeConnection:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        self.in_use += 1
        return FakeConnection(self.client)

    async def release(self, connection: FakeConnection) -> None:
        self.in_use -= 1


class FakeClient:
    def __init__(self) -> None:
        self.connection_pool = FakePool(self)
        self.sent: list[list[tuple[Any, ...]]] = []  # each pipeline's commands
        self.loaded = True
        self.loads = 0
        self.fail_send = False
        self.fail_after: int | None = None  # replies read before the connection fails
        self.refuse: set[bytes] = set()  # arguments Redis answers with an error (as a full Redis does)
        self.lose_scripts_at: bytes | None = None  # Redis loses its scripts before running this one
        self.acknowledged = 1
        self.socket_timeout: float | None = None
        self.stall_after: int | None = None  # replies answered before Redis stops answering

    async def script_load(self, source: str) -> str:
        self.loads += 1
        self.loaded = True
        return SHA

    def reply(self, command: tuple[Any, ...]) -> Any:
        if command[0] == "WAIT":
            return self.acknowledged
        argument = command[3 + command[2]]
        if argument == self.lose_scripts_at:
            self.loaded = False
        if not self.loaded:
            return redis_errors.NoScriptError("No matching script. Please use EVAL.")
        if argument in self.refuse:
            return redis_errors.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        return b"stored:" + argument


def batcher(client: FakeClient, **kwargs: Any) -> ScriptBatcher:
    kwargs.setdefault("check", stored)
    return ScriptBatcher(cast(Redis, client), "return 1", SHA, **kwargs)


def post(appends: ScriptBatcher, value: bytes) -> Any:
    return appends([f"key:{value.decode()}"], [value])


def values(commands: list[tuple[Any, ...]]) -> list[Any]:
    return [command[4] if command[0] == "EVALSHA" else command[0] for command in commands]


async def test_posts_asked_in_one_turn_go_out_as_one_pipeline_in_order_each_with_its_own_reply() -> None:
    client = FakeClient()
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(10)))
    assert replies == [b"stored:%d" % i for i in range(10)]
    assert [values(sent) for sent in client.sent] == [[b"%d" % i for i in range(10)]]
    assert client.connection_pool.in_use == 0


async def test_a_lone_post_is_its_script_call_alone() -> None:
    client = FakeClient()
    appends = batcher(client)
    assert await post(appends, b"a") == b"stored:a"
    assert await post(appends, b"b") == b"stored:b"
    assert client.sent == [[("EVALSHA", SHA, 1, "key:a", b"a")], [("EVALSHA", SHA, 1, "key:b", b"b")]]


async def test_an_error_for_one_post_is_that_posts_alone() -> None:
    client = FakeClient()
    client.refuse = {b"2"}
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(4)), return_exceptions=True)
    assert replies[:2] == [b"stored:0", b"stored:1"] and replies[3] == b"stored:3"
    assert isinstance(replies[2], redis_errors.ResponseError) and "OOM" in str(replies[2])


async def test_a_connection_lost_partway_fails_only_the_posts_not_answered_yet() -> None:
    client = FakeClient()
    client.fail_after = 2
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(5)), return_exceptions=True)
    assert replies[:2] == [b"stored:0", b"stored:1"]
    failed = replies[2:]
    assert all(isinstance(reply, redis_errors.ConnectionError) for reply in failed)
    assert len({id(reply) for reply in failed}) == 3  # each caller raises an error of its own
    assert len(client.sent) == 1  # nothing was sent again


async def test_a_connection_lost_on_writing_fails_that_pipeline_and_no_other() -> None:
    client = FakeClient()
    appends = batcher(client)
    client.fail_send = True
    first = [asyncio.ensure_future(post(appends, b"a%d" % i)) for i in range(3)]
    await asyncio.sleep(0)  # these are waiting for the turn to end; the next ones form another pipeline
    await asyncio.sleep(0)
    second = [asyncio.ensure_future(post(appends, b"b%d" % i)) for i in range(3)]
    done = await asyncio.gather(*first, *second, return_exceptions=True)
    assert all(isinstance(reply, redis_errors.ConnectionError) for reply in done[:3])
    assert len({id(reply) for reply in done[:3]}) == 3
    assert done[3:] == [b"stored:b0", b"stored:b1", b"stored:b2"]
    assert len(client.sent) == 2


async def test_a_redis_that_stops_answering_holds_the_batch_one_timeout_not_one_per_post() -> None:
    client = FakeClient()
    client.socket_timeout = 0.05
    client.stall_after = 1
    appends = batcher(client)
    async with asyncio.timeout(30):  # without the batch's bound this would wait for ever: fail instead
        replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(30)), return_exceptions=True)
    assert replies[0] == b"stored:0"
    assert all(isinstance(reply, TimeoutError) and unavailable(reply) for reply in replies[1:])
    assert len(client.sent) == 1


@pytest.mark.parametrize("count", [1, 5])
async def test_noscript_for_the_whole_pipeline_loads_the_script_and_sends_it_once_more(count: int) -> None:
    client = FakeClient()
    client.loaded = False
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(count)))
    assert replies == [b"stored:%d" % i for i in range(count)]
    assert client.loads == 1 and len(client.sent) == 2


async def test_noscript_twice_is_a_503_for_the_caller_not_a_third_send() -> None:
    client = FakeClient()
    client.loaded = False
    client.script_load = _load_nothing(client)  # type: ignore[method-assign]
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(reply, redis_errors.ConnectionError) and unavailable(reply) for reply in replies)
    assert len(client.sent) == 2


async def test_scripts_lost_partway_are_a_503_for_the_posts_not_run_never_resent_after_later_ones() -> None:
    client = FakeClient()
    client.lose_scripts_at = b"1"
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(3)), return_exceptions=True)
    assert replies[0] == b"stored:0"
    assert all(isinstance(reply, redis_errors.ConnectionError) and unavailable(reply) for reply in replies[1:])
    assert len(client.sent) == 1 and client.loads == 0


def _load_nothing(client: FakeClient) -> Any:
    async def load(source: str) -> str:
        client.loads += 1
        return SHA

    return load


async def test_a_caller_gone_before_its_connection_was_ready_is_not_sent() -> None:
    client = FakeClient()
    client.connection_pool.gate = asyncio.Event()  # every connection is busy
    appends = batcher(client)
    kept = asyncio.ensure_future(post(appends, b"kept"))
    gone = asyncio.ensure_future(post(appends, b"gone"))
    await client.connection_pool.waiting.wait()  # the pipeline has formed and waits for a connection
    gone.cancel()
    client.connection_pool.gate.set()
    assert await kept == b"stored:kept"
    assert [values(sent) for sent in client.sent] == [[b"kept"]]


async def test_a_pipeline_is_bounded_in_posts_and_in_bytes_past_its_first() -> None:
    client = FakeClient()
    appends = batcher(client, max_batch=4, max_bytes=10)
    await asyncio.gather(*(post(appends, b"%d" % i) for i in range(9)))
    assert [len(sent) for sent in client.sent] == [4, 4, 1]
    client.sent.clear()
    await asyncio.gather(post(appends, b"x" * 30), post(appends, b"y" * 6), post(appends, b"z" * 6))
    assert [values(sent) for sent in client.sent] == [[b"x" * 30], [b"y" * 6], [b"z" * 6]]


async def test_with_replicas_one_wait_ends_the_pipeline_and_speaks_for_every_post() -> None:
    client = FakeClient()
    check = functools.partial(check_replicated, wanted=2)
    appends = batcher(client, min_replicas=2, wait_timeout_ms=50, check=check)
    client.acknowledged = 2
    assert list(await asyncio.gather(post(appends, b"a"), post(appends, b"b"))) == [b"stored:a", b"stored:b"]
    assert values(client.sent[0]) == [b"a", b"b", "WAIT"] and client.sent[0][-1] == ("WAIT", 2, 50)
    client.acknowledged = 1
    replies = await asyncio.gather(post(appends, b"c"), return_exceptions=True)
    assert isinstance(replies[0], BackendUnavailable)
    assert values(client.sent[1]) == [b"c", "WAIT"]  # a lone post too: WAIT runs on its connection
    client.fail_after = 2  # the WAIT reply is lost: stored, but not known to be replicated
    unknown = await asyncio.gather(post(appends, b"d"), post(appends, b"e"), return_exceptions=True)
    assert all(isinstance(reply, redis_errors.ConnectionError) for reply in unknown)


async def test_the_check_runs_in_each_callers_own_context() -> None:
    seen: list[str] = []
    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller")

    def check(reply: Any, acknowledged: Any) -> Any:
        seen.append(caller.get())
        return reply

    appends = batcher(FakeClient(), check=check)

    async def one(name: str) -> Any:
        caller.set(name)
        return await post(appends, name.encode())

    await asyncio.gather(one("a"), one("b"), one("c"))
    assert seen == ["a", "b", "c"]


async def test_close_sends_what_waits_and_refuses_new_posts() -> None:
    client = FakeClient()
    appends = batcher(client)
    waiting = asyncio.ensure_future(post(appends, b"a"))
    await asyncio.sleep(0)
    await appends.close()
    assert await waiting == b"stored:a"
    with pytest.raises(redis_errors.ConnectionError):
        await post(appends, b"b")
