"""Request spans (`web.tracing.RequestSpans`) on the in-memory app, and backend-call spans
(`core.tracing.backend_call`), recorded by the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from core import tracing
from handlers import HANDLERS
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, app_settings, bearer, fake_backends_factory
from web.app import BASE_PATH, create_app, resolved_document
from web.operations import compile_operations
from web.tracing import RequestSpans

SECRET = "tracing-unit-test-secret-" + "x" * 40
RUN = f"{BASE_PATH}/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
OPERATIONS = compile_operations(resolved_document(), HANDLERS)
# A caller's trace: W3C trace context version 00, sampled.
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider for the test: every span ends up in the returned exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


def traced(app: Any) -> RequestSpans:
    return RequestSpans(app, operations=OPERATIONS, base_path=BASE_PATH)


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The in-memory app (one RUNNING run) behind the request spans, the fast lane on."""
    app = create_app(app_settings(SECRET), fake_backends_factory(FakeRuns(status="RUNNING")))
    with TestClient(traced(app)) as test_client:
        yield test_client


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]


def only_server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = server_spans(exporter)
    return span


@pytest.mark.parametrize(
    ("query", "path"),
    [("", "the fast lane"), ("?includeHistory=false&limit=1", "Connexion")],
)
def test_a_request_span_is_named_by_its_operation_and_never_by_its_path(
    client: TestClient, spans: InMemorySpanExporter, query: str, path: str
) -> None:
    response = client.get(RUN + query, headers=bearer(SECRET))
    assert response.status_code in (200, 400), response.text  # either way it is getWorkflowRun's answer
    span = only_server_span(spans)
    assert span.name == "getWorkflowRun", path
    attributes = dict(span.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.route"] == f"{BASE_PATH}/workflows/runs/{{workflowId}}/{{runId}}"
    assert attributes["http.response.status_code"] == response.status_code
    assert attributes["url.path"] == RUN
    assert RUN_ID not in span.name and RUN_ID not in str(attributes["http.route"])
    assert span.parent is None  # no traceparent: a trace of its own


def test_a_caller_s_traceparent_is_continued(client: TestClient, spans: InMemorySpanExporter) -> None:
    response = client.post(
        f"{RUN}/signal/UserInput", json={"message": "hi"}, headers={**bearer(SECRET), "traceparent": TRACEPARENT}
    )
    assert response.status_code == 200, response.text
    span = only_server_span(spans)
    assert span.name == "signalWorkflowRun"
    assert span.context is not None and span.context.trace_id == TRACE_ID
    assert span.parent is not None and span.parent.span_id == PARENT_ID and span.parent.is_remote


def test_a_caller_s_baggage_is_not_taken_in(spans: InMemorySpanExporter) -> None:
    seen: list[object] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((baggage.get_all(), trace.get_current_span().get_span_context().trace_id))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    headers = {"traceparent": TRACEPARENT, "baggage": "tenant=someone-else"}
    test_client = TestClient(traced(inner))  # no lifespan: the inner app has none
    assert test_client.get("/health/live", headers=headers).status_code == 204
    assert seen == [({}, TRACE_ID)]  # the trace continued, the caller's baggage left out


def test_client_errors_leave_the_status_unset_and_server_errors_set_it(
    client: TestClient, spans: InMemorySpanExporter
) -> None:
    assert client.get(RUN).status_code == 401  # refused by security, before any endpoint
    refused = only_server_span(spans)
    assert refused.name == "getWorkflowRun"
    assert dict(refused.attributes or {})["http.response.status_code"] == 401
    assert refused.status.status_code is StatusCode.UNSET


async def test_a_server_error_or_an_exception_sets_the_error_status(spans: InMemorySpanExporter) -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await traced(failing)(http_scope("GET", RUN), no_body, discard)
    span = only_server_span(spans)
    attributes = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == "RuntimeError" and attributes["http.response.status_code"] == 500
    assert [event.name for event in span.events] == ["exception"]


def test_requests_outside_the_operations_are_named_by_method_and_fixed_route(
    client: TestClient, spans: InMemorySpanExporter
) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get(f"/nowhere/{RUN_ID}").status_code == 404
    assert (
        client.delete(f"{BASE_PATH}/workflows/runs/{WORKFLOW_ID}/{RUN_ID}", headers=bearer(SECRET)).status_code == 405
    )
    health, unknown, wrong_method = server_spans(spans)
    assert health.name == "GET /health/live" and dict(health.attributes or {})["http.route"] == "/health/live"
    assert unknown.name == "GET" and wrong_method.name == "DELETE"  # the method alone, never the path
    for span in (unknown, wrong_method):
        assert "http.route" not in (span.attributes or {})


def test_a_body_refused_before_routing_still_names_its_operation(spans: InMemorySpanExporter) -> None:
    # Without the lane, nothing names the operation of a body refused by the cap: the path does.
    app = create_app(app_settings(SECRET, fast_lane=False), fake_backends_factory(FakeRuns(status="RUNNING")))
    with TestClient(traced(app)) as client:
        response = client.post(
            f"{BASE_PATH}/workflows/runs/{RUN_ID}/updates",
            content=b"x" * 2_000_000,
            headers={**bearer(SECRET), "Content-Type": "application/json"},
        )
    assert response.status_code == 413
    span = only_server_span(spans)
    assert span.name == "postWorkflowRunUpdate"
    assert dict(span.attributes or {})["http.route"] == f"{BASE_PATH}/workflows/runs/{{runId}}/updates"


async def test_a_request_cancelled_by_the_server_is_not_an_error(spans: InMemorySpanExporter) -> None:
    started = asyncio.Event()

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await asyncio.Event().wait()  # until cancelled

    served = asyncio.create_task(traced(streaming)(http_scope("GET", f"{RUN}/stream"), no_body, discard))
    await started.wait()
    served.cancel()
    with pytest.raises(asyncio.CancelledError):
        await served
    span = only_server_span(spans)
    assert span.status.status_code is StatusCode.UNSET and "error.type" not in (span.attributes or {})
    assert dict(span.attributes or {})["http.response.status_code"] == 200


async def test_the_operation_recorded_in_the_scope_s_state_names_the_span(spans: InMemorySpanExporter) -> None:
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        # As the lane and the Connexion endpoint record it, on a copy of the scope.
        scope = {**scope}
        scope["state"]["operation_id"] = "listConversations"
        await respond(send, 200)

    # A path no operation has: only the recorded operation can name the span.
    await traced(endpoint)(http_scope("POST", "/elsewhere"), no_body, discard)
    span = only_server_span(spans)
    assert span.name == "listConversations"
    assert dict(span.attributes or {})["http.route"] == f"{BASE_PATH}/workflows/conversations"


async def test_a_streamed_response_s_span_ends_when_the_response_ends(spans: InMemorySpanExporter) -> None:
    opened, release = asyncio.Event(), asyncio.Event()

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
        opened.set()
        await release.wait()
        await send({"type": "http.response.body", "body": b""})

    served = asyncio.create_task(traced(stream)(http_scope("GET", f"{RUN}/stream"), no_body, discard))
    await opened.wait()
    assert server_spans(spans) == []  # open stream, open span
    release.set()
    await served
    assert only_server_span(spans).name == "streamWorkflowRunUpdates"


def test_the_app_adds_its_request_spans_only_when_tracing_is_on(spans: InMemorySpanExporter) -> None:
    for settings, expected in (
        (app_settings(SECRET), []),  # off: the middleware is not there at all
        (app_settings(SECRET, otel_traces_exporter="otlp"), ["getWorkflowRun"]),
    ):
        app = create_app(settings, fake_backends_factory(FakeRuns(status="RUNNING")))
        with TestClient(app) as client:
            assert client.get(RUN, headers=bearer(SECRET)).status_code == 200
        assert [span.name for span in server_spans(spans)] == expected, settings.otel_traces_exporter
        spans.clear()


def test_nothing_is_traced_without_a_provider(client: TestClient) -> None:
    # The middleware alone (as when web.app would add it with no provider set up) records nothing.
    assert not tracing.enabled()
    assert client.get(RUN, headers=bearer(SECRET)).status_code == 200
    tracing.backend_call("redis", "read", 0.001, failed=False)  # returns at its first line


def test_backend_calls_are_children_of_the_current_span_and_only_then(spans: InMemorySpanExporter) -> None:
    tracing.backend_call("redis", "read", 0.002, failed=False)  # outside any span: not traced
    assert spans.get_finished_spans() == ()
    with tracing.tracer().start_as_current_span("request", kind=SpanKind.SERVER) as request:
        tracing.backend_call("redis", "append", 0.002, failed=False)
        tracing.backend_call("temporal", "signal", 0.5, failed=True)
    redis, temporal, parent = spans.get_finished_spans()
    assert parent.name == "request"
    for child in (redis, temporal):
        assert child.kind is SpanKind.CLIENT
        assert child.parent is not None and child.parent.span_id == request.get_span_context().span_id
        assert child.start_time is not None and child.end_time is not None
    assert redis.name == "redis append" and temporal.name == "temporal signal"
    assert redis.end_time is not None and redis.start_time is not None
    assert redis.end_time - redis.start_time == 2_000_000
    assert dict(redis.attributes or {})["db.system.name"] == "redis"
    assert redis.status.status_code is StatusCode.UNSET
    assert temporal.status.status_code is StatusCode.ERROR
    assert dict(temporal.attributes or {})["workflow_runs.backend"] == "temporal"


def test_the_current_context_is_injected_into_outgoing_headers(spans: InMemorySpanExporter) -> None:
    headers: dict[str, str] = {}
    tracing.inject(headers)
    assert headers == {}  # no current span: nothing to continue
    with tracing.tracer().start_as_current_span("activity") as span:
        tracing.inject(headers)
    context = span.get_span_context()
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": headers or [],
        "scheme": "http",
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    pass


async def respond(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})
