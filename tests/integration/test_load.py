"""A bounded load test on loopback: concurrent update streams over several runs while updates are
posted, with random forced disconnects and resumes (`Last-Event-ID`, sometimes `since` as an
EventSource client does); every stream must get every update exactly once, in order.

Small by default (part of `make test`); larger by environment:

    LOAD_STREAMS=50 LOAD_POSTS=1000 .venv/bin/pytest tests/integration/test_load.py -s

`LOAD_SEED` replays one run of the random choices (the seed is printed with the figures).

The client side (`ResumingReader`, `Poster`, `start_runs`) is shared with the fault tests.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from backends.redis_updates import MAX_UPDATES_PER_RUN
from tests.conftest import LiveApi

pytestmark = pytest.mark.services

POSTERS = 8
FORCED_DISCONNECTS_PER_STREAM = 5  # on average, whatever the scale


@dataclass(frozen=True)
class Run:
    workflow_id: str
    run_id: str

    @property
    def sentinel(self) -> str:
        """The message of the last update the test posts to this run: a reader stops on it."""
        return f"sentinel-{self.run_id}"

    @property
    def path(self) -> str:
        return f"/workflows/runs/{self.workflow_id}/{self.run_id}"


def start_runs(env: Mapping[str, str], count: int, *, project: str, user: str) -> list[Run]:
    """Start `count` AgentConversation runs on a task queue no worker polls: they stay RUNNING and
    nothing but the test posts updates to them."""
    quiet = {**env, "TEMPORAL_TASK_QUEUE": f"unpolled-{secrets.token_hex(4)}"}
    runs = []
    for _ in range(count):
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", "start", "AgentConversation", "--project", project, "--user", user],
            env=quiet,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        ids = json.loads(out.stdout)
        runs.append(Run(ids["workflow_id"], ids["run_id"]))
    return runs


def assert_error_body(response: httpx.Response, status: int) -> dict[str, Any]:
    """The document's JSON error body, plus Retry-After on 429 and 503."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["error"] and body["message"] and body["errorCode"]
    if status in (429, 503):
        assert int(response.headers["retry-after"]) > 0
    return body


def retry_delay(response: httpx.Response | None) -> float:
    """How long a client waits before trying again: the server's Retry-After, capped for tests."""
    if response is None:
        return 0.1
    return min(float(response.headers.get("retry-after", "0.1")), 0.25)


class ResumingReader:
    """One SSE client of one run that keeps resuming until it has the run's sentinel update (or the
    stream ended because the run closed).

    Each connection resumes from the last update received: with `Last-Event-ID`, or (with
    probability `since_probability`) with `since=<last timestamp>&skipHistory=true` as a browser
    client does. With `disconnect_probability` it drops the connection after an update (a forced
    disconnect). It records what it received and how each connection ended."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        run: Run,
        *,
        rng: random.Random | None = None,
        disconnect_probability: float = 0.0,
        since_probability: float = 0.0,
    ) -> None:
        self.http = http
        self.run_ids = run
        self.rng = rng or random.Random(0)
        self.disconnect_probability = disconnect_probability
        self.since_probability = since_probability
        self.received: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.connected = asyncio.Event()
        self.done = asyncio.Event()
        self.connections = 0
        self.forced = 0  # connections the reader dropped on purpose
        self.ended_by_server: collections.Counter[str] = collections.Counter()  # why the server ended one
        self.refused: collections.Counter[int] = collections.Counter()  # statuses of refused opens
        self.transport_errors = 0
        self.truncated = 0
        self.error: BaseException | None = None

    @property
    def reconnects(self) -> int:
        return max(self.connections - 1, 0)

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException as exc:
            # Unblock whoever waits on this reader; `assert_exactly_once_in_order` re-raises.
            self.error = exc
            self.connected.set()
            self.done.set()
            raise

    async def _run(self) -> None:
        while not self.done.is_set():
            response: httpx.Response | None = None
            try:
                response = await self._connect_once()
            except (httpx.TransportError, httpx.StreamError):
                self.transport_errors += 1  # the server went away mid-stream or is not there
            if not self.done.is_set() and response is not None and response.status_code != 200:
                await asyncio.sleep(retry_delay(response))  # a client's back-off, as Retry-After asks
            elif not self.done.is_set() and response is None:
                await asyncio.sleep(retry_delay(None))

    def _resume_point(self) -> tuple[dict[str, str], dict[str, str]]:
        if not self.received:
            return {}, {}  # every stored update
        if self.rng.random() < self.since_probability:
            return {}, {"since": str(self.received[-1]["timestamp"]), "skipHistory": "true"}
        return {"Last-Event-ID": self.ids[-1]}, {}

    async def _connect_once(self) -> httpx.Response:
        headers, params = self._resume_point()
        async with aconnect_sse(self.http, "GET", f"{self.run_ids.path}/stream", headers=headers, params=params) as src:
            response = src.response
            if response.status_code != 200:
                await response.aread()
                self.refused[response.status_code] += 1
                assert_error_body(response, response.status_code)
                return response
            self.connections += 1
            self.connected.set()
            async for event in src.aiter_sse():
                if not event.data:
                    continue  # httpx-sse yields heartbeats and bare `retry:` frames as empty events
                if event.event == "message":
                    update = json.loads(event.data)
                    self.received.append(update)
                    self.ids.append(event.id)
                    if update["message"] == self.run_ids.sentinel:
                        self.done.set()
                        return response
                    if self.rng.random() < self.disconnect_probability:
                        self.forced += 1
                        return response  # leaving the block closes the connection
                elif event.event == "end":
                    reason = json.loads(event.data)["reason"]
                    self.ended_by_server[reason] += 1
                    if reason == "run_closed":
                        self.done.set()  # as a client closes its EventSource; any other reason: resume
                    return response
                elif event.event == "truncated":
                    self.truncated += 1
            self.ended_by_server["closed without end"] += 1
            return response

    def assert_exactly_once_in_order(self, log: list[dict[str, Any]]) -> None:
        """What this reader received is the run's stored log up to the sentinel: nothing lost,
        nothing twice, same order, same content."""
        if self.error is not None:
            raise AssertionError(f"the reader failed: {self.error!r}") from self.error
        end = [u["message"] for u in log].index(self.run_ids.sentinel) + 1
        assert self.truncated == 0
        assert self.ids == [f"{u['timestamp']}-0" for u in log[:end]]
        assert self.received == log[:end]


@dataclass
class Poster:
    """Posts updates through the API; remembers which were acknowledged (200) and what else came."""

    http: httpx.AsyncClient
    acked: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    saw_503: asyncio.Event = field(default_factory=asyncio.Event)  # set on the first 503

    @property
    def acked_count(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def post(self, run: Run, message: str) -> bool:
        try:
            response = await self.http.post(
                f"/workflows/runs/{run.run_id}/updates", json={"type": "PROGRESS", "message": message}
            )
        except httpx.TransportError as exc:
            self.failures[type(exc).__name__] += 1
            return False
        if response.status_code == 200:
            assert response.json() == {"success": True}
            self.acked[run.run_id].append(message)
            return True
        assert_error_body(response, response.status_code)
        self.failures[str(response.status_code)] += 1
        if response.status_code == 503:
            self.saw_503.set()
        return False

    async def post_until_acked(self, run: Run, message: str, deadline: float = 60.0) -> None:
        """Post (the same text again after a refusal) until one attempt is acknowledged."""
        async with asyncio.timeout(deadline):
            while not await self.post(run, message):  # noqa: ASYNC110  # retries, not a wait on state
                await asyncio.sleep(0.1)  # a client's back-off before retrying

    def assert_all_stored(self, logs: Mapping[str, list[dict[str, Any]]]) -> None:
        """Every acknowledged post is in its run's log (the log may hold more: a post refused with
        503 may still have been stored, and is then delivered like any other)."""
        for run_id, messages in self.acked.items():
            stored = collections.Counter(u["message"] for u in logs[run_id])
            missing = [m for m in messages if stored[m] < 1]
            assert not missing, f"{len(missing)} acknowledged posts lost in run {run_id}: {missing[:5]}"


async def read_log(http: httpx.AsyncClient, run: Run) -> list[dict[str, Any]]:
    response = await http.get(f"{run.path}/updates", params={"since": 0})
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


async def wait_until(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    """Wait for a condition the test cannot be notified of, polling under a deadline."""
    limit = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > limit:
            raise AssertionError(f"not met before the deadline: {what}")
        await asyncio.sleep(0.05)


async def wait_all(events: list[asyncio.Event], deadline: float) -> None:
    async with asyncio.timeout(deadline):
        await asyncio.gather(*(e.wait() for e in events))


# -- the test --------------------------------------------------------------------------------------


async def test_streams_with_forced_disconnects_get_every_update_once_in_order(live_api: LiveApi) -> None:
    n_streams = int(os.environ.get("LOAD_STREAMS", "10"))
    n_posts = int(os.environ.get("LOAD_POSTS", "200"))
    seed = int(os.environ.get("LOAD_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    n_runs = max(3, math.ceil(n_posts / (MAX_UPDATES_PER_RUN // 2)))  # never trimmed: exactly once is exact
    project, user = "load-project", f"load-{secrets.token_hex(3)}"
    runs = await asyncio.to_thread(start_runs, live_api.env(), n_runs, project=project, user=user)
    per_run_events = n_posts / n_runs
    disconnect_p = min(0.2, FORCED_DISCONNECTS_PER_STREAM / per_run_events)

    limits = httpx.Limits(max_connections=n_streams + POSTERS + 4, max_keepalive_connections=n_streams + POSTERS + 4)
    auth = {"Authorization": f"Bearer {live_api.token(project=project, user=user)}"}
    async with httpx.AsyncClient(base_url=live_api.base_url, headers=auth, timeout=60, limits=limits) as http:
        readers = [
            ResumingReader(
                http,
                runs[i % n_runs],
                rng=random.Random(rng.random()),
                disconnect_probability=disconnect_p,
                since_probability=0.25,
            )
            for i in range(n_streams)
        ]
        early, late = readers[: max(1, n_streams // 2)], readers[max(1, n_streams // 2) :]
        tasks = [asyncio.create_task(r.run()) for r in early]
        await wait_all([r.connected for r in early], 60)

        poster = Poster(http)
        halfway = asyncio.Event()
        work: asyncio.Queue[tuple[Run, str]] = asyncio.Queue()
        for i in range(n_posts):
            work.put_nowait((runs[i % n_runs], f"load-{i}"))

        async def post_worker() -> None:
            while not work.empty():
                run, message = work.get_nowait()
                await poster.post(run, message)
                if poster.acked_count >= n_posts // 2:
                    halfway.set()

        started = time.perf_counter()
        posting = [asyncio.create_task(post_worker()) for _ in range(POSTERS)]
        async with asyncio.timeout(300):
            await halfway.wait()  # the other half of the streams opens while posts flow
        tasks += [asyncio.create_task(r.run()) for r in late]
        await asyncio.gather(*posting)
        posting_seconds = time.perf_counter() - started
        for run in runs:
            await poster.post_until_acked(run, run.sentinel)
        await wait_all([r.done for r in readers], 300)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started

        logs = {run.run_id: await read_log(http, run) for run in runs}
        for run in runs:
            done = await http.post(f"{run.path}/actions/terminate", json={"reason": "load test done"})
            assert done.status_code == 200, done.text
    figures: dict[str, Any] = {
        "seed": seed,
        "runs": n_runs,
        "streams": n_streams,
        "posts": n_posts,
        "posts_acked": poster.acked_count,
        "posts_per_second": round(n_posts / posting_seconds, 1),
        "events_delivered": sum(len(r.received) for r in readers),
        "reconnects": sum(r.reconnects for r in readers),
        "forced_disconnects": sum(r.forced for r in readers),
        "refused_opens": dict(sum((r.refused for r in readers), collections.Counter())),
        "seconds": round(elapsed, 2),
    }
    print("\nload test figures:", json.dumps(figures))

    assert not poster.failures, poster.failures
    assert poster.acked_count == n_posts + n_runs
    poster.assert_all_stored(logs)
    for reader in readers:
        reader.assert_exactly_once_in_order(logs[reader.run_ids.run_id])
    assert figures["forced_disconnects"] > 0
