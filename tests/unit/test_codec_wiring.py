"""The runs backend with a codec server (TEMPORAL_CODEC_ENDPOINT): what Temporal holds encrypted is
shown decoded (input, result, memo, history results and signal payloads, pending activities' failures),
in one codec request per describe, per history page and per listing page; a signal is encoded before
it is sent; the codec server down is a 503 with the API's own sentence. Temporal is a fake here (the
real thing is tests/integration/test_codec.py); the codec server is the real app, over ASGI."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution, WorkflowType
from temporalio.api.enums.v1 import EventType, WorkflowExecutionStatus
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import (
    ActivityTaskCompletedEventAttributes,
    ActivityTaskScheduledEventAttributes,
    HistoryEvent,
    WorkflowExecutionCompletedEventAttributes,
    WorkflowExecutionSignaledEventAttributes,
    WorkflowExecutionStartedEventAttributes,
)
from temporalio.api.workflow.v1 import PendingActivityInfo, WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import (
    DescribeWorkflowExecutionRequest,
    DescribeWorkflowExecutionResponse,
    ListWorkflowExecutionsRequest,
    ListWorkflowExecutionsResponse,
    SignalWorkflowExecutionRequest,
    SignalWorkflowExecutionResponse,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import default as default_converter
from temporalio.converter import encode_search_attributes

from backends.codec_client import CodecClient
from backends.memory import MemoryUpdates
from backends.temporal_runs import TemporalRunsBackend, codec_client
from core.errors import BackendUnavailable
from core.principals import Principal
from core.protocols import RunFilters
from core.search_attributes import INITIATED_BY, PROJECT_ID
from core.settings import Settings
from tests.support.fakes import app_settings, bearer
from tests.support.tls import served
from web.app import create_app
from web.errors import UNAVAILABLE
from workloads.codec import ENCODING, EncryptionCodec
from workloads.codec_server import create_codec_app

KEY = secrets.token_bytes(32)
CODEC = EncryptionCodec(KEY)
WORKFLOW_ID, RUN_ID = "wf-1", "3f1c9a52-8b7e-4d21-9c55-0a6e2b7d41f8"
PRINCIPAL = Principal(user_id="u1", project_id="p1", permissions=frozenset({"workflow:read"}))
SECRET = "s" * 32
ENDPOINT = "http://codec.internal/{namespace}"


def encrypted(value: Any) -> Payload:
    return CODEC.encrypt(default_converter().payload_converter.to_payload(value))


def payloads(value: Any) -> Payloads:
    return Payloads(payloads=[encrypted(value)])


def event(event_id: int, kind: int, **attributes: Any) -> HistoryEvent:
    out = HistoryEvent(event_id=event_id, event_type=kind)  # type: ignore[arg-type]
    for name, value in attributes.items():
        getattr(out, name).CopyFrom(value)
    out.event_time.FromSeconds(1_700_000_000 + event_id)
    return out


HISTORY = [
    event(
        1,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        workflow_execution_started_event_attributes=WorkflowExecutionStartedEventAttributes(
            input=payloads({"documentId": "doc-1"})
        ),
    ),
    event(
        2,
        EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        activity_task_scheduled_event_attributes=ActivityTaskScheduledEventAttributes(
            activity_id="1", input=payloads({"page": 1})
        ),
    ),
    event(
        3,
        EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
        activity_task_completed_event_attributes=ActivityTaskCompletedEventAttributes(
            scheduled_event_id=2, result=payloads({"chunks": 3})
        ),
    ),
    event(
        4,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        workflow_execution_signaled_event_attributes=WorkflowExecutionSignaledEventAttributes(
            signal_name="user_message", input=payloads({"message": "hello"})
        ),
    ),
    event(
        5,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        workflow_execution_completed_event_attributes=WorkflowExecutionCompletedEventAttributes(
            result=payloads({"success": True})
        ),
    ),
]


def run_info(status: int = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED) -> WorkflowExecutionInfo:
    info = WorkflowExecutionInfo(
        execution=WorkflowExecution(workflow_id=WORKFLOW_ID, run_id=RUN_ID),
        type=WorkflowType(name="StandardContentIngestion"),
        status=status,  # type: ignore[arg-type]
        history_length=len(HISTORY),
    )
    info.start_time.FromSeconds(1_700_000_000)
    if status != WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
        info.close_time.FromSeconds(1_700_000_060)
    attributes = TypedSearchAttributes(
        [SearchAttributePair(PROJECT_ID, "p1"), SearchAttributePair(INITIATED_BY, "user:u1")]
    )
    encode_search_attributes(attributes, info.search_attributes)
    info.memo.fields["topic"].CopyFrom(encrypted("quarterly report"))
    info.memo.fields["activity_state"].CopyFrom(encrypted("working"))
    return info


def encoded_failure(message: str) -> Failure:
    """A failure whose message went into `encoded_attributes` (encode_common_attributes), encrypted."""
    return Failure(message="Encoded failure", encoded_attributes=encrypted({"message": message, "stack_trace": "at x"}))


@dataclass
class FakeTemporal:
    """Just enough of temporalio's client for the runs backend: describe, list, history, signal."""

    running: bool = False
    listed: list[WorkflowExecutionInfo] = field(default_factory=list)
    signals: list[SignalWorkflowExecutionRequest] = field(default_factory=list)
    namespace: str = "default"
    data_converter: Any = field(default_factory=default_converter)
    config: Any = field(default_factory=lambda: SimpleNamespace(identity="test@fake", target_host="fake:7233"))

    @property
    def workflow_service(self) -> FakeTemporal:
        return self

    @property
    def service_client(self) -> FakeTemporal:
        return self

    async def describe_workflow_execution(
        self, request: DescribeWorkflowExecutionRequest, **_: Any
    ) -> DescribeWorkflowExecutionResponse:
        status = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING if self.running else None
        info = run_info(status) if status is not None else run_info()
        pending = PendingActivityInfo(activity_id="1", last_failure=encoded_failure("disk full"))
        pending.heartbeat_details.CopyFrom(payloads({"progress": 40}))
        return DescribeWorkflowExecutionResponse(workflow_execution_info=info, pending_activities=[pending])

    async def list_workflow_executions(
        self, request: ListWorkflowExecutionsRequest, **_: Any
    ) -> ListWorkflowExecutionsResponse:
        return ListWorkflowExecutionsResponse(executions=self.listed if not request.next_page_token else [])

    async def signal_workflow_execution(
        self, request: SignalWorkflowExecutionRequest, **_: Any
    ) -> SignalWorkflowExecutionResponse:
        self.signals.append(request)
        return SignalWorkflowExecutionResponse()

    def get_workflow_handle(self, workflow_id: str, *, run_id: str) -> FakeHandle:
        return FakeHandle()


class FakeHandle:
    id = WORKFLOW_ID

    async def fetch_history_events(self, **_: Any) -> AsyncIterator[HistoryEvent]:
        for item in HISTORY:
            copy = HistoryEvent()
            copy.CopyFrom(item)
            yield copy


class CountingCodec(httpx.AsyncBaseTransport):
    """The real codec server over ASGI, counting the requests it gets (or down, refusing them)."""

    def __init__(self) -> None:
        self.inner = httpx.ASGITransport(create_codec_app(KEY, auth=None, cors_origins=[]))
        self.requests: list[httpx.Request] = []
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    def sizes(self) -> list[int]:
        return [len(json.loads(r.content)["payloads"]) for r in self.requests]


@pytest.fixture
def transport() -> CountingCodec:
    return CountingCodec()


@pytest.fixture
def temporal() -> FakeTemporal:
    return FakeTemporal()


@pytest.fixture
async def backend(temporal: FakeTemporal, transport: CountingCodec) -> AsyncIterator[TemporalRunsBackend]:
    codec = CodecClient(ENDPOINT, None, "default", transport=transport)
    runs = TemporalRunsBackend(temporal, codec=codec)  # type: ignore[arg-type]
    yield runs
    await runs.close()


async def test_run_details_show_every_payload_decoded_in_one_request_per_describe_and_per_history_page(
    backend: TemporalRunsBackend, transport: CountingCodec
) -> None:
    run = await backend.get_run(PRINCIPAL, WORKFLOW_ID, RUN_ID)

    assert run["input"] == {"documentId": "doc-1"}
    assert run["result"] == {"success": True}
    assert run["memo"] == {"activity_state": "working", "topic": "quarterly report"}
    assert (run["topic"], run["activity_state"]) == ("quarterly report", "working")
    history = {e["event_id"]: e for e in run["history"]}
    assert history[2]["activity"]["input"] == [{"page": 1}]
    assert history[3]["result"] == [{"chunks": 3}]
    assert history[4]["signal"] == {"name": "user_message", "input": [{"message": "hello"}]}
    assert history[5]["result"] == [{"success": True}]
    assert run["pendingActivities"][0]["lastFailure"] == "disk full"
    # The describe's payloads (2 memo fields, the failure's attributes; never the heartbeat details,
    # which are not shown), then the history page's 5, to one endpoint with the namespace put in.
    assert transport.sizes() == [3, 5]
    assert {str(r.url) for r in transport.requests} == {"http://codec.internal/default/decode"}


async def test_the_listing_decodes_a_pages_memos_in_one_request_and_asks_nothing_without_memos(
    backend: TemporalRunsBackend, transport: CountingCodec, temporal: FakeTemporal
) -> None:
    temporal.listed = [run_info(), run_info()]
    page = await backend.list_runs(PRINCIPAL, RunFilters())
    assert [run["topic"] for run in page.runs] == ["quarterly report"] * 2
    assert transport.sizes() == [4]

    bare = run_info()
    bare.memo.Clear()
    temporal.listed = [bare]
    transport.down = True  # not asked: nothing to decode
    assert [run["run_id"] for run in (await backend.list_runs(PRINCIPAL, RunFilters())).runs] == [RUN_ID]


async def test_a_look_up_by_run_id_does_not_ask_the_codec_server(
    backend: TemporalRunsBackend, transport: CountingCodec, temporal: FakeTemporal
) -> None:
    temporal.listed = [run_info()]
    transport.down = True
    ref = await backend.find_run(PRINCIPAL, RUN_ID)
    assert (ref.workflow_id, ref.closed) == (WORKFLOW_ID, True)


async def test_a_signal_is_encoded_by_the_codec_server_before_it_is_sent(
    backend: TemporalRunsBackend, transport: CountingCodec, temporal: FakeTemporal
) -> None:
    temporal.running = True
    await backend.signal(PRINCIPAL, WORKFLOW_ID, RUN_ID, "user_message", {"message": "hi"})
    [sent] = temporal.signals
    [payload] = sent.input.payloads
    assert payload.metadata["encoding"] == ENCODING
    [plain] = await CODEC.decode([payload])
    assert json.loads(plain.data) == {"message": "hi"}
    assert [str(r.url) for r in transport.requests] == ["http://codec.internal/default/encode"]


@pytest.mark.parametrize("operation", ["get_run", "list_runs", "signal"])
async def test_the_codec_server_down_is_backend_unavailable_codec(
    backend: TemporalRunsBackend, transport: CountingCodec, temporal: FakeTemporal, operation: str
) -> None:
    transport.down = True
    temporal.listed = [run_info()]
    temporal.running = operation == "signal"
    with pytest.raises(BackendUnavailable) as raised:
        if operation == "get_run":
            await backend.get_run(PRINCIPAL, WORKFLOW_ID, RUN_ID)
        elif operation == "list_runs":
            await backend.list_runs(PRINCIPAL, RunFilters())
        else:
            await backend.signal(PRINCIPAL, WORKFLOW_ID, RUN_ID, "user_message", {"message": "hi"})
    assert raised.value.backend == "codec"
    assert temporal.signals == []


async def test_the_api_answers_503_with_its_own_sentence_when_the_codec_server_is_down(
    temporal: FakeTemporal, transport: CountingCodec
) -> None:
    transport.down = True
    temporal.listed = [run_info()]
    codec = CodecClient(ENDPOINT, None, "default", transport=transport)

    async def factory(settings: Settings) -> tuple[TemporalRunsBackend, MemoryUpdates]:
        return TemporalRunsBackend(temporal, codec=codec), MemoryUpdates()  # type: ignore[arg-type]

    async with served(create_app(app_settings(SECRET), factory)) as http:
        for answer in (
            await http.get(f"/workflows/runs/{WORKFLOW_ID}/{RUN_ID}", headers=bearer(SECRET)),
            await http.post("/workflows/runs", json={}, headers=bearer(SECRET)),  # the listing
        ):
            assert answer.status_code == 503, answer.text
            message = answer.json()["message"]
            assert message.startswith(UNAVAILABLE["codec"])
            assert "codec.internal" not in message and "ConnectError" not in message


async def test_close_closes_the_codec_client(temporal: FakeTemporal, transport: CountingCodec) -> None:
    codec = CodecClient(ENDPOINT, None, "default", transport=transport)
    await TemporalRunsBackend(temporal, codec=codec).close()  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):  # httpx: a closed client cannot send
        await codec.decode([encrypted(1)])


def test_the_codec_client_follows_the_settings() -> None:
    assert codec_client(Settings()) is None
    settings = replace(
        Settings(), temporal_codec_endpoint=ENDPOINT, temporal_namespace="prod", temporal_codec_auth="Bearer t"
    )
    client = codec_client(settings)
    assert client is not None
    assert (client.endpoint, client.namespace) == ("http://codec.internal/prod", "prod")


async def test_without_a_codec_server_the_backend_shows_what_temporal_holds(temporal: FakeTemporal) -> None:
    runs = TemporalRunsBackend(temporal)  # type: ignore[arg-type]
    run = await runs.get_run(PRINCIPAL, WORKFLOW_ID, RUN_ID)
    assert str(run["input"]).startswith("<undecodable payload (binary/encrypted")
    assert run["pendingActivities"][0]["lastFailure"] == "Encoded failure"
