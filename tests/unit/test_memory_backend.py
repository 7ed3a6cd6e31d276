"""The in-memory backends (`backends.memory`): mock mode's seeding from the document, and the
behaviour they share with the real ones (scope, words of the errors, closing, listing, streams)."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest

from backends.memory import MemoryRuns, MemoryUpdates, mock_backends, seed
from backends.memory.seed import statuses
from core.errors import Conflict, Forbidden, InvalidInput, NotFound
from core.principals import Principal
from core.protocols import RunFilters
from core.settings import Settings
from web.app import published_document

PROJECT = "dev-project"
READER = Principal("123", project_id=PROJECT, permissions=frozenset({"workflow:read", "workflow:run"}))
OTHER_USER = Principal("456", project_id=PROJECT, permissions=READER.permissions)
OTHER_PROJECT = Principal("123", project_id="elsewhere", permissions=READER.permissions)
SUPERADMIN = Principal("999", project_id=PROJECT, permissions=frozenset({"workflow:superadmin"}))


def examples() -> dict[str, Any]:
    return {name: e["value"] for name, e in published_document()["components"]["examples"].items()}


def backends() -> tuple[MemoryRuns, MemoryUpdates]:
    return mock_backends(published_document(), Settings())


def running(runs: MemoryRuns) -> tuple[str, str]:
    run = next(run for run in runs.runs() if run.status == "RUNNING")
    return run.workflow_id, run.run_id


async def every_run(runs: MemoryRuns, principal: Principal, **filters: Any) -> list[dict[str, Any]]:
    listed, token = [], None
    while True:
        page = await runs.list_runs(principal, RunFilters(page_size=2, next_page_token=token, **filters))
        listed += page.runs
        if not page.has_more:
            return listed
        token = page.next_page_token


# -- seeding ------------------------------------------------------------------------------------


def test_the_seed_has_a_run_in_every_status_of_the_document() -> None:
    seeded = seed(published_document())
    assert sorted(run.status for run in seeded.runs) == sorted(statuses(published_document()))
    assert len({run.run_id for run in seeded.runs}) == len(seeded.runs)


def test_the_example_runs_are_seeded_as_written() -> None:
    runs = {run.run_id: run.details for run in seed(published_document()).runs}
    for name in ("WorkflowRunCompleted", "ConversationRunRunning"):
        example = examples()[name]
        assert runs[example["run_id"]] == example


def test_a_status_added_to_the_document_gets_a_run() -> None:
    document = copy.deepcopy(published_document())
    document["components"]["schemas"]["WorkflowRunStatus"]["enum"].append("SLEEPING")
    seeded = seed(document)
    (sleeping,) = [run for run in seeded.runs if run.status == "SLEEPING"]
    assert sleeping.details["history"][-1]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_SLEEPING"


async def test_derived_runs_read_like_runs_that_closed_that_way() -> None:
    runs, _ = backends()
    by_status = {run.status: run.details for run in runs.runs()}
    assert by_status["COMPLETED"]["result"] is not None and by_status["COMPLETED"]["error"] is None
    assert by_status["FAILED"]["result"] is None and by_status["FAILED"]["error"]
    assert by_status["CANCELED"]["history"][-1]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED"
    open_statuses = {"RUNNING", "PAUSED"}
    assert all(details["closed_at"] is not None for status, details in by_status.items() if status not in open_statuses)
    assert all(details["closed_at"] is None for status, details in by_status.items() if status in open_statuses)
    # derived from the completed example run, whose close event an open run must not show
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED" not in {e["event_type"] for e in by_status["PAUSED"]["history"]}
    assert not any(run.closed for run in runs.runs() if run.status in open_statuses)
    assert all(run.closed for run in runs.runs() if run.status not in open_statuses)


async def test_the_example_updates_are_stored_for_their_run() -> None:
    _, updates = backends()
    stored = examples()["RunUpdatesProgress"]["messages"]
    run_id = stored[0]["workflow_run_id"]
    assert json.loads(await updates.read_since(run_id, 0)) == stored
    assert json.loads(await updates.read_since(run_id, stored[0]["timestamp"])) == stored[1:]


async def test_the_example_listing_requests_find_the_example_runs() -> None:
    runs, _ = backends()
    by_document = await runs.list_runs(READER, RunFilters(**examples()["ListRunsByDocument"]))
    assert examples()["WorkflowRunCompleted"]["run_id"] in {run["run_id"] for run in by_document.runs}
    conversations = await runs.list_runs(
        READER, RunFilters(**examples()["ListConversationsRunning"]), conversations_only=True
    )
    assert [run["run_id"] for run in conversations.runs] == [examples()["ConversationRunRunning"]["run_id"]]


# -- scope and listing --------------------------------------------------------------------------


async def test_private_runs_are_their_initiators_and_the_superadmins() -> None:
    runs, _ = backends()
    private = examples()["ConversationRunRunning"]
    assert private["run_id"] in {run["run_id"] for run in await every_run(runs, READER)}
    assert private["run_id"] in {run["run_id"] for run in await every_run(runs, SUPERADMIN)}
    assert private["run_id"] not in {run["run_id"] for run in await every_run(runs, OTHER_USER)}
    with pytest.raises(NotFound, match=f"Workflow run {private['run_id']} was not found."):
        await runs.get_run(OTHER_USER, private["workflow_id"], private["run_id"])


async def test_another_project_sees_nothing_and_reads_not_found() -> None:
    runs, _ = backends()
    assert await every_run(runs, OTHER_PROJECT) == []
    workflow_id, run_id = running(runs)
    for call in (
        runs.get_run(OTHER_PROJECT, workflow_id, run_id),
        runs.apply_action(OTHER_PROJECT, workflow_id, run_id, "cancel", None),
        runs.signal(OTHER_PROJECT, workflow_id, run_id, "UserInput", {"message": "x"}),
        runs.find_run(OTHER_PROJECT, run_id),
    ):
        with pytest.raises(NotFound, match=f"^Workflow run {run_id} was not found.$"):
            await call
    with pytest.raises(Forbidden):
        await runs.list_runs(Principal("123"), RunFilters())


async def test_pages_cover_every_run_once_open_runs_first() -> None:
    runs, _ = backends()
    listed = await every_run(runs, READER)
    assert len(listed) == len(runs.runs())
    assert listed[0]["status"] == "RUNNING"


async def test_a_foreign_page_token_and_a_bad_query_are_refused_as_by_the_real_backend() -> None:
    runs, _ = backends()
    page = await runs.list_runs(READER, RunFilters(page_size=1))
    with pytest.raises(InvalidInput, match="page token"):
        await runs.list_runs(READER, RunFilters(page_size=1, status="failed", next_page_token=page.next_page_token))
    with pytest.raises(InvalidInput, match="query cannot be used"):
        await runs.list_runs(READER, RunFilters(query="ProjectId = 'x'"))
    with pytest.raises(InvalidInput, match="Temporal refused"):
        await runs.list_runs(READER, RunFilters(query="NoSuchAttribute = 'x'"))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"status": "canceled"}, {"CANCELED"}),
        ({"status": "timed_out"}, {"TIMED_OUT"}),
        ({"query": "ExecutionStatus IN ('Failed', 'TimedOut')"}, {"FAILED", "TIMED_OUT"}),
        ({"query": "WorkflowId STARTS_WITH 'conv-' OR ExecutionStatus = 'Completed'"}, {"RUNNING", "COMPLETED"}),
        ({"query": "NOT (WorkflowType = 'StandardContentIngestion')"}, {"RUNNING"}),
        ({"type": "AgentConversation"}, {"RUNNING"}),
        ({"search_term": "conv-5e2d"}, {"RUNNING"}),
        ({"start": "2023-03-15T14:00:00Z"}, {"RUNNING"}),
        ({"end": "2023-03-15T14:00:00Z", "status": "completed"}, {"COMPLETED"}),
    ],
)
async def test_listing_filters_select_the_runs_temporal_would(filters: dict[str, Any], expected: set[str]) -> None:
    runs, _ = backends()
    assert {run["status"] for run in await every_run(runs, READER, **filters)} == expected


# -- state changes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "status"), [("cancel", "CANCELED"), ("terminate", "TERMINATED")])
async def test_an_action_closes_the_run_and_a_closed_run_refuses_more(action: Any, status: str) -> None:
    runs, _ = backends()
    workflow_id, run_id = running(runs)
    await runs.apply_action(READER, workflow_id, run_id, action, "done")
    run = await runs.get_run(READER, workflow_id, run_id)
    assert run["status"] == status and run["closed_at"] is not None and run["pendingActivities"] == []
    assert run["history"][-1]["event_type"] == f"EVENT_TYPE_WORKFLOW_EXECUTION_{status}"
    assert await runs.closed_status(workflow_id, run_id) == status
    assert (await runs.find_run(READER, run_id)).closed
    closed = f"^Workflow run {run_id} is already closed \\({status}\\).$"
    with pytest.raises(Conflict, match=closed):
        await runs.apply_action(READER, workflow_id, run_id, "terminate", None)
    with pytest.raises(Conflict, match=closed):
        await runs.signal(READER, workflow_id, run_id, "UserInput", {"message": "late"})


async def test_a_signal_shows_in_the_history() -> None:
    runs, _ = backends()
    workflow_id, run_id = running(runs)
    await runs.signal(READER, workflow_id, run_id, "UserInput", {"message": "hello", "data": {"n": 1}})
    event = (await runs.get_run(READER, workflow_id, run_id))["history"][-1]
    assert event["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED"
    assert event["signal"] == {"name": "UserInput", "input": [{"message": "hello", "data": {"n": 1}}]}
    assert await runs.closed_status(workflow_id, run_id) is None


async def test_is_known_as_the_real_backend_remembers_runs_and_misses() -> None:
    runs, _ = backends()
    workflow_id, run_id = running(runs)
    assert not runs.is_known(run_id)
    with pytest.raises(NotFound):
        await runs.find_run(OTHER_PROJECT, run_id)  # exists, though this caller may not see it
    assert runs.is_known(run_id) and runs.is_known(run_id, workflow_id)
    assert not runs.is_known(run_id, "another-workflow")
    with pytest.raises(NotFound):
        await runs.find_run(READER, run_id, "another-workflow")
    assert runs.is_known(run_id, "another-workflow")


# -- updates and streams ------------------------------------------------------------------------


async def test_a_stream_replays_then_takes_live_updates_without_duplicates() -> None:
    updates = MemoryUpdates()
    first = await updates.append("r1", {"message": "one"})
    stream = await updates.open_stream("r1", after_id=None, since_ms=None, skip_history=False)
    second = await updates.append("r1", {"message": "two"})
    events = [await stream.next(0.01), await stream.next(0.01)]
    assert [(e[1], json.loads(e[2])["message"]) for e in events if e] == [(first, "one"), (second, "two")]
    assert await stream.next(0.01) is None  # nothing more yet: a heartbeat's turn
    stream.finish()
    with pytest.raises(StopAsyncIteration):
        await stream.next(0.01)


async def test_a_stream_waiting_for_the_next_update_is_woken_by_it() -> None:
    updates = MemoryUpdates()
    stream = await updates.open_stream("r1", after_id=None, since_ms=None, skip_history=True)
    waiting = asyncio.ensure_future(stream.next(30))
    await asyncio.sleep(0)
    await updates.append("r1", {"message": "live"})
    event = await waiting
    assert event is not None and json.loads(event[2])["message"] == "live"
    await stream.aclose()


async def test_cursors_skip_history_last_event_id_and_since() -> None:
    updates = MemoryUpdates()
    ids = [await updates.append("r1", {"message": str(n)}) for n in range(3)]

    async def messages(**cursor: Any) -> list[str]:
        stream = await updates.open_stream("r1", **{"after_id": None, "since_ms": None, "skip_history": False} | cursor)
        stream.finish()
        out: list[str] = []
        while True:
            try:
                event = await stream.next(0.01)
            except StopAsyncIteration:
                return out
            assert event is not None
            out.append(json.loads(event[2])["message"])

    assert await messages() == ["0", "1", "2"]
    assert await messages(skip_history=True) == []
    assert await messages(after_id=ids[0]) == ["1", "2"]
    assert await messages(since_ms=int(ids[1].split("-")[0])) == ["2"]


async def test_bounds_drop_the_oldest_and_a_late_stream_is_told_so() -> None:
    updates = MemoryUpdates(max_updates=2)
    ids = [await updates.append("r1", {"message": str(n)}) for n in range(4)]
    assert [json.loads(u)["message"] for u in updates.stored_updates("r1")] == ["2", "3"]
    stream = await updates.open_stream("r1", after_id=ids[0], since_ms=None, skip_history=False)
    first = await stream.next(0.01)
    assert first is not None and first[0] == "truncated" and json.loads(first[2])["oldest_id"] == ids[2]


async def test_timestamps_are_unique_and_increasing() -> None:
    updates = MemoryUpdates(clock_ms=lambda: 1_000)
    ids = [await updates.append("r1", {"message": "m"}) for _ in range(3)]
    assert ids == ["1000-0", "1001-0", "1002-0"]
    assert [json.loads(u)["timestamp"] for u in updates.stored_updates("r1")] == [1000, 1001, 1002]


async def test_a_stream_too_far_behind_is_dropped() -> None:
    updates = MemoryUpdates(queue_size=2)
    stream = await updates.open_stream("r1", after_id=None, since_ms=None, skip_history=True)
    for n in range(3):
        await updates.append("r1", {"message": str(n)})
    with pytest.raises(StopAsyncIteration):
        while True:
            await stream.next(0.01)
