"""Traces across the real stack: the API (served by uvicorn in this process, on a free port), the
sample worker (in this process too) and a real Temporal and Redis, every span recorded by the SDK's
in-memory exporter. Nothing is shared in memory between the API and the worker but that exporter:
the trace context travels as it does between processes, in Temporal's headers from the API's
signal to the worker, and in `traceparent` from the worker's activity to the API.

One conversation, started untraced (as `workflow-runs start` without tracing starts it):
- the API's span for `signalWorkflowRun` is the parent of its Temporal client span, which is the
  parent of the worker's `HandleSignal` span: one trace, from the caller to the workflow;
- the answer the signal causes is posted by the `postUpdate` activity, and the API's span for that
  post (`postWorkflowRunUpdate`) is the child of the activity's span, received over HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from cli import stack
from core import temporal_connection, tracing
from core.settings import Settings
from core.tokens import mint_token
from tests.support.live import Services
from tests.support.waits import wait_until
from web.app import create_app
from workloads.shared import CONVERSATION_WORKFLOW, POST_UPDATE, USER_INPUT_SIGNAL
from workloads.starter import start_workflow
from workloads.worker import run_worker

pytestmark = pytest.mark.services

DEADLINE = 20.0


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider for the test, installed before any client connects (the
    Temporal interceptor takes its tracer then)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
def settings(services: Services) -> Settings:
    """The API's and the worker's settings, tracing on. `tracing.setup` is never called here, so
    the OTLP exporter the variable names is never built: the spans go to the test's exporter."""
    port = stack.free_port()
    return Settings.from_env(
        {
            "TEMPORAL_ADDRESS": services.temporal_address,
            "TEMPORAL_TASK_QUEUE": f"tracing-{secrets.token_hex(4)}",  # no other worker polls it
            "REDIS_URL": services.redis_url,
            "JWT_SECRET": services.jwt_secret,
            "DATA_DIR": str(services.data_dir),
            "PORT": str(port),
            "BACKEND_TIMEOUT_SECONDS": "5",
            "OTEL_TRACES_EXPORTER": "otlp",
        }
    )


@pytest.fixture
async def api(settings: Settings, spans: InMemorySpanExporter) -> AsyncIterator[httpx.AsyncClient]:
    """The API under uvicorn on `settings.port`, in this event loop, and a client of it."""
    config = uvicorn.Config(
        create_app(settings), host=stack.LOCALHOST, port=settings.port, log_config=None, lifespan="on", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), DEADLINE, "the API listens")
    assert server.started, "the API did not start"
    try:
        async with httpx.AsyncClient(base_url=settings.api_url, timeout=DEADLINE) as client:
            yield client
    finally:
        server.should_exit = True
        async with asyncio.timeout(DEADLINE):
            await task


def named(exporter: InMemorySpanExporter, name: str, kind: SpanKind | None = None) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name and (kind is None or s.kind is kind)]


def child_of(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.context is not None and parent.context is not None
    return (
        child.parent is not None
        and child.parent.span_id == parent.context.span_id
        and child.context.trace_id == parent.context.trace_id
    )


async def test_a_signal_continues_in_the_worker_and_the_update_it_causes_continues_in_the_api(
    settings: Settings, api: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    project = f"tracing-{uuid.uuid4().hex[:8]}"
    untraced = await temporal_connection.connect(replace(settings, otel_traces_exporter="none"))
    workflow_id, run_id = await start_workflow(
        untraced, CONVERSATION_WORKFLOW, project=project, user="u1", task_queue=settings.temporal_task_queue
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop=stop))
    try:
        token = mint_token(settings.jwt_secret or "", user="u1", project=project)
        signalled = await api.post(
            f"/workflows/runs/{workflow_id}/{run_id}/signal/{USER_INPUT_SIGNAL}",
            json={"message": "hello"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert signalled.status_code == 200, signalled.text

        def answered() -> bool:
            # The answer's post: the API's span of it, and the activity's span that made it.
            return bool(named(spans, "postWorkflowRunUpdate")) and bool(named(spans, f"RunActivity:{POST_UPDATE}"))

        await wait_until(lambda: answered() or worker.done(), DEADLINE, "the answer is posted")
        assert not worker.done(), worker
    finally:
        stop.set()
        await untraced.get_workflow_handle(workflow_id, run_id=run_id).terminate("test over")
        async with asyncio.timeout(DEADLINE):
            await worker

    [request] = named(spans, "signalWorkflowRun", SpanKind.SERVER)
    [client_call] = named(spans, f"SignalWorkflow:{USER_INPUT_SIGNAL}", SpanKind.CLIENT)
    [handled] = named(spans, f"HandleSignal:{USER_INPUT_SIGNAL}", SpanKind.SERVER)
    assert child_of(client_call, request)
    assert child_of(handled, client_call)  # in the worker, from the signal's Temporal headers
    assert handled.parent is not None and handled.parent.is_remote

    [post] = named(spans, "postWorkflowRunUpdate", SpanKind.SERVER)
    [activity] = named(spans, f"RunActivity:{POST_UPDATE}", SpanKind.SERVER)
    assert child_of(post, activity)  # in the API, from the post's `traceparent`
    assert post.parent is not None and post.parent.is_remote
    assert dict(post.attributes or {})["http.response.status_code"] == 200
