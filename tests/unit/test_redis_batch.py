"""`backends.redis_batch.ScriptBatcher` against a fake client: what is sent together, in which
order, what each caller gets back, and what is never sent (twice, or at all). The real Redis is
`tests/integration/test_redis_updates.py`."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from backends.redis_batch import ScriptBatcher, stored
from backends.redis_updates import check_replicated
from core.errors import BackendUnavailable

SHA = "0" * 40


class FakePipeline:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> FakePipeline:
        self.commands.append(args)
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert raise_on_error is False
        self.client.sent.append(self.commands)
        await asyncio.sleep(0)  # a round trip: other callers run meanwhile
        if self.client.fail_next:
            self.client.fail_next = False
            raise redis_errors.ConnectionError("connection lost")
        return [self.client.reply(command) for command in self.commands]


class FakeClient:
    """Runs `EVALSHA` as "store the first argument" and `WAIT` as `acknowledged`."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[Any, ...]]] = []  # each pipeline's (or lone call's) commands
        self.loaded = True
        self.loads = 0
        self.fail_next = False
        self.refuse: set[bytes] = set()  # arguments Redis answers with an error (as a full Redis does)
        self.acknowledged = 1

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert transaction is False
        return FakePipeline(self)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        command = ("EVALSHA", sha, numkeys, *keys_and_args)
        self.sent.append([command])
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next = False
            raise redis_errors.ConnectionError("connection lost")
        reply = self.reply(command)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def script_load(self, source: str) -> str:
        self.loads += 1
        self.loaded = True
        return SHA

    def reply(self, command: tuple[Any, ...]) -> Any:
        if command[0] == "WAIT":
            return self.acknowledged
        if not self.loaded:
            return redis_errors.NoScriptError("NOSCRIPT No matching script.")
        argument = command[3 + command[2]]
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


async def test_a_lone_post_is_one_plain_call() -> None:
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


async def test_a_lost_connection_fails_the_posts_of_its_pipeline_and_no_other() -> None:
    client = FakeClient()
    appends = batcher(client)
    first = [asyncio.ensure_future(post(appends, b"a%d" % i)) for i in range(3)]
    await asyncio.sleep(0)  # the first pipeline leaves (and will fail); the next posts form another
    client.fail_next = True
    second = [asyncio.ensure_future(post(appends, b"b%d" % i)) for i in range(3)]
    done = await asyncio.gather(*first, *second, return_exceptions=True)
    assert all(isinstance(reply, redis_errors.ConnectionError) for reply in done[:3])
    assert done[3:] == [b"stored:b0", b"stored:b1", b"stored:b2"]
    assert len(client.sent) == 2  # nothing was sent again


@pytest.mark.parametrize("count", [1, 5])
async def test_noscript_loads_the_script_and_sends_only_those_posts_once_more(count: int) -> None:
    client = FakeClient()
    client.loaded = False
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(count)))
    assert replies == [b"stored:%d" % i for i in range(count)]
    assert client.loads == 1 and len(client.sent) == 2


async def test_noscript_twice_is_the_callers_error_not_a_third_send() -> None:
    client = FakeClient()
    client.loaded = False
    client.script_load = _load_nothing(client)  # type: ignore[method-assign]
    appends = batcher(client)
    replies = await asyncio.gather(*(post(appends, b"%d" % i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(reply, redis_errors.NoScriptError) for reply in replies)
    assert len(client.sent) == 2


def _load_nothing(client: FakeClient) -> Any:
    async def load(source: str) -> str:
        client.loads += 1
        return SHA

    return load


async def test_a_caller_gone_before_its_pipeline_left_is_not_sent() -> None:
    client = FakeClient()
    appends = batcher(client)
    kept = asyncio.ensure_future(post(appends, b"kept"))
    gone = asyncio.ensure_future(post(appends, b"gone"))
    await asyncio.sleep(0)  # both are waiting for the turn to end
    gone.cancel()
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


async def test_close_waits_for_what_is_in_flight_and_refuses_new_posts() -> None:
    client = FakeClient()
    appends = batcher(client)
    waiting = asyncio.ensure_future(post(appends, b"a"))
    await asyncio.sleep(0)
    await appends.close()
    assert waiting.done() and waiting.result() == b"stored:a"
    with pytest.raises(redis_errors.ConnectionError):
        await post(appends, b"b")
