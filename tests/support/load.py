"""Clients of the update API that check what they get: `ResumingReader` streams one run's updates
and resumes after every cut (`Last-Event-ID`, or `since` as a browser does), `Poster` posts and
remembers what was acknowledged; both check every refusal's error body. The load, fault and
replica tests drive the API with them and compare what was received with the stored log."""

from __future__ import annotations

import asyncio
import collections
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from tests.support.runs import Run


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
