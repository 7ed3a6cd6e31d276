"""The Prometheus series (`core.metrics`), read back from a scrape after requests through the app.

Series are process-wide and other tests record into them too: every assertion compares a scrape
taken before with one taken after.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message, Receive, Scope, Send
from temporalio.api.common.v1 import Payload
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionRequest, ListWorkflowExecutionsRequest
from temporalio.service import RPCError, RPCStatusCode

from backends.codec_client import CodecClient
from backends.temporal_runs import TemporalRunsBackend, _timed_history
from core import metrics
from core.codec_wire import payloads_json
from core.errors import BackendUnavailable, NotFound
from core.principals import Principal
from handlers import HANDLERS
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, app_settings, bearer, fake_backends_factory
from web.app import BASE_PATH, create_app
from web.metrics import RequestMetrics

SECRET = "metrics-unit-test-secret-" + "x" * 40
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
POST = f"/api/v1/workflows/runs/{RUN_ID}/updates"
FIXED_LABELS = {"health_live", "health_ready", "docs", "other"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> Samples:
    """Every sample of this process's registry, as a scraper parses the text format."""
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def requests(before: Samples, after: Samples, operation: str, status: int) -> float:
    return grew(before, after, "workflow_runs_requests_total", operation=operation, status=str(status))


def client_of(fast_lane: bool = True, *, runs: FakeRuns | None = None, **settings: Any) -> Any:
    app = create_app(
        app_settings(SECRET, fast_lane=fast_lane, **settings),
        fake_backends_factory(runs or FakeRuns(status="RUNNING")),
        clock=lambda: 1000.0,  # rate limits never refill during a test
    )
    return app.test_client()


@pytest.fixture(scope="module", params=[True, False], ids=["fast-lane", "connexion"])
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    with client_of(fast_lane=request.param) as client:
        yield client


# -- requests ---------------------------------------------------------------------------------------


def test_each_answer_is_counted_under_its_operation_and_status_and_timed(client: Any) -> None:
    before = scrape()
    assert client.get(RUN, headers=bearer(SECRET)).status_code == 200
    assert client.post(POST, json={"message": "m"}, headers=bearer(SECRET)).status_code == 200
    assert client.post("/api/v1/workflows/runs", json={}, headers=bearer(SECRET)).status_code == 200
    after = scrape()
    assert requests(before, after, "getWorkflowRun", 200) == 1
    assert requests(before, after, "postWorkflowRunUpdate", 200) == 1
    assert requests(before, after, "listWorkflowRuns", 200) == 1
    for operation in ("getWorkflowRun", "postWorkflowRunUpdate", "listWorkflowRuns"):
        assert grew(before, after, "workflow_runs_request_seconds_count", operation=operation) == 1
        assert grew(before, after, "workflow_runs_request_seconds_bucket", operation=operation, le="+Inf") == 1
        assert grew(before, after, "workflow_runs_request_seconds_sum", operation=operation) > 0


def test_refusals_before_the_endpoint_still_name_their_operation(client: Any) -> None:
    """A 401 (no token) is Connexion's answer whichever path the request took first: it names the
    operation of its route all the same, for the lane's operations and for the others."""
    before = scrape()
    assert client.get(RUN).status_code == 401
    assert client.post("/api/v1/workflows/runs", json={}).status_code == 401
    assert client.post("/api/v1/workflows/runs", json={"nope": 1}, headers=bearer(SECRET)).status_code == 400
    after = scrape()
    assert requests(before, after, "getWorkflowRun", 401) == 1
    assert requests(before, after, "listWorkflowRuns", 401) == 1
    assert requests(before, after, "listWorkflowRuns", 400) == 1


def test_health_checks_documents_and_unknown_routes_have_fixed_labels_never_a_path(client: Any) -> None:
    before = scrape()
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    for document in ("/api/v1/openapi.json", "/api/v1/openapi.yaml", "/api/v1/ui/"):
        assert client.get(document).status_code == 200
    for unknown in ("/nope", f"/api/v1/workflows/{RUN_ID}", "/api/v1/workflows/runs/a/b/c/d", "/metrics"):
        assert client.get(unknown).status_code == 404
    after = scrape()
    assert requests(before, after, "health_live", 200) == 1
    assert requests(before, after, "health_ready", 200) == 1
    assert requests(before, after, "docs", 200) == 3
    assert requests(before, after, "other", 404) == 4
    labels = {dict(key[1])["operation"] for key in after if key[0] == "workflow_runs_requests_total"}
    assert labels <= set(HANDLERS) | FIXED_LABELS, labels


class FailingRuns(FakeRuns):
    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> Any:
        raise RuntimeError("a bug")


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "connexion"])
def test_an_unexpected_error_is_a_500_of_its_operation(fast_lane: bool) -> None:
    before = scrape()
    with client_of(fast_lane, runs=FailingRuns()) as client:
        assert client.get(RUN, headers=bearer(SECRET)).status_code == 500
    assert requests(before, scrape(), "getWorkflowRun", 500) == 1


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "connexion"])
def test_rate_limit_refusals_are_counted_by_bucket(fast_lane: bool) -> None:
    before = scrape()
    limits: dict[str, Any] = {
        "rate_limit_updates_per_second": 1,
        "rate_limit_updates_burst": 1,
        "rate_limit_temporal_per_second": 0,
    }
    with client_of(fast_lane, **limits) as client:
        assert client.post(POST, json={"message": "m"}, headers=bearer(SECRET)).status_code == 200
        assert client.post(POST, json={"message": "m"}, headers=bearer(SECRET)).status_code == 429
    after = scrape()
    assert grew(before, after, "workflow_runs_rate_limit_refusals_total", bucket="updates") == 1
    assert grew(before, after, "workflow_runs_rate_limit_refusals_total", bucket="temporal") == 0
    assert requests(before, after, "postWorkflowRunUpdate", 429) == 1


# -- the middleware alone ---------------------------------------------------------------------------


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _call(app: Any, path: str = "/x") -> None:
    async def send(message: Message) -> None:
        pass

    await RequestMetrics(app, base_path=BASE_PATH)({"type": "http", "path": path}, _receive, send)


async def test_an_exception_before_any_answer_is_the_500_it_becomes() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["operation_id"] = "getWorkflowRun"
        raise RuntimeError("a bug")

    before = scrape()
    with pytest.raises(RuntimeError):
        await _call(broken)
    assert requests(before, scrape(), "getWorkflowRun", 500) == 1


async def test_a_request_never_answered_is_a_499() -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None  # the client left: nothing to answer

    before = scrape()
    await _call(silent)
    assert requests(before, scrape(), "other", 499) == 1


async def test_a_stream_whose_client_leaves_after_its_head_counts_as_the_answer_it_began() -> None:
    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["operation_id"] = "streamWorkflowRunUpdates"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})

    async def gone_after_head(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the client left")

    before = scrape()
    with pytest.raises(OSError):
        await RequestMetrics(stream, base_path=BASE_PATH)({"type": "http", "path": "/s"}, _receive, gone_after_head)
    after = scrape()
    assert requests(before, after, "streamWorkflowRunUpdates", 200) == 1
    assert requests(before, after, "streamWorkflowRunUpdates", 500) == 0
    assert grew(before, after, "workflow_runs_request_seconds_count", operation="streamWorkflowRunUpdates") == 1


# -- streams ----------------------------------------------------------------------------------------


def test_a_stream_is_open_until_its_first_end_reason() -> None:
    before = scrape()
    record = metrics.StreamRecord()
    assert grew(before, scrape(), "workflow_runs_open_streams") == 1
    record.ended("slow_reader")
    record.ended("client_gone")  # the response's own end, after the generator's: not counted
    after = scrape()
    assert grew(before, after, "workflow_runs_open_streams") == 0
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="slow_reader") == 1
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="client_gone") == 0


def test_every_end_reason_is_exported_from_the_start() -> None:
    samples = scrape()
    for reason in ("run_closed", "client_gone", "slow_reader", "server_shutdown", "token_expired", "backend_error"):
        assert ("workflow_runs_streams_ended_total", frozenset({("reason", reason)})) in samples
    with pytest.raises(KeyError):
        metrics.StreamRecord().ended("bored")


def test_deliveries_are_counted_in_batches_and_all_by_the_end() -> None:
    before = scrape()
    record = metrics.StreamRecord()
    for _ in range(metrics.DELIVERIES_BATCH + 3):
        record.delivered()
    assert grew(before, scrape(), "workflow_runs_stream_events_total") == metrics.DELIVERIES_BATCH
    record.flush()  # an idle stream (its heartbeat) adds what it counted
    assert grew(before, scrape(), "workflow_runs_stream_events_total") == metrics.DELIVERIES_BATCH + 3
    record.delivered()
    record.ended("run_closed")
    after = scrape()
    assert grew(before, after, "workflow_runs_stream_events_total") == metrics.DELIVERIES_BATCH + 4
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="run_closed") == 1


def test_a_stream_dropped_without_an_end_ends_as_client_gone() -> None:
    before = scrape()
    record = metrics.StreamRecord()
    del record
    gc.collect()
    after = scrape()
    assert grew(before, after, "workflow_runs_open_streams") == 0
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="client_gone") == 1


def test_stream_limit_refusals_are_counted_by_limit() -> None:
    before = scrape()
    metrics.stream_limit_refused("principal")
    metrics.stream_limit_refused("process")
    metrics.stream_limit_refused("process")
    after = scrape()
    assert grew(before, after, "workflow_runs_stream_limit_refusals_total", limit="principal") == 1
    assert grew(before, after, "workflow_runs_stream_limit_refusals_total", limit="process") == 2


# -- Temporal ---------------------------------------------------------------------------------------

ME = Principal(user_id="u1", project_id="p1", permissions=frozenset({"workflow:run"}))


class Temporal:
    """Just enough of temporalio's client: every describe and listing fails with `error`."""

    namespace = "default"

    def __init__(self, error: RPCError) -> None:
        self.error = error
        self.workflow_service = self
        self.service_client = SimpleNamespace(config=SimpleNamespace(target_host="fake:7233"))

    async def describe_workflow_execution(self, request: DescribeWorkflowExecutionRequest, **_: Any) -> Any:
        raise self.error

    async def list_workflow_executions(self, request: ListWorkflowExecutionsRequest, **_: Any) -> Any:
        raise self.error

    async def get_system_info(self, request: Any, **_: Any) -> Any:
        raise self.error

    def get_workflow_handle(self, workflow_id: str, *, run_id: str) -> Any:
        return SimpleNamespace(id=workflow_id)


def temporal_calls(before: Samples, after: Samples, call: str) -> tuple[float, float]:
    """(calls, failed calls) to Temporal's `call` between the two scrapes."""
    labels = {"backend": "temporal", "call": call}
    return (
        grew(before, after, "workflow_runs_backend_call_seconds_count", **labels),
        grew(before, after, "workflow_runs_backend_call_errors_total", **labels),
    )


async def test_temporal_calls_are_timed_and_only_those_it_could_not_answer_are_errors() -> None:
    answered_no = TemporalRunsBackend(Temporal(RPCError("not found", RPCStatusCode.NOT_FOUND, b"")))  # type: ignore[arg-type]
    down = TemporalRunsBackend(Temporal(RPCError("down", RPCStatusCode.UNAVAILABLE, b"")))  # type: ignore[arg-type]
    before = scrape()
    with pytest.raises(NotFound):
        await answered_no.find_run(ME, RUN_ID, WORKFLOW_ID)  # a describe
    with pytest.raises(NotFound):
        await answered_no.find_run(ME, RUN_ID)  # a listing
    with pytest.raises(BackendUnavailable):
        await down.find_run(ME, RUN_ID, WORKFLOW_ID)
    with pytest.raises(BackendUnavailable):
        await down.ping()
    after = scrape()
    assert temporal_calls(before, after, "describe") == (2, 1)
    assert temporal_calls(before, after, "list") == (1, 0)
    assert temporal_calls(before, after, "ping") == (1, 1)


async def _pages(count: int, error: Exception | None = None) -> AsyncIterator[int]:
    for event in range(count):
        yield event
    if error is not None:
        raise error


async def test_a_history_read_is_one_call_however_it_ends() -> None:
    before = scrape()
    assert [event async for event in _timed_history(_pages(3))] == [0, 1, 2]  # type: ignore[arg-type]
    with pytest.raises(RPCError):
        async for _ in _timed_history(_pages(2, RPCError("down", RPCStatusCode.UNAVAILABLE, b""))):  # type: ignore[arg-type]
            pass
    stopped = _timed_history(_pages(10))  # type: ignore[arg-type]
    async for _ in stopped:
        break  # the view is full: no further page is read
    await stopped.aclose()
    after = scrape()
    assert temporal_calls(before, after, "history") == (3, 1)


# -- the codec server -------------------------------------------------------------------------------


def codec(status: int, answer: Callable[[bytes], bytes] = lambda sent: sent) -> CodecClient:
    """A codec client whose server answers `status` with `answer(what was sent)`."""

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, stream=httpx.ByteStream(answer(request.content)))

    return CodecClient("http://codec", None, "default", transport=httpx.MockTransport(serve))


async def test_codec_calls_are_timed_and_failures_counted() -> None:
    payloads = [Payload(metadata={"encoding": b"json/plain"}, data=b"1")]
    echo, broken, short = codec(200), codec(500), codec(200, lambda sent: payloads_json([]))
    before = scrape()
    assert await echo.decode(payloads) == payloads
    assert await echo.encode(payloads) == payloads
    with pytest.raises(BackendUnavailable):
        await broken.decode(payloads)
    with pytest.raises(BackendUnavailable):
        await short.decode(payloads)
    after = scrape()
    for client in (echo, broken, short):
        await client.aclose()

    def calls(call: str) -> tuple[float, float]:
        labels = {"backend": "codec", "call": call}
        return (
            grew(before, after, "workflow_runs_backend_call_seconds_count", **labels),
            grew(before, after, "workflow_runs_backend_call_errors_total", **labels),
        )

    assert calls("decode") == (3, 2)
    assert calls("encode") == (1, 0)


def test_a_stream_not_counted_records_nothing() -> None:
    before = scrape()
    metrics.NOT_COUNTED.delivered()
    metrics.NOT_COUNTED.flush()
    metrics.NOT_COUNTED.ended("run_closed")
    after = scrape()
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="run_closed") == 0
    assert grew(before, after, "workflow_runs_stream_events_total") == 0
    assert metrics.NOT_COUNTED.reason is None
