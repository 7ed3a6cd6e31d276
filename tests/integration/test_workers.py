"""`workflow-runs serve --workers 2` on the real stack, and the per-caller stream limit shared
through Redis (`SHARED_STREAM_LIMITS=1`).

Which worker takes a connection is the kernel's choice, so the tests tell the workers apart by
what each counts for itself: with `MAX_STREAMS_PER_PROCESS=1`, two streams open at once are two
processes serving. Every connection is a new one (no keep-alive), so each attempt may land on
either worker; the loops that retry do so under a deadline, with a client's back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from backends.redis_stream_slots import RedisStreamSlots, slots_key
from cli import main as cli
from cli import stack
from core.errors import BackendUnavailable
from core.settings import Settings
from core.tokens import mint_token
from tests.support.live import CLI, Services, api_url, live_env
from tests.support.runs import Run, start_runs
from tests.support.waits import wait_for
from tests.support.workers import is_worker, started, worker_pids

PROJECT = "workers"
DEADLINE = 60.0
PER_PROCESS = "This server has 1 update streams open"
PER_CALLER = "You have 1 update streams open, the limit per caller"


@dataclass
class WorkersApi:
    """`serve --workers 2` (the parent process) and what it serves on."""

    child: stack.Child
    port: int
    services: Services

    @property
    def base_url(self) -> str:
        return api_url(self.port)

    def token(self, user: str) -> str:
        return mint_token(self.services.jwt_secret, user=user, project=PROJECT)

    def started(self) -> int:
        """How many workers have completed their start-up so far (replacements included)."""
        return started(self.child.log_path)

    def workers(self) -> list[int]:
        """The pids of the parent's live worker processes."""
        return worker_pids(self.child.proc.pid)


@contextlib.contextmanager
def workers_api(services: Services, **env: str) -> Iterator[WorkersApi]:
    port = stack.free_port()
    settings = {
        **live_env(services, api_url(port), f"workers-{secrets.token_hex(4)}"),
        "MAX_STREAMS_PER_PROCESS": "1",
        "MAX_STREAMS_PER_PRINCIPAL": "1",
        "SHARED_STREAM_LIMITS": "1",
        "SHUTDOWN_TIMEOUT_SECONDS": "10",
        **env,
    }
    children: list[stack.Child] = []
    with stack.running(children):
        argv, name = [*CLI, "serve", "--workers", "2"], f"api-workers-{port}-{secrets.token_hex(3)}"
        child = stack.spawn(name, argv, services.logs, {**settings, "PORT": str(port)})
        children.append(child)
        stack.wait_for_port("127.0.0.1", port, DEADLINE, child.proc)
        api = WorkersApi(child, port, services)
        # Both workers serving (uvicorn logs each one's start), not only the parent's socket bound.
        wait_for(lambda: api.started() >= 2, DEADLINE)
        assert len(api.workers()) == 2
        yield api


@pytest.fixture(scope="module")
def run(services: Services) -> Run:
    """One run that stays open (no worker polls its queue), visible to every user of the project."""
    (started,) = start_runs(live_env(services, "http://127.0.0.1:1/api/v1", "unused"), 1, project=PROJECT, user="u1")
    return started


@contextlib.asynccontextmanager
async def client(api: WorkersApi, user: str) -> AsyncIterator[httpx.AsyncClient]:
    # No kept-alive connection: each request is a new connection, which either worker may take.
    limits = httpx.Limits(max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {api.token(user)}"}
    async with httpx.AsyncClient(base_url=api.base_url, headers=headers, timeout=DEADLINE, limits=limits) as http:
        yield http


@dataclass
class Stream:
    """One stream opening: its status (and error message), then, if open, how the server ended it."""

    http: httpx.AsyncClient
    run: Run
    status: int | None = None
    message: str = ""
    end_reason: str | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async with aconnect_sse(self.http, "GET", f"{self.run.path}/stream") as source:
                self.status = source.response.status_code
                if self.status != 200:
                    await source.response.aread()
                    self.message = source.response.json()["message"]
                    return
                self.answered.set()
                async for event in source.aiter_sse():
                    if event.event == "end":
                        self.end_reason = json.loads(event.data)["reason"]
                        return
        finally:
            self.answered.set()

    async def open(self) -> int:
        self.task = asyncio.create_task(self._read())
        async with asyncio.timeout(DEADLINE):
            await self.answered.wait()
        assert self.status is not None
        return self.status

    async def close(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def open_until_open(http: httpx.AsyncClient, run: Run, *, refusals: set[str]) -> Stream:
    """Open a stream, trying again (new connection each time) while the answer is a 429 whose
    message starts with one of `refusals`."""
    async with asyncio.timeout(DEADLINE):
        while True:
            stream = Stream(http, run)
            if await stream.open() == 200:
                return stream
            assert stream.status == 429 and any(stream.message.startswith(r) for r in refusals), stream.message
            await asyncio.sleep(0.05)  # a client's back-off before retrying


async def refusals_until(http: httpx.AsyncClient, run: Run, wanted: str) -> list[str]:
    """Open streams (each refused) until one refusal's message starts with `wanted`; every message."""
    seen: list[str] = []
    async with asyncio.timeout(DEADLINE):
        while not any(message.startswith(wanted) for message in seen):
            stream = Stream(http, run)
            status = await stream.open()
            assert status == 429, f"opened ({status}) where every worker should refuse"
            seen.append(stream.message)
            await asyncio.sleep(0.05)  # a client's back-off before retrying
    return seen


# -- serve --workers 2 ------------------------------------------------------------------------------


@pytest.mark.services
async def test_two_workers_serve_and_count_a_callers_streams_together(services: Services, run: Run) -> None:
    with workers_api(services) as api:
        async with client(api, "alice") as alice, client(api, "bob") as bob:
            first = await open_until_open(alice, run, refusals=set())
            # Each worker serves one stream at most: bob's opens where alice's is not.
            second = await open_until_open(bob, run, refusals={PER_PROCESS})
            await second.close()
            # Bob's worker now holds nothing of alice's, yet refuses her: the count is shared.
            seen = await refusals_until(alice, run, PER_CALLER)
            assert set(seen) <= {
                f"{PER_PROCESS}, its limit; retry later or on another replica.",
                f"{PER_CALLER}; close one first.",
            }
            await first.close()
            # Her slot is given back at once: she opens again, on either worker.
            again = await open_until_open(alice, run, refusals={PER_PROCESS, PER_CALLER})
            await again.close()


@pytest.mark.services
async def test_sigterm_ends_every_workers_streams_and_the_parent_exits_0(services: Services, run: Run) -> None:
    with workers_api(services) as api:
        workers = api.workers()
        async with client(api, "alice") as alice, client(api, "bob") as bob:
            streams = [
                await open_until_open(alice, run, refusals=set()),
                await open_until_open(bob, run, refusals={PER_PROCESS}),  # in the other worker
            ]
            api.child.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(stream.task for stream in streams if stream.task is not None))
        assert [stream.end_reason for stream in streams] == ["server_shutdown", "server_shutdown"]
        assert await asyncio.to_thread(api.child.proc.wait, DEADLINE) == 0
        assert not any(is_worker(pid) for pid in workers)
        log = api.child.log_path.read_text(encoding="utf-8", errors="replace")
        assert "graceful shutdown exceeded" not in log  # nothing had to be cancelled


@pytest.mark.services
async def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(services: Services, run: Run) -> None:
    with workers_api(services) as api:
        killed, kept = api.workers()
        os.kill(killed, signal.SIGKILL)
        async with client(api, "carol") as carol, client(api, "dave") as dave:
            # The other worker answers meanwhile.
            assert (await carol.get(run.path)).status_code == 200

            def replaced() -> set[int] | None:
                pids = set(api.workers())
                return pids if len(pids) == 2 and killed not in pids and api.started() >= 3 else None

            now = await asyncio.to_thread(wait_for, replaced, DEADLINE)
            assert kept in now
            # Two streams at once again: both workers, the new one included, serve.
            streams = [
                await open_until_open(carol, run, refusals=set()),
                await open_until_open(dave, run, refusals={PER_PROCESS}),
            ]
            for stream in streams:
                await stream.close()
        assert api.child.proc.poll() is None


# -- the shared count on a real Redis -----------------------------------------------------------------


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[Redis]:
    client = Redis.from_url(services.redis_url)
    yield client
    await client.aclose()


def slots(services: Services, **kwargs: Any) -> RedisStreamSlots:
    return RedisStreamSlots.from_settings(Settings(redis_url=services.redis_url), **kwargs)


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.services
async def test_a_callers_slots_are_counted_across_processes_and_given_back(services: Services, redis: Redis) -> None:
    owner = f"owner-{secrets.token_hex(4)}"
    one, two = slots(services), slots(services)  # two processes' views
    try:
        first = await one.acquire(owner, 2)
        second = await two.acquire(owner, 2)
        assert first and second and first != second
        assert await one.acquire(owner, 2) is None and await two.acquire(owner, 2) is None
        assert await redis.zcard(slots_key(owner)) == 2
        two.release(owner, second)
        async with asyncio.timeout(DEADLINE):
            while await redis.zcard(slots_key(owner)) != 1:  # noqa: ASYNC110  # Redis cannot notify us
                await asyncio.sleep(0.02)
        assert await one.acquire(owner, 2) is not None
        assert await redis.pttl(slots_key(owner)) > 0  # the key goes with its last lease
    finally:
        await one.close()
        await two.close()
    assert await redis.exists(slots_key(owner)) == 0  # close gave back every slot still held


@pytest.mark.services
async def test_a_dead_processs_slots_end_with_their_lease_and_a_live_ones_are_renewed(
    services: Services, redis: Redis
) -> None:
    owner = f"owner-{secrets.token_hex(4)}"
    key = slots_key(owner)
    # What a process that died leaves: a slot whose lease has ended, never renewed again.
    await redis.zadd(key, {"dead-process-slot": await redis_ms(redis) - 1})
    live = slots(services, lease_seconds=1.0, renew_seconds=0.2)
    other = slots(services)
    try:
        held = await live.acquire(owner, 1)  # the dead slot does not count
        assert held is not None
        assert await redis.zrange(key, 0, -1) == [held.encode()]
        lease_end = await redis.zscore(key, held)
        assert lease_end is not None
        # Past the first lease's end, the slot is still held: the live process renewed it.
        async with asyncio.timeout(DEADLINE):
            while await redis_ms(redis) <= lease_end:  # noqa: ASYNC110  # Redis' clock, not ours
                await asyncio.sleep(0.05)
        assert await other.acquire(owner, 1) is None
        assert (await redis.zscore(key, held) or 0) > lease_end
    finally:
        await live.close()
        await other.close()


@pytest.mark.services
async def test_redis_down_at_opening_is_backend_unavailable_and_holds_nothing() -> None:
    down = RedisStreamSlots.from_settings(
        Settings(redis_url=f"redis://127.0.0.1:{stack.free_port()}/0", backend_timeout_seconds=1)
    )
    try:
        with pytest.raises(BackendUnavailable):
            await down.acquire("owner", 1)
        assert down.held == 0
    finally:
        await down.close()


# -- the command line ------------------------------------------------------------------------------


def test_workers_come_from_the_flag_else_web_concurrency_else_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert cli.worker_count(None) == 1
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert cli.worker_count(None) == 3
    assert cli.worker_count(2) == 2


def test_workers_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parser().parse_args(["serve", "--workers", "0"])
    assert exit_info.value.code == 2
    assert "must be a whole number, 1 or more" in capsys.readouterr().err
