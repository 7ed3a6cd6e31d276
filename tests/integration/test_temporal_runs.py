"""The Temporal runs backend against the real Temporal dev server, with the sample worker running
in-process on a task queue of this module. Each test works in a project of its own, so listings
see exactly the runs the test started."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from temporalio.api.workflowservice.v1 import PauseWorkflowExecutionRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHistoryEventFilterType
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from backends import temporal_runs
from backends.page_tokens import PageTokens, page_token_key
from backends.temporal_runs import TemporalRunsBackend
from cli import stack
from core.errors import BackendUnavailable, Conflict, InvalidInput, NotFound
from core.principals import Principal
from core.protocols import RunFilters
from core.search_attributes import INITIATED_BY, PROJECT_ID, SEARCH_ATTRIBUTES
from core.settings import Settings
from generated.models import WorkflowRun
from handlers.runs import page_answer, serialised
from tests.support.live import Services
from web.errors import status_of
from workloads.activities import WorkloadActivities
from workloads.shared import FLAKY_MAX_ATTEMPTS
from workloads.starter import start_workflow
from workloads.worker import create_worker

pytestmark = pytest.mark.services

T = TypeVar("T")
TASK_QUEUE = f"test-temporal-runs-{uuid.uuid4().hex[:8]}"
DEADLINE = 60.0


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def client(services: Services) -> Client:
    return await Client.connect(services.temporal_address)


@pytest.fixture(scope="module")
async def worker(client: Client) -> AsyncIterator[str]:
    """The sample worker, posting no updates (no API in these tests: posting is best effort)."""
    async with (
        WorkloadActivities(api_url=None) as activities,
        create_worker(client, task_queue=TASK_QUEUE, activities=activities),
    ):
        yield TASK_QUEUE


@pytest.fixture(scope="module")
def backend(client: Client) -> TemporalRunsBackend:
    return TemporalRunsBackend(client, timeout_seconds=10)


@pytest.fixture
def project() -> str:
    return f"proj-{uuid.uuid4().hex[:10]}"


def principal(project: str, user: str = "u1", *, superadmin: bool = False) -> Principal:
    permissions = {"workflow:read", "workflow:run"} | ({"workflow:superadmin"} if superadmin else set())
    return Principal(user_id=user, project_id=project, permissions=frozenset(permissions))


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, within: float = DEADLINE) -> T:
    """Poll `check` until it returns something truthy; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.1)  # the poll interval of a condition wait, not a synchronisation


async def start(client: Client, workflow_type: str, project: str, user: str = "u1", **kwargs: Any) -> tuple[str, str]:
    return await start_workflow(client, workflow_type, project=project, user=user, task_queue=TASK_QUEUE, **kwargs)


async def finish(client: Client, workflow_id: str, run_id: str) -> None:
    """Wait for the run to close, however it closes."""
    with contextlib.suppress(WorkflowFailureError):
        await client.get_workflow_handle(workflow_id, run_id=run_id).result()


def ids(runs: list[dict[str, Any]]) -> set[str]:
    return {run["run_id"] for run in runs}


async def list_ids(backend: TemporalRunsBackend, who: Principal, **filters: Any) -> set[str]:
    return ids((await backend.list_runs(who, RunFilters(**filters))).runs)


def events_of(run: dict[str, Any], event_type: str) -> list[dict[str, Any]]:
    return [e for e in run["history"] if e["event_type"] == f"EVENT_TYPE_{event_type}"]


def posted_updates(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs of the run's postUpdate activities, in order."""
    return [
        e["activity"]["input"][0]
        for e in events_of(run, "ACTIVITY_TASK_SCHEDULED")
        if e["activity"]["name"] == "postUpdate"
    ]


# -- run details ------------------------------------------------------------------------------


async def test_completed_ingestion_reads_back_in_the_seed_shape(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    workflow_id, run_id = await start(client, "StandardContentIngestion", project, input={"documentId": "doc-1"})
    await finish(client, workflow_id, run_id)

    run = await backend.get_run(principal(project), workflow_id, run_id)

    assert list(run)[:13] == [
        "status", "started_at", "closed_at", "execution_duration", "run_id", "workflow_id", "type",
        "input", "result", "memo", "history", "pendingActivities", "error",
    ]  # fmt: skip
    assert run["status"] == "COMPLETED"
    assert isinstance(run["started_at"], int) and isinstance(run["closed_at"], int)
    assert run["started_at"] <= run["closed_at"]
    assert run["execution_duration"] == run["closed_at"] - run["started_at"]
    assert (run["run_id"], run["workflow_id"], run["type"]) == (run_id, workflow_id, "StandardContentIngestion")
    assert run["input"] == {"documentId": "doc-1"}
    assert run["result"] == {"success": True}
    assert run["memo"] == {"project": project}
    assert run["pendingActivities"] == []
    assert run["error"] is None
    assert run["initiated_by"] == "user:u1"
    assert run["vertesia_workflow_type"] == "StandardContentIngestion"
    assert run["visibility"] == "project"
    assert run["interactive"] is False
    assert "interaction_name" not in run and "activity_state" not in run and "topic" not in run

    history = run["history"]
    assert [e["event_id"] for e in history] == list(range(1, len(history) + 1))
    assert history[0]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
    assert history[-1]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
    assert history[-1]["result"] == [{"success": True}]
    for event in history:
        assert isinstance(event["event_time"], int) and isinstance(event["task_id"], str)
        assert isinstance(event["attempt"], int)

    scheduled = [e for e in events_of(run, "ACTIVITY_TASK_SCHEDULED") if e["activity"]["name"] == "processDocument"]
    assert len(scheduled) == 1
    activity = scheduled[0]["activity"]
    assert activity["input"] == [{"documentId": "doc-1"}]
    assert activity["scheduledEventId"] == str(scheduled[0]["event_id"])
    started = [e for e in events_of(run, "ACTIVITY_TASK_STARTED") if e["activity"]["name"] == "processDocument"]
    completed = [e for e in events_of(run, "ACTIVITY_TASK_COMPLETED") if e["activity"]["name"] == "processDocument"]
    assert activity["startedEventId"] == str(started[0]["event_id"])
    assert started[0]["attempt"] == 1
    assert completed[0]["activity"]["scheduledEventId"] == activity["scheduledEventId"]
    assert completed[0]["result"][0]["documentId"] == "doc-1"
    # Progress went out as postUpdate activities (best effort: no API in this test).
    assert [u["type"] for u in posted_updates(run)] == ["UPDATE", "COMPLETE"]
    # The generated model of the contract takes the answer as it is.
    assert json.loads(serialised(WorkflowRun, run)) == run


async def test_unknown_runs_and_other_projects_runs_are_not_found(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    workflow_id, run_id = await start(client, "StandardContentIngestion", project, input={"documentId": "d"})
    await finish(client, workflow_id, run_id)
    owner, stranger = principal(project), principal("another-project")

    with pytest.raises(NotFound) as missing:
        await backend.get_run(owner, "no-such-workflow", str(uuid.uuid4()))
    assert status_of(missing.value) == 404
    with pytest.raises(NotFound):
        await backend.get_run(owner, workflow_id, str(uuid.uuid4()))  # right workflow, wrong run
    with pytest.raises(NotFound):
        await backend.get_run(owner, workflow_id, "not-a-uuid")
    with pytest.raises(NotFound) as foreign:
        await backend.get_run(stranger, workflow_id, run_id)
    assert foreign.value.message == f"Workflow run {run_id} was not found."
    with pytest.raises(NotFound):
        await backend.apply_action(stranger, workflow_id, run_id, "terminate", None)
    with pytest.raises(NotFound):
        await backend.signal(stranger, workflow_id, run_id, "UserInput", {"message": "hi"})
    with pytest.raises(NotFound):
        await backend.apply_action(owner, "no-such-workflow", str(uuid.uuid4()), "cancel", None)
    with pytest.raises(NotFound):
        await backend.signal(owner, "no-such-workflow", str(uuid.uuid4()), "UserInput", {"message": "hi"})
    assert await list_ids(backend, stranger) == set()


# -- listing ----------------------------------------------------------------------------------


async def test_each_filter_returns_exactly_the_matching_runs(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    ingestion, retrying = "StandardContentIngestion", "RetryingActivity"
    started = await asyncio.gather(
        start(client, ingestion, project, document_id="d1", event_name="create", rule_id="r1"),
        start(client, ingestion, project, "u2", document_id="d2", event_name="update", rule_id="r2"),
        start(client, ingestion, project, document_id='it\'s \\ "quoted"', event_name="create"),
        start(client, retrying, project, "u2", input={"fail_attempts": 0}),
        start(client, "AgentConversation", project, interaction="helper", input={"topic": "Invoices"}),
        start(client, retrying, project, input={"fail_attempts": FLAKY_MAX_ATTEMPTS}),
        start(client, ingestion, project, document_id="d1", event_name="delete", rule_id="r1"),
    )
    (r1, r2, r3, r4, r5, r6, r7) = (run_id for _, run_id in started)
    everything = {r1, r2, r3, r4, r5, r6, r7}
    await asyncio.gather(*(finish(client, wf, run) for wf, run in started if run != r5))
    me = principal(project)

    # Visibility is eventually consistent: wait until it shows every close.
    async def indexed() -> bool:
        completed = await list_ids(backend, me, status="completed")
        return completed == {r1, r2, r3, r4, r7} and await list_ids(backend, me, status="failed") == {r6}

    await eventually(indexed, "the listing to show every close")
    assert await list_ids(backend, me) == everything
    assert await list_ids(backend, me, status="running") == {r5}
    assert await list_ids(backend, me, status="FAILED") == {r6}
    assert await list_ids(backend, me, document_id="d1") == {r1, r7}
    assert await list_ids(backend, me, document_id="d3") == set()
    assert await list_ids(backend, me, event_name="create") == {r1, r3}
    assert await list_ids(backend, me, rule_id="r1") == {r1, r7}
    assert await list_ids(backend, me, initiated_by="user:u2") == {r2, r4}
    assert await list_ids(backend, me, type=retrying) == {r4, r6}
    assert await list_ids(backend, me, document_id="d1", event_name="delete") == {r7}
    assert await list_ids(backend, me, search_term=r2) == {r2}
    assert await list_ids(backend, me, search_term=started[2][0]) == {r3}
    assert await list_ids(backend, me, search_term="AgentConv") == {r5}
    assert await list_ids(backend, me, search_term=retrying) == {r4, r6}
    assert await list_ids(backend, me, query="DocumentId = 'd1' OR DocumentId = 'd2'") == {r1, r2, r7}
    assert await list_ids(backend, me, query="RuleId IS NULL AND ExecutionStatus = 'Completed'") == {r3, r4}

    # Dates: a date-only `end` means the end of that day; `start` after every run matches none.
    latest = max(run["started_at"] for run in (await backend.list_runs(me, RunFilters())).runs)
    day = datetime.fromtimestamp(latest, UTC).date().isoformat()
    assert await list_ids(backend, me, end=day) == everything
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert await list_ids(backend, me, start=tomorrow) == set()
    earliest = min(run["started_at"] for run in (await backend.list_runs(me, RunFilters())).runs)
    since = datetime.fromtimestamp(earliest, UTC).isoformat()
    assert await list_ids(backend, me, start=since, end=(datetime.now(UTC) + timedelta(minutes=5)).isoformat()) == (
        everything
    )

    # Values are escaped: an injection attempt simply matches nothing, a quote matches itself.
    assert await list_ids(backend, me, document_id="x' OR ProjectId = 'other") == set()
    assert await list_ids(backend, me, document_id="d1' OR DocumentId = 'd2") == set()
    assert await list_ids(backend, me, search_term="x') OR (ProjectId != 'y") == set()
    with pytest.raises(InvalidInput):  # Temporal would strip the outer quotes: refused instead
        await backend.list_runs(me, RunFilters(search_term="') OR (ProjectId != '"))

    # Summaries carry the Vertesia fields.
    runs = {run["run_id"]: run for run in (await backend.list_runs(me, RunFilters())).runs}
    conversation = runs[r5]
    assert conversation["interactive"] is True
    assert conversation["interaction_name"] == "helper"
    assert conversation["topic"] == "Invoices"
    assert conversation["activity_state"] == "idle"
    assert conversation["closed_at"] is None and conversation["status"] == "RUNNING"
    assert runs[r2]["initiated_by"] == "user:u2"
    assert runs[r6]["status"] == "FAILED"
    assert all(run["vertesia_workflow_type"] == run["type"] and run["visibility"] == "project" for run in runs.values())
    assert ids((await backend.list_runs(me, RunFilters(), conversations_only=True)).runs) == {r5}
    page = await backend.list_runs(me, RunFilters(page_size=3))
    assert json.loads(page_answer(page)) == {
        "runs": page.runs,
        "next_page_token": page.next_page_token,
        "has_more": True,
    }
    for run_id in (r5, r6):  # a running conversation, a failed run: the contract takes them as they are
        workflow_id = next(wf for wf, run in started if run == run_id)
        details = await backend.get_run(me, workflow_id, run_id)
        assert json.loads(serialised(WorkflowRun, details)) == details

    # Nothing of this project leaks into another one, whatever the filters.
    stranger = principal("another-project")
    assert await list_ids(backend, stranger) == set()
    assert await list_ids(backend, stranger, document_id="d1' OR ProjectId = '" + project) == set()

    await backend.apply_action(me, started[4][0], r5, "terminate", "test over")


async def _equals(result: Awaitable[set[str]], expected: set[str]) -> bool:
    return await result == expected


async def test_bad_inputs_are_refused(backend: TemporalRunsBackend, project: str) -> None:
    me = principal(project)
    for filters in (
        RunFilters(status="done"),
        RunFilters(start="yesterday"),
        RunFilters(end="2024-02-30"),
        RunFilters(start="2024-05-02", end="2024-05-01"),
        RunFilters(next_page_token="base64EncodedToken"),
        RunFilters(page_size=0),
        RunFilters(page_size=201),
        RunFilters(query="(WorkflowType = 'A'"),
        RunFilters(query="WorkflowType = 'A"),
        RunFilters(query="ProjectId = 'other'"),
        RunFilters(query="WorkflowType = 'A') OR (ProjectId = 'other'"),
        RunFilters(query="WorkflowType = 'A' ORDER BY StartTime"),
        RunFilters(query="NoSuchAttribute = 'x'"),  # refused by Temporal itself
    ):
        with pytest.raises(InvalidInput):
            await backend.list_runs(me, filters)


async def test_paging_visits_every_run_once_newest_first(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    expected: list[str] = []
    for n in range(7):  # one after the other, so that start and close orders agree
        workflow_id, run_id = await start(client, "StandardContentIngestion", project, input={"documentId": f"p{n}"})
        await finish(client, workflow_id, run_id)
        expected.append(run_id)
    me = principal(project)
    await eventually(
        lambda: _equals(list_ids(backend, me, status="completed"), set(expected)), "all seven runs to be listed"
    )

    seen: list[dict[str, Any]] = []
    flags: list[bool] = []
    token: str | None = None
    while True:
        page = await backend.list_runs(me, RunFilters(page_size=2, status="completed", next_page_token=token))
        assert len(page.runs) == (2 if page.has_more else 1)
        assert (page.next_page_token is not None) == page.has_more
        seen += page.runs
        flags.append(page.has_more)
        token = page.next_page_token
        if not page.has_more:
            break
        with pytest.raises(InvalidInput):  # the token is bound to its query
            await backend.list_runs(me, RunFilters(page_size=2, status="failed", next_page_token=token))
        with pytest.raises(InvalidInput):
            await backend.list_runs(principal("another-project"), RunFilters(page_size=2, next_page_token=token))
    assert flags == [True, True, True, False]
    assert [run["run_id"] for run in seen] == list(reversed(expected))
    starts = [run["started_at"] for run in seen]
    assert starts == sorted(starts, reverse=True)

    # A page that ends exactly at the last run says there is no more.
    whole = await backend.list_runs(me, RunFilters(page_size=7))
    assert (len(whole.runs), whole.has_more, whole.next_page_token) == (7, False, None)
    first = await backend.list_runs(me, RunFilters(page_size=6))
    assert first.has_more
    last = await backend.list_runs(me, RunFilters(page_size=6, next_page_token=first.next_page_token))
    assert (len(last.runs), last.has_more, last.next_page_token) == (1, False, None)


# -- conversations: signal, cancel, terminate, visibility -------------------------------------


async def test_user_input_gets_an_answer_and_cancel_runs_the_cleanup(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    me = principal(project)
    workflow_id, run_id = await start(client, "AgentConversation", project, input={"topic": "Support"})
    await backend.signal(me, workflow_id, run_id, "UserInput", {"message": "hello", "data": {"approved": True}})

    async def answered() -> dict[str, Any] | None:
        run = await backend.get_run(me, workflow_id, run_id)
        done = [u for u in posted_updates(run) if u["type"] == "ANSWER"]
        return run if done and run.get("activity_state") == "idle" and not run["pendingActivities"] else None

    run = await eventually(answered, "the answer to be posted")
    signals = events_of(run, "WORKFLOW_EXECUTION_SIGNALED")
    assert [e["signal"] for e in signals] == [
        {"name": "UserInput", "input": [{"message": "hello", "data": {"approved": True}}]}
    ]
    answers = [e for e in events_of(run, "ACTIVITY_TASK_COMPLETED") if e["activity"]["name"] == "generateAnswer"]
    assert answers[0]["result"] == ["Answer #1: you said 'hello'."]
    assert [u["message"] for u in posted_updates(run) if u["type"] == "ANSWER"] == ["Answer #1: you said 'hello'."]
    assert events_of(run, "WORKFLOW_PROPERTIES_MODIFIED")  # activity_state went working, then idle
    assert run["status"] == "RUNNING" and run["closed_at"] is None
    assert run["interactive"] is True and run["interaction_name"] == "default" and run["topic"] == "Support"
    assert run["memo"]["activity_state"] == "idle"

    await backend.apply_action(me, workflow_id, run_id, "cancel", "User requested cancellation")
    await finish(client, workflow_id, run_id)
    run = await backend.get_run(me, workflow_id, run_id)
    assert run["status"] == "CANCELED"
    assert isinstance(run["closed_at"], int)
    assert run["error"] is None
    (request,) = events_of(run, "WORKFLOW_EXECUTION_CANCEL_REQUESTED")
    assert request["reason"] == "User requested cancellation"
    assert run["history"][-1]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED"
    cleanup = [e for e in events_of(run, "ACTIVITY_TASK_SCHEDULED") if e["activity"]["name"] == "postUpdate"][-1]
    assert cleanup["event_id"] > request["event_id"]  # the cleanup ran after the request
    closing = cleanup["activity"]["input"][0]
    assert closing["type"] == "TERMINATED"
    assert "cancelled" in closing["message"] and "User requested cancellation" in closing["message"]

    with pytest.raises(Conflict) as closed:
        await backend.apply_action(me, workflow_id, run_id, "cancel", None)
    assert status_of(closed.value) == 409
    with pytest.raises(Conflict):
        await backend.apply_action(me, workflow_id, run_id, "terminate", None)
    with pytest.raises(Conflict):
        await backend.signal(me, workflow_id, run_id, "UserInput", {"message": "too late"})


async def test_terminate_ends_a_conversation_at_once_without_cleanup(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    me = principal(project)
    workflow_id, run_id = await start(client, "AgentConversation", project)
    await backend.apply_action(me, workflow_id, run_id, "terminate", "stop now")
    await finish(client, workflow_id, run_id)

    run = await backend.get_run(me, workflow_id, run_id)
    assert run["status"] == "TERMINATED"
    last = run["history"][-1]
    assert last["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED"
    assert last["reason"] == "stop now"
    assert [u for u in posted_updates(run) if u["type"] == "TERMINATED"] == []
    with pytest.raises(Conflict):
        await backend.apply_action(me, workflow_id, run_id, "terminate", None)


async def test_private_conversations_are_seen_by_their_starter_and_superadmins_only(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    owner, colleague, admin = (
        principal(project, "u1"),
        principal(project, "u2"),
        principal(project, "u3", superadmin=True),
    )
    private_id, private_run = await start(client, "AgentConversation", project, "u1", visibility="private")
    shared_id, shared_run = await start(client, "AgentConversation", project, "u2")
    try:
        await eventually(
            lambda: _equals(list_ids(backend, admin, status="running"), {private_run, shared_run}), "both listed"
        )
        conversations = RunFilters()
        assert ids((await backend.list_runs(owner, conversations, conversations_only=True)).runs) == {
            private_run,
            shared_run,
        }
        assert ids((await backend.list_runs(colleague, conversations, conversations_only=True)).runs) == {shared_run}
        assert ids((await backend.list_runs(admin, conversations, conversations_only=True)).runs) == {
            private_run,
            shared_run,
        }
        assert await list_ids(backend, colleague) == {shared_run}
        assert (await backend.get_run(owner, private_id, private_run))["visibility"] == "private"
        assert (await backend.get_run(admin, private_id, private_run))["visibility"] == "private"
        with pytest.raises(NotFound):
            await backend.get_run(colleague, private_id, private_run)
        with pytest.raises(NotFound):
            await backend.signal(colleague, private_id, private_run, "UserInput", {"message": "peek"})
        with pytest.raises(NotFound):
            await backend.find_run(colleague, private_run)
    finally:
        await backend.apply_action(admin, private_id, private_run, "terminate", None)
        await backend.apply_action(admin, shared_id, shared_run, "terminate", None)


# -- retries and failures ---------------------------------------------------------------------


async def test_a_retrying_activity_shows_in_pending_activities(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    me = principal(project)
    workflow_id, run_id = await start(
        client, "RetryingActivity", project, input={"fail_attempts": 3, "delay_seconds": 1.5}
    )

    async def retried() -> dict[str, Any] | None:
        run = await backend.get_run(me, workflow_id, run_id)
        pending = run["pendingActivities"]
        if not pending or pending[0]["state"] != "STARTED" or pending[0]["attempt"] < 2:
            return None
        return pending[0] if pending[0]["lastFailure"] and pending[0]["lastHeartbeatTime"] else None

    pending = await eventually(retried, "a second attempt running and heartbeating")
    assert pending["activityType"] == "flakyOperation"
    assert pending["maximumAttempts"] == FLAKY_MAX_ATTEMPTS
    assert "failed on purpose" in pending["lastFailure"]
    assert isinstance(pending["lastStartedTime"], int) and isinstance(pending["lastHeartbeatTime"], int)
    assert isinstance(pending["activityId"], str)

    await finish(client, workflow_id, run_id)
    run = await backend.get_run(me, workflow_id, run_id)
    assert (run["status"], run["result"], run["pendingActivities"], run["error"]) == (
        "COMPLETED",
        {"attempts": 4},
        [],
        None,
    )


async def test_a_run_beyond_its_retries_fails_with_an_error(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    me = principal(project)
    workflow_id, run_id = await start(client, "RetryingActivity", project, input={"fail_attempts": FLAKY_MAX_ATTEMPTS})
    await finish(client, workflow_id, run_id)

    run = await backend.get_run(me, workflow_id, run_id)
    assert run["status"] == "FAILED"
    assert run["result"] is None
    assert run["error"].startswith("flakyOperation gave up after its retries")
    assert f"attempt {FLAKY_MAX_ATTEMPTS} failed on purpose" in run["error"]
    assert run["history"][-1]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_FAILED"
    assert run["history"][-1]["error"] == run["error"]
    (failed,) = events_of(run, "ACTIVITY_TASK_FAILED")
    assert failed["activity"]["name"] == "flakyOperation"
    assert "failed on purpose" in failed["error"]
    with pytest.raises(Conflict):
        await backend.apply_action(me, workflow_id, run_id, "cancel", None)
    with pytest.raises(Conflict):
        await backend.signal(me, workflow_id, run_id, "UserInput", {"message": "hi"})


# -- find_run, closed_status, availability --------------------------------------------------------


async def test_find_run_by_run_id_and_closed_status(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    me = principal(project)
    workflow_id, run_id = await start(client, "AgentConversation", project)

    fresh = TemporalRunsBackend(client)  # no cache: must resolve through the visibility index
    ref = await fresh.find_run(me, run_id, workflow_id)  # by describe: no need to wait for indexing
    assert (ref.workflow_id, ref.run_id, ref.closed) == (workflow_id, run_id, False)
    with pytest.raises(NotFound):  # scoped: the run of `project` is not found for another project
        await TemporalRunsBackend(client).find_run(principal("someone-else"), run_id, workflow_id)

    skipped = 0.0  # how far `other`'s clock is moved on past the real one
    other = TemporalRunsBackend(client, clock=lambda: time.monotonic() + skipped)

    async def found() -> bool:
        try:
            return (await other.find_run(me, run_id)).workflow_id == workflow_id
        except NotFound:
            return False

    await eventually(found, "the run to be indexed")
    with pytest.raises(NotFound):
        await other.find_run(principal("another-project"), run_id)
    with pytest.raises(NotFound):
        await other.find_run(me, str(uuid.uuid4()))
    assert await other.closed_status(workflow_id, run_id) is None

    await backend.apply_action(me, workflow_id, run_id, "terminate", None)
    skipped = temporal_runs.OPEN_STATUS_REUSE_SECONDS  # past the reuse of its "open" answer
    assert await other.closed_status(workflow_id, run_id) == "TERMINATED"
    assert (await other.find_run(me, run_id)).closed is True
    with pytest.raises(NotFound):
        await other.closed_status(workflow_id, str(uuid.uuid4()))


async def test_ping(backend: TemporalRunsBackend) -> None:
    await backend.ping()


async def test_an_unreachable_temporal_is_backend_unavailable() -> None:
    settings = Settings(temporal_address=f"127.0.0.1:{stack.free_port()}", backend_timeout_seconds=2)
    down = await TemporalRunsBackend.connect(settings)
    with pytest.raises(BackendUnavailable):
        await down.ping()
    with pytest.raises(BackendUnavailable) as unavailable:
        await down.get_run(principal("p"), "wf", str(uuid.uuid4()))
    assert status_of(unavailable.value) == 503
    with pytest.raises(BackendUnavailable):
        await down.list_runs(principal("p"), RunFilters())
    await down.close()


# -- values matched literally, control characters refused ---------------------------------------


async def test_search_term_special_characters_are_matched_literally(
    client: Client, worker: str, backend: TemporalRunsBackend, project: str
) -> None:
    """Temporal's STARTS_WITH is a LIKE with `%`, `_` and its escape `!` escaped; a quote inside a value
    is sent escaped; a quote at either end is refused (Temporal would strip it: `'` alone was an
    empty prefix, matching every run)."""
    tag = uuid.uuid4().hex[:6]
    names = {
        "quote": f"lit-{tag}-it's",
        "percent": f"lit-{tag}-50%off",
        "underscore": f"lit-{tag}-a_b",
        "star": f"lit-{tag}-a*b",
        "bang": f"lit-{tag}-a!b",
        "all": f"lit-{tag}-'%_*!-end",
        "plain": f"lit-{tag}-axb",
        "double": f'lit-{tag}-a"b',
        "backslash": f"lit-{tag}-a\\b",
    }
    started = {
        key: await start(client, "StandardContentIngestion", project, workflow_id=name, input={"documentId": key})
        for key, name in names.items()
    }
    run_of = {key: run_id for key, (_, run_id) in started.items()}
    me = principal(project)
    everything = set(run_of.values())
    await eventually(lambda: _equals(list_ids(backend, me), everything), "every run to be listed")

    for key in ("quote", "percent", "underscore", "star", "bang", "all", "plain"):
        assert await list_ids(backend, me, search_term=names[key]) == {run_of[key]}, key
    # Prefixes that end on a special character match exactly the runs that have it there.
    assert await list_ids(backend, me, search_term=f"lit-{tag}-'%") == {run_of["all"]}
    assert await list_ids(backend, me, search_term=f"lit-{tag}-50%") == {run_of["percent"]}
    assert await list_ids(backend, me, search_term=f"lit-{tag}-a_") == {run_of["underscore"]}  # not a wildcard
    assert await list_ids(backend, me, search_term=f"lit-{tag}-a*") == {run_of["star"]}
    assert await list_ids(backend, me, search_term=f"lit-{tag}-'%_*!") == {run_of["all"]}
    assert await list_ids(backend, me, search_term=f"lit-{tag}-%") == set()
    assert await list_ids(backend, me, search_term=f"lit-{tag}-") == everything
    # `"` and `\`: Temporal escapes them for MySQL, so the dev server's SQLite store cannot match
    # them; what matters here is that they never match another run.
    for key in ("double", "backslash"):
        assert await list_ids(backend, me, search_term=names[key]) <= {run_of[key]}, key
    # A quote at either end cannot reach the store as sent: refused, rather than matching every run.
    for term in ("'", "''", f"'lit-{tag}", f"lit-{tag}-it'"):
        with pytest.raises(InvalidInput, match="single quote"):
            await backend.list_runs(me, RunFilters(search_term=term))
    for wf, run_id in started.values():
        await finish(client, wf, run_id)


@pytest.mark.parametrize("name", ["document_id", "event_name", "rule_id", "search_term", "initiated_by", "type"])
async def test_a_nul_in_a_filter_is_invalid_input_not_a_backend_failure(
    backend: TemporalRunsBackend, project: str, name: str
) -> None:
    with_nul: dict[str, Any] = {name: "a\x00b"}
    with pytest.raises(InvalidInput, match="control characters"):
        await backend.list_runs(principal(project), RunFilters(**with_nul))
    with pytest.raises(InvalidInput, match="control characters"):
        await backend.list_runs(principal(project), RunFilters(query="DocumentId = 'a\x00b'"))


async def test_temporals_refusal_is_our_sentence(backend: TemporalRunsBackend, project: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        await backend.list_runs(principal(project), RunFilters(query="NoSuchAttribute = 'x'"))
    assert refused.value.details is None
    assert "NoSuchAttribute" not in refused.value.message  # Temporal's words stay in the log


# -- page tokens ------------------------------------------------------------------------------


async def test_page_tokens_refuse_any_change_and_work_across_replicas_sharing_the_key(
    client: Client, worker: str, project: str
) -> None:
    key = page_token_key(replace(Settings(), page_token_secret="shared by every replica"))
    first_replica = TemporalRunsBackend(client, page_tokens=PageTokens(key))
    second_replica = TemporalRunsBackend(client, page_tokens=PageTokens(key))
    stranger = TemporalRunsBackend(client)  # a key of its own
    started = [
        await start(client, "StandardContentIngestion", project, input={"documentId": f"t{n}"}) for n in range(3)
    ]
    me = principal(project)
    await eventually(lambda: _equals(list_ids(first_replica, me), {r for _, r in started}), "three runs listed")

    page = await first_replica.list_runs(me, RunFilters(page_size=1))
    token = page.next_page_token
    assert token is not None
    following = await second_replica.list_runs(me, RunFilters(page_size=1, next_page_token=token))
    assert ids(following.runs) and ids(following.runs) != ids(page.runs)
    with pytest.raises(InvalidInput, match="Invalid page token"):
        await stranger.list_runs(me, RunFilters(page_size=1, next_page_token=token))

    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for position in range(len(raw)):
        changed = bytearray(raw)
        changed[position] ^= 0x01
        forged = base64.urlsafe_b64encode(bytes(changed)).decode().rstrip("=")
        with pytest.raises(InvalidInput, match="Invalid page token"):
            await first_replica.list_runs(me, RunFilters(page_size=1, next_page_token=forged))
    for wf, run_id in started:
        await finish(client, wf, run_id)


# -- bounded run details ----------------------------------------------------------------------


async def test_run_details_render_at_most_max_history_bytes(
    client: Client, worker: str, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = principal(project)
    workflow_id, run_id = await start(client, "StandardContentIngestion", project, input={"documentId": "big"})
    await finish(client, workflow_id, run_id)
    whole = await TemporalRunsBackend(client).get_run(me, workflow_id, run_id)
    assert "history_truncated" not in whole and "history_events_omitted" not in whole

    cap = 1500
    capped = TemporalRunsBackend(client, max_history_bytes=cap)
    history_calls: list[int] = []
    service = client.workflow_service
    fetch_page = service.get_workflow_execution_history

    async def counted(request: Any, **kwargs: Any) -> Any:
        history_calls.append(int(request.history_event_filter_type))
        return await fetch_page(request, **kwargs)

    monkeypatch.setattr(service, "get_workflow_execution_history", counted)
    monkeypatch.setattr(temporal_runs, "HISTORY_PAGE_SIZE", 2)  # several pages, to see the reading stop
    run = await capped.get_run(me, workflow_id, run_id)

    history = run["history"]
    assert 0 < len(history) < len(whole["history"])
    assert history == whole["history"][: len(history)]
    assert len(json.dumps(history, separators=(",", ":")).encode()) <= cap
    assert run["history_truncated"] is True
    assert run["history_events_omitted"] == len(whole["history"]) - len(history)
    # The result still comes from the close event, read on its own.
    assert (run["result"], run["input"], run["error"]) == ({"success": True}, {"documentId": "big"}, None)
    whole_pages = -(-len(whole["history"]) // 2)
    all_events = int(WorkflowHistoryEventFilterType.ALL_EVENT)
    assert history_calls.count(all_events) < whole_pages  # reading stopped at the cap
    assert history_calls.count(int(WorkflowHistoryEventFilterType.CLOSE_EVENT)) == 1
    assert json.loads(serialised(WorkflowRun, run)) == run  # the document takes the marker


# -- find_run: the not-found cache, is_known, the close time ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_not_found_is_remembered_for_a_short_while(
    client: Client, worker: str, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    runs = TemporalRunsBackend(client, not_found_seconds=2, clock=clock)
    me = principal(project)
    lists: list[str] = []
    real_list = runs._list

    async def counted(query: str, page_size: int, token: bytes) -> Any:
        lists.append(query)
        return await real_list(query, page_size, token)

    monkeypatch.setattr(runs, "_list", counted)
    unknown = str(uuid.uuid4())
    assert not runs.is_known(unknown)
    with pytest.raises(NotFound):
        await runs.find_run(me, unknown)
    assert runs.is_known(unknown)  # a second look-up costs Temporal nothing...
    with pytest.raises(NotFound):
        await runs.find_run(me, unknown)
    assert len(lists) == 1
    clock.now += 2.5  # ...for NOT_FOUND_CACHE_SECONDS
    assert not runs.is_known(unknown)
    with pytest.raises(NotFound):
        await runs.find_run(me, unknown)
    assert len(lists) == 2

    # A run the index did not show yet (visibility lags) is found once the lifetime is over.
    workflow_id, run_id = await start(client, "AgentConversation", project)
    await eventually(lambda: _found(TemporalRunsBackend(client), me, run_id), "the run to be indexed")
    empty = await real_list("RunId = 'none'", 1, b"")
    monkeypatch.setattr(runs, "_list", lambda query, size, token: _return(empty))
    with pytest.raises(NotFound):
        await runs.find_run(me, run_id)
    monkeypatch.setattr(runs, "_list", counted)
    with pytest.raises(NotFound):
        await runs.find_run(me, run_id)  # still remembered
    clock.now += 2.5
    assert (await runs.find_run(me, run_id)).workflow_id == workflow_id
    assert runs.is_known(run_id)
    # Another caller's run is not "missing": it is known, and refused by scope each time.
    with pytest.raises(NotFound):
        await runs.find_run(principal("another-project"), run_id)
    assert (run_id, None) not in runs._missing
    await backend_terminate(client, workflow_id, run_id)


async def test_find_run_reports_the_close_time_and_rereads_an_aged_open_status(
    client: Client, worker: str, project: str
) -> None:
    clock = Clock()
    runs = TemporalRunsBackend(client, open_status_seconds=300, clock=clock)
    me = principal(project)
    workflow_id, run_id = await start(client, "AgentConversation", project)
    ref = await runs.find_run(me, run_id, workflow_id)
    assert (ref.closed, ref.closed_at) == (False, None)
    assert runs.is_known(run_id)

    await backend_terminate(client, workflow_id, run_id)
    # Seen open less than POST_AFTER_CLOSE_SECONDS ago: still taken as open, without a call.
    assert (await runs.find_run(me, run_id)).closed is False
    clock.now += 301
    assert not runs.is_known(run_id)  # the next find_run asks Temporal again
    ref = await runs.find_run(me, run_id)
    assert ref.closed is True
    assert ref.closed_at is not None and abs(ref.closed_at - time.time()) < 120
    details = await runs.get_run(me, workflow_id, run_id)
    assert int(ref.closed_at) == details["closed_at"]
    assert runs.is_known(run_id)  # a close is final


async def _found(runs: TemporalRunsBackend, who: Principal, run_id: str) -> bool:
    try:
        await runs.find_run(who, run_id)
    except NotFound:
        return False
    return True


async def _return(value: T) -> T:
    return value


async def backend_terminate(client: Client, workflow_id: str, run_id: str) -> None:
    await client.get_workflow_handle(workflow_id, run_id=run_id).terminate("test over")
    await finish(client, workflow_id, run_id)


async def test_a_known_run_id_under_another_workflow_id_is_remembered_as_missing(
    client: Client, worker: str, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    runs = TemporalRunsBackend(client, not_found_seconds=2, clock=clock)
    me = principal(project)
    workflow_id, run_id = await start(client, "AgentConversation", project)
    await runs.find_run(me, run_id, workflow_id)
    assert runs.is_known(run_id) and runs.is_known(run_id, workflow_id)
    describes: list[tuple[str, str]] = []
    real_describe = runs._describe

    async def counted(who: Principal, wf: str, run: str) -> Any:
        describes.append((wf, run))
        return await real_describe(who, wf, run)

    monkeypatch.setattr(runs, "_describe", counted)
    wrong = f"not-{workflow_id}"
    # `is_known` answers for the ids asked: this pair would ask Temporal, so it is not known...
    assert not runs.is_known(run_id, wrong)
    with pytest.raises(NotFound):
        await runs.find_run(me, run_id, wrong)
    assert describes == [(wrong, run_id)]
    # ...and once Temporal said "not found", the pair is remembered: no second call meanwhile.
    assert runs.is_known(run_id, wrong)
    with pytest.raises(NotFound):
        await runs.find_run(me, run_id, wrong)
    assert len(describes) == 1
    # The run itself is unaffected, under its own workflow id or none.
    assert (await runs.find_run(me, run_id, workflow_id)).workflow_id == workflow_id
    assert (await runs.find_run(me, run_id)).workflow_id == workflow_id
    assert len(describes) == 1
    clock.now += 2.5  # for NOT_FOUND_CACHE_SECONDS only
    assert not runs.is_known(run_id, wrong)
    with pytest.raises(NotFound):
        await runs.find_run(me, run_id, wrong)
    assert len(describes) == 2
    await backend_terminate(client, workflow_id, run_id)


async def test_closed_status_is_one_shared_describe_and_a_close_is_remembered(
    client: Client, worker: str, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    runs = TemporalRunsBackend(client, clock=clock)
    workflow_id, run_id = await start(client, "AgentConversation", project)
    describes: list[str] = []
    real_describe = runs._describe_status

    async def counted(wf: str, run: str) -> str | None:
        describes.append(run)
        return await real_describe(wf, run)

    monkeypatch.setattr(runs, "_describe_status", counted)
    # Many streams of one run polling at once: one describe answers them all.
    assert await asyncio.gather(*(runs.closed_status(workflow_id, run_id) for _ in range(20))) == [None] * 20
    assert await runs.closed_status(workflow_id, run_id) is None
    assert len(describes) == 1  # a later poll reuses the answer for a few seconds...
    clock.now += temporal_runs.OPEN_STATUS_REUSE_SECONDS
    assert await runs.closed_status(workflow_id, run_id) is None
    assert len(describes) == 2  # ...and then asks again: "open" is only true for a while

    await backend_terminate(client, workflow_id, run_id)
    clock.now += temporal_runs.OPEN_STATUS_REUSE_SECONDS
    statuses = await asyncio.gather(*(runs.closed_status(workflow_id, run_id) for _ in range(20)))
    assert statuses == ["TERMINATED"] * 20
    assert len(describes) == 3
    # A close is final: every later poll is answered from memory, with the status get_run shows.
    assert await runs.closed_status(workflow_id, run_id) == "TERMINATED"
    assert len(describes) == 3
    assert (await runs.get_run(principal(project), workflow_id, run_id))["status"] == "TERMINATED"
    with pytest.raises(NotFound):
        await runs.closed_status(workflow_id, str(uuid.uuid4()))


# -- starters that were not recorded, and paused runs ------------------------------------------

NO_WORKER = "no-worker-polls-this-queue"  # runs started here stay open, no workflow code runs


async def start_bare(client: Client, project: str, initiated_by: str | None) -> tuple[str, str]:
    """An open run of `project` with only the search attributes given (no sample workflow)."""
    pairs: list[SearchAttributePair[Any]] = [SearchAttributePair(PROJECT_ID, project)]
    if initiated_by is not None:
        pairs.append(SearchAttributePair(INITIATED_BY, initiated_by))
    handle = await client.start_workflow(
        "NotRegisteredAnywhere",
        id=f"bare-{uuid.uuid4().hex[:10]}",
        task_queue=NO_WORKER,
        search_attributes=TypedSearchAttributes(pairs),
    )
    assert handle.result_run_id is not None
    return handle.id, handle.result_run_id


async def test_initiated_by_unknown_finds_the_runs_listed_as_unknown(
    client: Client, backend: TemporalRunsBackend, project: str
) -> None:
    started = await asyncio.gather(*(start_bare(client, project, who) for who in (None, "", "unknown", "user:u1")))
    absent, empty, literal, known = (run_id for _, run_id in started)
    me = principal(project)
    await eventually(lambda: _equals(list_ids(backend, me), {absent, empty, literal, known}), "the runs to be listed")
    shown = {run["run_id"]: run["initiated_by"] for run in (await backend.list_runs(me, RunFilters())).runs}
    assert shown == {absent: "unknown", empty: "unknown", literal: "unknown", known: "user:u1"}
    # What a listing shows as `unknown`, the filter `unknown` finds: every one of them, and only them.
    assert await list_ids(backend, me, initiated_by="unknown") == {absent, empty, literal}
    assert await list_ids(backend, me, initiated_by="user:u1") == {known}
    for workflow_id, run_id in started:
        await backend_terminate(client, workflow_id, run_id)


@pytest.fixture(scope="module")
def pausing_temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A dev server of its own with workflow pause enabled (off by default): the shared one would
    refuse PauseWorkflowExecution."""
    port, data_dir = stack.free_port(), tmp_path_factory.mktemp("pausing-temporal")
    argv = [
        stack.temporal_binary(), "server", "start-dev", "--headless",
        "--db-filename", str(data_dir / "temporal.sqlite"),
        "--ip", stack.LOCALHOST, "--port", str(port),
        "--http-port", str(stack.free_port()), "--metrics-port", str(stack.free_port()),
        "--dynamic-config-value", "frontend.WorkflowPauseEnabled=true",
    ]  # fmt: skip
    for name, kind in SEARCH_ATTRIBUTES.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    child = stack.spawn("temporal-pausing", argv, data_dir / "logs")
    with stack.running([child]):
        stack.wait_for_port(stack.LOCALHOST, port, DEADLINE, child.proc)
        yield f"{stack.LOCALHOST}:{port}"


async def test_a_paused_run_is_shown_paused_and_stays_open(pausing_temporal: str, project: str) -> None:
    """temporalio's own `describe()` cannot build a description of a PAUSED run (its client enum
    lacks the value): the backend reads Temporal's raw answer, and shows the documented status."""
    client = await Client.connect(pausing_temporal)
    backend = TemporalRunsBackend(client, timeout_seconds=10)
    me = principal(project)
    workflow_id, run_id = await start_bare(client, project, me.ref)
    await client.workflow_service.pause_workflow_execution(
        PauseWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_id=workflow_id,
            run_id=run_id,
            reason="test",
            identity="test",
            request_id=uuid.uuid4().hex,
        )
    )
    details = await backend.get_run(me, workflow_id, run_id)
    assert (details["status"], details["closed_at"], details["result"]) == ("PAUSED", None, None)
    assert json.loads(serialised(WorkflowRun, details)) == details  # the document takes it
    assert await eventually(lambda: list_ids(backend, me, status="paused"), "the pause to be indexed") == {run_id}
    assert await list_ids(backend, me, status="running") == set()
    assert not (await backend.find_run(me, run_id, workflow_id)).closed
    assert await backend.closed_status(workflow_id, run_id) is None  # its streams stay open
    await backend.signal(me, workflow_id, run_id, "UserInput", {"message": "still open"})  # no 409
    await backend.apply_action(me, workflow_id, run_id, "terminate", "test over")
    assert (await backend.get_run(me, workflow_id, run_id))["status"] == "TERMINATED"
    assert await backend.closed_status(workflow_id, run_id) == "TERMINATED"
