"""Hostile clients against the real stack: `workflow-runs serve` (the uvicorn protocol the README
runs) on the session's real Temporal and Redis, with the sample worker, driven by raw sockets where
an HTTP library would be too polite.

Each test prints its figures (run with `-s`): memory of the API process (VmRSS) before, at peak and
after; how long the server took to close idle connections; the latency of `/health/ready` under them.
Every socket operation has a timeout and every wait a deadline; the only timing the tests rely on is
the server's own documented head timeout, which is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from cli import stack
from core.settings import Settings
from tests.support.hostile import MIB, IdleSockets, RssSampler, chunked, raise_nofile_limit, send_oversized_head
from tests.support.live import LiveApi, Services, api_url, start_api, start_worker
from tests.support.runs import start
from tests.support.waits import wait_for

pytestmark = pytest.mark.services

PROJECT = "hostile"
HEADER_TIMEOUT_SECONDS = 3
MAX_UPDATE_BYTES_PER_RUN = Settings.max_update_bytes_per_run  # the default, which the API process below runs with
MAX_MESSAGE_BYTES = 65536
MAX_DETAILS_BYTES = 262144
RATE_BURST = 20


@dataclass(frozen=True)
class HostileApi:
    """An API process of this module alone (its own limits, its own memory to measure)."""

    live: LiveApi
    port: int
    child: stack.Child

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, user: str = "u1", **kwargs: Any) -> httpx.Client:
        token = self.live.token(project=PROJECT, user=user)
        return httpx.Client(base_url=self.live.base_url, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def spawn_api(
    children: list[stack.Child], services: Services, task_queue: str, name: str, **settings: str
) -> tuple[LiveApi, int, stack.Child]:
    """An API process of its own on `services`, with `settings` (environment variables) on top."""
    port = stack.free_port()
    live = LiveApi(base_url=api_url(port), services=services, task_queue=task_queue)
    env = {
        **live.env(),
        # The figures are those of a production process: response validation off.
        "VALIDATE_RESPONSES": "0",
        "SSE_HEARTBEAT_SECONDS": "15",
        **settings,
    }
    child = start_api(children, f"hostile-{name}-{port}", port, env, services.logs)
    return live, port, child


@pytest.fixture(scope="module")
def hostile(services: Services) -> Iterator[HostileApi]:
    # Before spawning: the API inherits the raised file-descriptor limit, and needs it for test 2.
    raise_nofile_limit()
    task_queue = f"hostile-{os.getpid()}"
    children: list[stack.Child] = []
    with stack.running(children):
        live, port, api = spawn_api(
            children,
            services,
            task_queue,
            "api",
            HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT_SECONDS),
            BODY_TIMEOUT_SECONDS="2",
        )
        # The sample worker posts the runs' own updates to this API (API_URL in live.env()).
        start_worker(children, f"hostile-worker-{port}", live.env(), services.logs)
        yield HostileApi(live=live, port=port, child=api)


@dataclass(frozen=True)
class Runs:
    ingestion: tuple[str, str]  # closes by itself soon after it starts
    conversation: tuple[str, str]  # stays open, answers signals


@pytest.fixture(scope="module")
def runs(hostile: HostileApi) -> Runs:
    ingestion = start(
        hostile.live, "StandardContentIngestion", "--input", '{"documentId": "doc-hostile"}', project=PROJECT
    )
    conversation = start(hostile.live, "AgentConversation", "--interaction", "hostile", project=PROJECT)
    with hostile.client(user="waiter", timeout=30) as http:
        for workflow_id, run_id in (ingestion, conversation):
            wait_for(partial(answers_200, http, f"/workflows/runs/{workflow_id}/{run_id}"))
    return Runs(ingestion=ingestion, conversation=conversation)


def answers_200(http: httpx.Client, path: str) -> bool:
    return http.get(path).status_code == 200


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["errorCode"] == code and isinstance(body["message"], str)
    return body


# --- 1. Oversized request heads ---------------------------------------------------------------


def test_oversized_request_heads_are_refused_without_memory_growth(hostile: HostileApi) -> None:
    count, value_bytes = 10, 8 * MIB
    with RssSampler(hostile.pid) as rss, ThreadPoolExecutor(count) as pool:
        outcomes = list(
            pool.map(
                lambda _: send_oversized_head(hostile.port, "/api/v1/workflows/runs/x/y", value_bytes),
                range(count),
            )
        )
    print(f"\n[heads] {count} x {value_bytes // MIB} MiB heads:")
    for i, outcome in enumerate(outcomes):
        print(
            f"[heads]   #{i}: sent {outcome.sent} bytes, status {outcome.status_line.decode(errors='replace')!r}, "
            f"closed {outcome.closed}, stalled {outcome.stalled}"
        )
    print(f"[heads] {rss.report('heads')}")
    assert all(outcome.refused(within=MIB) for outcome in outcomes), outcomes
    assert rss.growth < 50 * MIB


# --- 2. Idle and half-open connections --------------------------------------------------------


def test_idle_connections_are_closed_after_the_head_timeout_and_ready_still_answers(hostile: HostileApi) -> None:
    soft, hard = raise_nofile_limit()
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit is {hard}: 2,000 idle sockets and the API's need at least 4096")
    assert soft == resource.RLIM_INFINITY or soft >= 4096
    idle = IdleSockets(hostile.port, 2000)
    try:
        started = time.monotonic()
        idle.open()
        opened_in = time.monotonic() - started
        before = time.monotonic()
        ready = httpx.get(f"{hostile.origin}/health/ready", timeout=10)
        ready_latency = time.monotonic() - before
        closed_during_ready = idle.poll_closed()
        idle.wait_closed(deadline=started + opened_in + HEADER_TIMEOUT_SECONDS + 10)
        print(
            f"\n[idle] {idle.count} idle sockets opened in {opened_in:.2f} s; /health/ready {ready.status_code} "
            f"in {ready_latency * 1000:.1f} ms ({closed_during_ready} already closed by then)"
        )
        if idle.closed_after:
            print(
                f"[idle] closed by the server: {len(idle.closed_after)}, after {min(idle.closed_after):.2f} s "
                f"to {max(idle.closed_after):.2f} s (head timeout {HEADER_TIMEOUT_SECONDS} s); "
                f"{idle.answered} got bytes first; still open {idle.still_open}"
            )
        assert ready.status_code == 200, ready.text
        assert idle.still_open == 0
    finally:
        idle.close()


# --- 3. A run full of maximum-size updates, read by concurrent clients ------------------------


def test_full_run_read_concurrently_stays_bounded(hostile: HostileApi) -> None:
    workflow_id, run_id = start(
        hostile.live, "StandardContentIngestion", "--input", '{"documentId": "doc-fill"}', project=PROJECT
    )
    details = {"blob": "d" * (MAX_DETAILS_BYTES - len(orjson.dumps({"blob": ""})))}
    assert len(orjson.dumps(details)) == MAX_DETAILS_BYTES
    body = orjson.dumps({"type": "FILL", "message": "m" * MAX_MESSAGE_BYTES, "details": details})
    per_update = MAX_MESSAGE_BYTES + MAX_DETAILS_BYTES
    posts = -(-MAX_UPDATE_BYTES_PER_RUN // per_update) + 6  # past the bound, so the oldest are dropped
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with hostile.client(user="filler", timeout=30) as http:
        # Closed first: the worker posts nothing more, so what is stored stays what the readers expect.
        wait_for(lambda: http.get(base).json().get("status") == "COMPLETED")
        with RssSampler(hostile.pid) as fill_rss:
            for _ in range(posts):
                posted = http.post(
                    f"/workflows/runs/{run_id}/updates", content=body, headers={"Content-Type": "application/json"}
                )
                assert posted.status_code == 200, posted.text
        stored = http.get(f"{base}/updates").json()["messages"]
    fills = sum(1 for u in stored if u["type"] == "FILL")
    print(
        f"\n[fill] posted {posts} updates of {len(body) / 1024:.0f} KiB; {len(stored)} stored ({fills} FILL); "
        f"{fill_rss.report('fill')}"
    )

    def get_updates(_: int) -> int:
        with hostile.client(user="reader", timeout=60) as http:
            response = http.get(f"{base}/updates")
            assert response.status_code == 200
            assert len(response.json()["messages"]) == len(stored)
            return len(response.content)

    def stream_updates(_: int) -> int:
        delivered = 0
        with (
            hostile.client(user="streamer", timeout=60) as http,
            connect_sse(http, "GET", f"{base}/stream", params={"since": 0}) as source,
        ):
            assert source.response.status_code == 200
            for event in source.iter_sse():
                if event.event == "message":
                    delivered += 1
                if delivered == len(stored) or event.event == "end":
                    break
        return delivered

    with RssSampler(hostile.pid) as rss, ThreadPoolExecutor(8) as pool:
        got = [pool.submit(get_updates, i) for i in range(4)]
        streamed = [pool.submit(stream_updates, i) for i in range(4)]
        sizes = [f.result() for f in got]
        deliveries = [f.result() for f in streamed]
    print(f"[fill] GET .../updates body sizes {[f'{s / MIB:.2f} MiB' for s in sizes]}; streams delivered {deliveries}")
    print(
        f"[fill] {rss.report('4 GET + 4 streams')}; "
        f"growth since before the posts {(rss.peak - fill_rss.before) / MIB:.1f} MiB"
    )
    assert fills < posts, "the per-run byte bound drops the oldest updates"
    assert max(sizes) <= MAX_UPDATE_BYTES_PER_RUN + 64 * 1024
    assert deliveries == [len(stored)] * 4
    assert rss.peak - fill_rss.before < 200 * MIB


# --- 4. Chunked request bodies ----------------------------------------------------------------

JSON_TYPE = {"Content-Type": "application/json"}
TOO_BIG = orjson.dumps({"message": "x" * (2 * MIB)})  # twice MAX_BODY_BYTES


def test_chunked_update_is_stored_and_an_oversized_one_is_413(hostile: HostileApi, runs: Runs) -> None:
    workflow_id, run_id = runs.conversation
    marker = f"chunked-{time.time_ns()}"
    with hostile.client(user="chunker", timeout=30) as http:
        posted = http.post(
            f"/workflows/runs/{run_id}/updates",
            content=chunked(orjson.dumps({"type": "CHUNKED", "message": marker})),
            headers=JSON_TYPE,
        )
        assert posted.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in posted.request.headers
        refused = http.post(f"/workflows/runs/{run_id}/updates", content=chunked(TOO_BIG), headers=JSON_TYPE)
        print(f"\n[chunked] update: {posted.status_code} {posted.text[:120]!r}; 2 MiB: {refused.status_code}")
        assert posted.status_code == 200, posted.text
        messages = http.get(f"/workflows/runs/{workflow_id}/{run_id}/updates").json()["messages"]
        assert marker in [u["message"] for u in messages]
        assert_error(refused, 413, "payload_too_large")


def test_chunked_signal_is_delivered_and_an_oversized_one_is_413(hostile: HostileApi, runs: Runs) -> None:
    workflow_id, run_id = runs.conversation
    signal = f"/workflows/runs/{workflow_id}/{run_id}/signal/UserInput"
    with hostile.client(user="chunker", timeout=30) as http:
        signalled = http.post(signal, content=chunked(orjson.dumps({"message": "chunked hello"})), headers=JSON_TYPE)
        assert signalled.request.headers.get("transfer-encoding") == "chunked"
        refused = http.post(signal, content=chunked(TOO_BIG), headers=JSON_TYPE)
        print(f"\n[chunked] signal: {signalled.status_code} {signalled.text[:120]!r}; 2 MiB: {refused.status_code}")
        assert signalled.status_code == 200, signalled.text
        assert signalled.json()["status"] == "success"
        assert_error(refused, 413, "payload_too_large")


# --- 5. NUL in every filter -------------------------------------------------------------------

FILTERS = ("document_id", "event_name", "rule_id", "search_term", "initiated_by", "type", "query")
BACKEND_WORDS = ("sql", "syntax", "temporal", "visibility", "grpc", "rpc error", "invalidargument")


@pytest.mark.parametrize("listing", ["/workflows/runs", "/workflows/conversations"])
@pytest.mark.parametrize("name", FILTERS)
def test_nul_in_a_filter_is_a_plain_400(hostile: HostileApi, listing: str, name: str) -> None:
    with hostile.client(user="nul", timeout=30) as http:
        response = http.post(listing, json={name: "abc\u0000def"})
    print(f"\n[nul] {listing} {name}: {response.status_code} {response.text[:200]!r}", end="")
    body = assert_error(response, 400, "invalid_request")
    assert "retry-after" not in response.headers
    message = body["message"].lower()
    assert len(message) < 300, message
    assert not [word for word in BACKEND_WORDS if word in message], body["message"]


# --- 6. Tampered page tokens ------------------------------------------------------------------


def test_tampered_or_invented_page_tokens_are_400(hostile: HostileApi, runs: Runs) -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    with hostile.client(user="pager", timeout=30) as http:
        token: str = wait_for(lambda: http.post("/workflows/runs", json={"page_size": 1}).json().get("next_page_token"))
        assert http.post("/workflows/runs", json={"page_size": 1, "next_page_token": token}).status_code == 200
        middle = len(token.rstrip("=")) // 2
        flipped = alphabet[(alphabet.index(token[middle]) + 1) % len(alphabet)]
        tampered = token[:middle] + flipped + token[middle + 1 :]
        for bad in (tampered, "bm90LWEtdG9rZW4", "A" * 64):
            response = http.post("/workflows/runs", json={"page_size": 1, "next_page_token": bad})
            body = assert_error(response, 400, "invalid_request")
            print(f"\n[token] {bad[:24]}...: {response.status_code} {body['message']!r}", end="")


# --- 7. Per-principal rate limit --------------------------------------------------------------


@pytest.fixture
def rate_limited(hostile: HostileApi) -> Iterator[LiveApi]:
    """A second API process whose Temporal bucket is small: 1/s, burst RATE_BURST."""
    children: list[stack.Child] = []
    with stack.running(children):
        live, _, _ = spawn_api(
            children,
            hostile.live.services,
            hostile.live.task_queue,
            "rate",
            RATE_LIMIT_TEMPORAL_PER_SECOND="1",
            RATE_LIMIT_TEMPORAL_BURST=str(RATE_BURST),
        )
        yield live


async def test_a_principal_over_its_rate_gets_429_and_others_do_not_notice(rate_limited: LiveApi, runs: Runs) -> None:
    workflow_id, run_id = runs.ingestion
    path = f"/workflows/runs/{workflow_id}/{run_id}"

    def client(user: str) -> httpx.AsyncClient:
        token = rate_limited.token(project=PROJECT, user=user)
        return httpx.AsyncClient(
            base_url=rate_limited.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    async with client("greedy") as greedy, client("polite") as polite:
        greedy_calls = [greedy.get(path) for _ in range(3 * RATE_BURST)]
        polite_calls = [polite.get(path) for _ in range(20)]
        answers = await asyncio.gather(*greedy_calls, *polite_calls)
    greedy_answers, polite_answers = answers[: 3 * RATE_BURST], answers[3 * RATE_BURST :]
    limited = [r for r in greedy_answers if r.status_code == 429]
    print(
        f"\n[rate] greedy: {sum(r.status_code == 200 for r in greedy_answers)} x 200, {len(limited)} x 429 "
        f"(Retry-After {sorted({r.headers.get('retry-after') for r in limited})}); "
        f"polite: {[r.status_code for r in polite_answers].count(200)} x 200 of {len(polite_answers)}"
    )
    assert {r.status_code for r in greedy_answers} <= {200, 429}
    assert limited
    for response in limited:
        assert_error(response, 429, "too_many_requests")
        assert int(response.headers["retry-after"]) >= 1
    assert [r.status_code for r in polite_answers] == [200] * 20


# --- 8. Headers, trailing slashes, the first bytes of a stream --------------------------------


@pytest.mark.parametrize("what", ["run", "unknown run", "ready", "bad body"])
def test_no_server_header_and_nosniff(hostile: HostileApi, runs: Runs, what: str) -> None:
    workflow_id, run_id = runs.conversation
    with hostile.client(user="headers", timeout=30) as http:
        response = {
            "run": lambda: http.get(f"/workflows/runs/{workflow_id}/{run_id}"),
            "unknown run": lambda: http.get("/workflows/runs/nope/nope"),
            "ready": lambda: http.get(f"{hostile.origin}/health/ready"),
            "bad body": lambda: http.post("/workflows/runs", json={"nope": 1}),
        }[what]()
    print(f"\n[headers] {what}: {response.status_code} {dict(response.headers)}", end="")
    assert "server" not in response.headers
    assert response.headers.get("x-content-type-options") == "nosniff"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "{run}/"), ("POST", "/workflows/runs/"), ("GET", "{run}/updates/")]
)
def test_a_trailing_slash_is_404_not_a_redirect(hostile: HostileApi, runs: Runs, method: str, path: str) -> None:
    workflow_id, run_id = runs.conversation
    url = path.format(run=f"/workflows/runs/{workflow_id}/{run_id}")
    with hostile.client(user="slashes", timeout=30) as http:
        response = http.request(method, url, json={} if method == "POST" else None)
    print(f"\n[slash] {method} {path}: {response.status_code} location={response.headers.get('location')}", end="")
    assert_error(response, 404, "not_found")
    assert "location" not in response.headers


def test_a_stream_sends_its_first_bytes_at_once(hostile: HostileApi, runs: Runs) -> None:
    workflow_id, run_id = runs.conversation
    with hostile.client(user="streamer", timeout=30) as http:
        started = time.monotonic()
        # A read timeout well under SSE_HEARTBEAT_SECONDS (15 s here): the heartbeat cannot be what arrives.
        stream_url = f"/workflows/runs/{workflow_id}/{run_id}/stream"
        with http.stream("GET", stream_url, timeout=httpx.Timeout(5.0)) as streamed:
            assert streamed.status_code == 200
            first = next(streamed.iter_lines())
    print(f"\n[stream] first line {first!r} after {(time.monotonic() - started) * 1000:.1f} ms (heartbeat 15 s)")
    assert first.startswith("retry:")
