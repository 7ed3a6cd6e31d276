"""Faults against real processes that the tests stop and start: Redis stopped (SIGTERM, and SIGKILL)
and restarted under open streams and a stream of posts; Temporal stopped and restarted; the API
itself stopped with SIGTERM while streams are open and a post is in flight.

These need their own Temporal, Redis and API processes (the session's are shared by other tests),
on free ports under a temporary directory. Nothing sleeps in place of synchronisation: every wait is
on a condition under a deadline; the only pauses are the clients' back-offs between retries.

Every test runs against `serve` (one process) and `serve --workers 2` (uvicorn's process manager
and two workers sharing the port; which worker takes a connection is the kernel's choice).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from cli import stack
from core.tokens import mint_token
from tests.support.live import start_api
from tests.support.load import Poster, ResumingReader, assert_error_body, read_log
from tests.support.runs import Run, start_runs
from tests.support.waits import wait_all, wait_until
from tests.support.workers import is_worker, worker_pids

pytestmark = pytest.mark.services

PROJECT, USER = "faults", "u1"
DEADLINE = 60.0


@dataclass
class FaultStack:
    """Temporal, Redis and API processes of these tests alone, each stoppable and restartable on
    the same port and data directory."""

    data_dir: Path
    temporal_port: int = field(default_factory=stack.free_port)
    redis_port: int = field(default_factory=stack.free_port)
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    temporal: stack.Child | None = None
    redis: stack.Child | None = None
    apis: list[stack.Child] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def token(self) -> str:
        return mint_token(self.jwt_secret, user=USER, project=PROJECT)

    def env(self, port: int = 0) -> dict[str, str]:
        return {
            **os.environ,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{self.temporal_port}",
            "REDIS_URL": self.redis_url,
            "JWT_SECRET": self.jwt_secret,
            "DATA_DIR": str(self.data_dir),
            "PORT": str(port),
            "API_URL": f"http://127.0.0.1:{port}/api/v1",
            "VALIDATE_RESPONSES": "1",
            "SSE_HEARTBEAT_SECONDS": "1",
            "BACKEND_TIMEOUT_SECONDS": "2",
            "SHUTDOWN_TIMEOUT_SECONDS": "30",
            # Four posting loops share one token: only faults may refuse them here, not the rate limits.
            "RATE_LIMIT_TEMPORAL_PER_SECOND": "0",
            "RATE_LIMIT_UPDATES_PER_SECOND": "0",
            # A test keeps one connection (so one worker) across a Temporal restart: it must outlive
            # the wait, which the default (5 s) may not.
            "KEEPALIVE_TIMEOUT_SECONDS": "120",
        }

    def start_temporal(self) -> None:
        self.temporal = stack.start_temporal(self.data_dir, port=self.temporal_port)

    def stop_temporal(self) -> None:
        assert self.temporal is not None
        self.temporal.stop()

    def start_redis(self) -> None:
        # Same data directory: the append-only file written before the stop is loaded again.
        self.redis = stack.start_redis(self.data_dir, port=self.redis_port)

    def stop_redis(self, how: signal.Signals) -> None:
        assert self.redis is not None
        if how == signal.SIGKILL:  # a crash: no chance to flush anything
            os.killpg(self.redis.proc.pid, signal.SIGKILL)
            self.redis.proc.wait()
        else:
            self.redis.stop()

    def ensure_running(self) -> None:
        if self.temporal is None or self.temporal.proc.poll() is not None:
            self.start_temporal()
        if self.redis is None or self.redis.proc.poll() is not None:
            self.start_redis()

    def spawn_api(self, port: int, workers: int, **settings: str) -> stack.Child:
        env = {**self.env(port), **settings}
        name = f"api-{port}-{len(self.apis)}"
        return start_api(self.apis, name, port, env, self.data_dir / "logs", workers=workers)

    def stop_all(self) -> None:
        for child in [*self.apis, self.redis, self.temporal]:
            if child is not None:
                child.stop()


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    fault_stack = FaultStack(tmp_path_factory.mktemp("faults"))
    try:
        fault_stack.ensure_running()
        yield fault_stack
    finally:
        fault_stack.stop_all()


@pytest.fixture(scope="module", params=[1, 2], ids=["workers=1", "workers=2"])
def workers(request: pytest.FixtureRequest) -> int:
    """The API's worker processes (`serve --workers`); the Temporal and Redis of `faults` serve both."""
    count: int = request.param
    return count


@dataclass(frozen=True)
class Api:
    port: int
    child: stack.Child

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health/ready"


@pytest.fixture
def api(faults: FaultStack, workers: int) -> Iterator[Api]:
    faults.ensure_running()  # whatever an earlier test left behind
    port = stack.free_port()
    child = faults.spawn_api(port, workers)
    try:
        yield Api(port, child)
    finally:
        child.stop()


@contextlib.asynccontextmanager
async def client(
    faults: FaultStack, base_url: str, limits: httpx.Limits | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {faults.token()}"}
    pool = limits or httpx.Limits()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30, limits=pool) as http:
        yield http


# Every request on one connection (the client waits for it to be free): with `--workers`, always the
# same worker, as long as the server keeps the connection.
ONE_CONNECTION = httpx.Limits(max_connections=1)
# Every request on a new connection: with `--workers`, each may land on either worker.
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)


def client_address(response: httpx.Response) -> tuple[str, int]:
    """The client end of the connection that carried `response`."""
    address: tuple[str, int] = response.extensions["network_stream"].get_extra_info("client_addr")
    return address


async def poll_until(check: Callable[[], Awaitable[bool]], deadline: float, what: str) -> None:
    """Ask the server again until `check` holds (an HTTP condition), under a deadline."""
    async with asyncio.timeout(deadline):
        while not await check():  # noqa: ASYNC110  # polls the server, which cannot notify us
            await asyncio.sleep(0.1)


async def stream_open_status(http: httpx.AsyncClient, run: Run) -> httpx.Response:
    """Open a stream and return its response head (with the body read when it is an error)."""
    async with http.stream("GET", f"{run.path}/stream") as response:
        if response.status_code != 200:
            await response.aread()
        return response


async def readiness(http: httpx.AsyncClient, api: Api) -> httpx.Response:
    return await http.get(api.ready_url)


async def is_ready(http: httpx.AsyncClient, api: Api) -> bool:
    return (await readiness(http, api)).status_code == 200


# -- Redis -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_redis_restart_loses_no_acknowledged_update_and_streams_resume_exactly_once(
    faults: FaultStack, api: Api, how: signal.Signals
) -> None:
    runs = await asyncio.to_thread(start_runs, faults.env(api.port), 2, project=PROJECT, user=USER)
    async with client(faults, api.base_url) as http:
        # Four streams; each drops its connection now and then, so some resume during the outage.
        readers = [
            ResumingReader(http, runs[i % 2], rng=random.Random(i), disconnect_probability=0.05) for i in range(4)
        ]
        reading = [asyncio.create_task(r.run()) for r in readers]
        await wait_all([r.connected for r in readers], DEADLINE)

        poster = Poster(http)
        stop_posting, redis_back = asyncio.Event(), asyncio.Event()
        refused_after_return: list[str] = []

        async def post_continuously(worker: int) -> None:
            index = 0
            while not stop_posting.is_set():
                message, sent_after_return = f"w{worker}-{index}", redis_back.is_set()
                if not await poster.post(runs[worker % 2], message):
                    if sent_after_return:
                        refused_after_return.append(message)
                    await asyncio.sleep(0.05)  # a client's back-off after a refusal
                index += 1

        posting = [asyncio.create_task(post_continuously(w)) for w in range(4)]
        await wait_until(lambda: all(len(r.received) >= 5 for r in readers), DEADLINE, "updates flow")
        acked_before_stop = poster.acked_count

        await asyncio.to_thread(faults.stop_redis, how)
        async with asyncio.timeout(DEADLINE):
            await poster.saw_503.wait()  # posts: 503 + Retry-After + the JSON body (checked by Poster)
        assert_error_body(await http.get(f"{runs[0].path}/updates"), 503)
        assert_error_body(await stream_open_status(http, runs[0]), 503)
        ready = await readiness(http, api)
        assert_not_ready(ready, redis_ok=False, temporal_ok=True)

        await asyncio.to_thread(faults.start_redis)
        await poll_until(lambda: is_ready(http, api), DEADLINE, "ready again once Redis is back")
        redis_back.set()
        acked_at_return = poster.acked_count
        await wait_until(lambda: poster.acked_count >= acked_at_return + 40, DEADLINE, "posts succeed again")
        stop_posting.set()
        await asyncio.gather(*posting)

        for run in runs:
            await poster.post_until_acked(run, run.sentinel)
        await wait_all([r.done for r in readers], DEADLINE)
        await asyncio.gather(*reading)
        logs = {run.run_id: await read_log(http, run) for run in runs}

    assert acked_before_stop > 0
    poster.assert_all_stored(logs)  # nothing answered 200 was lost, across the restart
    for reader in readers:
        reader.assert_exactly_once_in_order(logs[reader.run_ids.run_id])
    assert set(poster.failures) == {"503"}
    # Once ready again, the API serves without a restart: no post sent after that was refused.
    assert not refused_after_return
    print(
        f"\nRedis {how.name}: posts acked {poster.acked_count}, refused {dict(poster.failures)}; "
        f"streams: connections {[r.connections for r in readers]}, refused {[dict(r.refused) for r in readers]}"
    )


def assert_not_ready(response: httpx.Response, *, redis_ok: bool, temporal_ok: bool) -> None:
    """`/health/ready` while a backend is down: 503, Retry-After, and which backend failed."""
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    checks = response.json()["checks"]
    assert (checks["redis"] == "ok") is redis_ok, checks
    assert (checks["temporal"] == "ok") is temporal_ok, checks


async def test_acknowledged_posts_survive_redis_crashes_and_restarts(faults: FaultStack, api: Api) -> None:
    """Redis runs with `appendonly yes` + `appendfsync always`: a post answered 200 was on disk
    before the answer, so it survives a clean stop and a SIGKILL alike."""
    (run,) = await asyncio.to_thread(start_runs, faults.env(api.port), 1, project=PROJECT, user=USER)
    async with client(faults, api.base_url) as http:
        poster = Poster(http)
        for how in (signal.SIGTERM, signal.SIGKILL):
            for i in range(20):
                await poster.post_until_acked(run, f"{how.name}-{i}")
            await asyncio.to_thread(faults.stop_redis, how)
            await asyncio.to_thread(faults.start_redis)
            await poll_until(lambda: is_ready(http, api), DEADLINE, "ready again once Redis is back")
        log = await read_log(http, run)
    assert [u["message"] for u in log] == poster.acked[run.run_id]


# -- Temporal --------------------------------------------------------------------------------------


async def test_temporal_restart_answers_503_while_down_and_recovers_by_itself(faults: FaultStack, api: Api) -> None:
    (run,) = await asyncio.to_thread(start_runs, faults.env(api.port), 1, project=PROJECT, user=USER)
    # The stream on a client of its own; everything else on one connection, so one process
    # (whichever worker took it) both learns the run and, with Temporal down, takes the update `kept`.
    async with client(faults, api.base_url) as streaming, client(faults, api.base_url, ONE_CONNECTION) as http:
        assert (await http.get(run.path)).status_code == 200
        reader = ResumingReader(streaming, run)
        reading = asyncio.create_task(reader.run())
        await wait_all([reader.connected], DEADLINE)
        poster = Poster(http)
        before = await http.post(
            f"/workflows/runs/{run.run_id}/updates", json={"type": "PROGRESS", "message": "before the outage"}
        )
        assert before.status_code == 200, before.text
        await wait_until(lambda: len(reader.received) == 1, DEADLINE, "the stream delivers")

        await asyncio.to_thread(faults.stop_temporal)
        temporal_backed = [
            http.get(run.path),
            http.post("/workflows/runs", json={}),
            http.post("/workflows/conversations", json={}),
            http.post(f"{run.path}/signal/UserInput", json={"message": "hello"}),
            http.post(f"{run.path}/actions/cancel", json={"reason": "no"}),
        ]
        for request in temporal_backed:
            assert_error_body(await request, 503)
        # A run this process already knows needs no Temporal call to take an update: workflows keep
        # reporting progress while Temporal restarts.
        kept = await http.post(f"/workflows/runs/{run.run_id}/updates", json={"message": "kept"})
        assert client_address(kept) == client_address(before), "not the connection (so maybe not the process)"
        assert kept.status_code == 200, kept.text
        assert_error_body(await stream_open_status(http, run), 503)
        assert_not_ready(await readiness(http, api), redis_ok=True, temporal_ok=False)
        assert not reader.done.is_set() and reader.connections == 1  # the open stream stays open

        await asyncio.to_thread(faults.start_temporal)
        await poll_until(lambda: is_ready(http, api), DEADLINE, "ready again once Temporal is back")
        detail = await http.get(run.path)
        assert detail.status_code == 200 and detail.json()["status"] == "RUNNING"
        await poster.post_until_acked(run, run.sentinel)
        await wait_all([reader.done], DEADLINE)
        await reading

        async def listed() -> bool:
            page = await http.post("/workflows/runs", json={})
            return page.status_code == 200 and run.run_id in {r["run_id"] for r in page.json()["runs"]}

        await poll_until(listed, DEADLINE, "listing works again")
        log = await read_log(http, run)
        cancelled = await http.post(f"{run.path}/actions/terminate", json={"reason": "test done"})
        assert cancelled.status_code == 200, cancelled.text
    reader.assert_exactly_once_in_order(log)
    assert [u["message"] for u in log] == ["before the outage", "kept", run.sentinel]


# -- the API itself --------------------------------------------------------------------------------


async def begin_post(port: int, path: str, token: str, body: bytes) -> tuple[asyncio.StreamReader, Any]:
    """Send a POST's head with `Expect: 100-continue` and wait for `100 Continue`: the server is now
    inside the request, waiting for its body (an in-flight post, for certain)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST /api/v1{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    async with asyncio.timeout(DEADLINE):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return reader, writer


async def finish_post(reader: asyncio.StreamReader, writer: Any, body: bytes) -> tuple[int, bytes]:
    writer.write(body)
    await writer.drain()
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
        content = await reader.readexactly(length)
    writer.close()
    return int(lines[0].split()[1]), content


async def test_sigterm_ends_streams_finishes_in_flight_posts_and_exits(faults: FaultStack, workers: int) -> None:
    """SIGTERM to `serve`, or to the parent of `serve --workers` (which passes it on to each worker)."""
    faults.ensure_running()
    port = stack.free_port()
    readers_count = 3
    # With several workers, one fewer stream per process than readers: the readers' streams are then
    # served by more than one worker, and every worker has streams to end.
    limit = {} if workers == 1 else {"MAX_STREAMS_PER_PROCESS": str(readers_count - 1)}
    first = await asyncio.to_thread(faults.spawn_api, port, workers, **limit)
    base_url = f"http://127.0.0.1:{port}/api/v1"
    (run,) = await asyncio.to_thread(start_runs, faults.env(port), 1, project=PROJECT, user=USER)
    in_flight = orjson.dumps({"type": "PROGRESS", "message": "in flight at SIGTERM"})
    try:
        # With several workers, a new connection for every request: a stream refused by a full worker
        # (429) is retried on either worker, not again on the kept-alive connection to the same one.
        async with client(faults, base_url, None if workers == 1 else NO_KEEPALIVE) as http:
            readers = [ResumingReader(http, run) for _ in range(readers_count)]
            reading = [asyncio.create_task(r.run()) for r in readers]
            await wait_all([r.connected for r in readers], DEADLINE)
            spawned = worker_pids(first.proc.pid)  # none for `serve`, which serves in its own process
            poster = Poster(http)
            for i in range(5):
                await poster.post_until_acked(run, f"before-{i}")
            await wait_until(lambda: all(len(r.received) == 5 for r in readers), DEADLINE, "updates delivered")

            connection = await begin_post(port, f"/workflows/runs/{run.run_id}/updates", faults.token(), in_flight)
            first.proc.send_signal(signal.SIGTERM)
            await wait_until(
                lambda: all(r.ended_by_server["server_shutdown"] == 1 for r in readers),
                DEADLINE,
                "every open stream ends with `end` / server_shutdown",
            )
            status, answer = await finish_post(*connection, in_flight)
            assert (status, orjson.loads(answer)) == (200, {"success": True})
            poster.acked[run.run_id].append("in flight at SIGTERM")
            exit_code = await asyncio.to_thread(first.proc.wait, DEADLINE)
            assert exit_code in (0, -signal.SIGTERM)
            assert not any(is_worker(pid) for pid in spawned)  # the parent waited for every worker
            # Nothing was accepted after the shutdown began: no stream was opened again.
            assert all(r.connections == 1 for r in readers)
            log_text = first.log_path.read_text(encoding="utf-8", errors="replace")
            assert "graceful shutdown exceeded" not in log_text  # nothing had to be cancelled

            # Another server on the same address (what a load balancer gives the clients): they
            # resume with Last-Event-ID and lose nothing, the in-flight post included.
            second = await asyncio.to_thread(faults.spawn_api, port, workers)
            try:
                await poster.post_until_acked(run, run.sentinel)
                await wait_all([r.done for r in readers], DEADLINE)
                await asyncio.gather(*reading)
                log = await read_log(http, run)
            finally:
                second.stop()
    finally:
        first.stop()
    poster.assert_all_stored({run.run_id: log})
    assert [u["message"] for u in log] == poster.acked[run.run_id]
    for reader in readers:
        reader.assert_exactly_once_in_order(log)
        assert reader.connections == 2
