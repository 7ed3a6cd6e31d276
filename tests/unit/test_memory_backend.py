"""The in-memory backends (`backends.memory`): mock mode's seeding from the document, and the
behaviour they share with the real ones (scope, words of the errors, closing, listing, streams)."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from typing import Any

import pytest

from backends.memory import MemoryRuns, MemoryUpdates, mock_backends, seed
from backends.memory.seed import statuses
from backends.temporal_runs import MISSING_CACHE_SIZE, RUN_CACHE_SIZE
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


# -- what is remembered is bounded as in the real backend ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_missing_run_is_forgotten_after_the_not_found_cache_time() -> None:
    clock = Clock()
    runs = MemoryRuns(seed(published_document()).runs, not_found_seconds=2.0, cache_clock=clock)
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound):
        await runs.find_run(READER, missing)
    assert runs.is_known(missing)
    clock.now += 2.0
    assert not runs.is_known(missing)
    with pytest.raises(NotFound):
        await runs.find_run(READER, str(uuid.uuid4()))  # a later miss drops the expired one
    assert (missing, None) not in runs.missing and len(runs.missing) == 1


async def test_misses_are_bounded_as_the_real_backends_oldest_first() -> None:
    runs = MemoryRuns(cache_clock=Clock())
    ids = [str(uuid.uuid4()) for _ in range(MISSING_CACHE_SIZE + 1)]
    for run_id in ids:
        with pytest.raises(NotFound):
            await runs.find_run(READER, run_id)
    assert len(runs.missing) == MISSING_CACHE_SIZE
    assert not runs.is_known(ids[0]) and runs.is_known(ids[1]) and runs.is_known(ids[-1])


async def test_the_mock_takes_the_not_found_cache_time_from_the_settings() -> None:
    runs, _ = mock_backends(published_document(), Settings(not_found_cache_seconds=0))
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound):
        await runs.find_run(READER, missing)
    assert not runs.is_known(missing) and not runs.missing


async def test_known_runs_are_bounded_least_recently_used_first() -> None:
    seeded = seed(published_document()).runs
    runs = MemoryRuns(seeded, cache_size=2)
    for run in seeded:
        await runs.find_run(SUPERADMIN, run.run_id)
    assert list(runs.known) == [run.run_id for run in seeded[-2:]]
    assert not runs.is_known(seeded[0].run_id) and runs.is_known(seeded[-1].run_id)
    assert MemoryRuns()._cache_size == RUN_CACHE_SIZE


# -- the query as Temporal's visibility store reads it ------------------------------------------


def duration_of(runs: MemoryRuns, status: str) -> int:
    return int(next(run for run in runs.runs() if run.status == status).details["execution_duration"])


async def test_execution_duration_is_compared_in_nanoseconds_and_takes_duration_strings() -> None:
    runs, _ = backends()
    seconds = duration_of(runs, "COMPLETED")
    same = {run.status for run in runs.runs() if run.closed and run.details["execution_duration"] == seconds}
    for query in (
        f"ExecutionDuration = {seconds * 1_000_000_000}",
        f"ExecutionDuration = '{seconds}s'",
        f"ExecutionDuration = '{seconds * 1000}ms'",
        f"ExecutionDuration = '00:{seconds // 60:02d}:{seconds % 60:02d}'",
        f"ExecutionDuration BETWEEN '{seconds - 1}s' AND '1d'",
    ):
        assert {run["status"] for run in await every_run(runs, READER, query=query)} == same, query
    assert await every_run(runs, READER, query=f"ExecutionDuration = {seconds}") == []
    # As in Temporal, a run has no duration until it closes.
    open_ones = {run["status"] for run in await every_run(runs, READER, query="ExecutionDuration IS NULL")}
    assert open_ones == {"RUNNING", "PAUSED"}


@pytest.mark.parametrize(
    "query",
    [
        "ExecutionStatus = 'Bogus'",
        "ExecutionStatus = 'running'",
        "ExecutionStatus = 9",
        "ExecutionStatus = 5.0",
        "ExecutionStatus STARTS_WITH 'Run'",
        "CloseTime > 'x'",
        "CloseTime > '2024-01-01'",
        "StartTime STARTS_WITH '2024'",
        "StartTime STARTS_WITH '2024-01-01T00:00:00Z'",
        "StartTime = true",
        "WorkflowType = 5",
        "RunId IN ('a', 1)",
        "ExecutionDuration > 'abc'",
        "ExecutionDuration > '1.5'",
        "ExecutionDuration > 5.5",
        "ExecutionDuration STARTS_WITH '1'",
        "HistoryLength > '5'",
        "NoSuchAttribute = 'x'",
    ],
)
async def test_a_literal_of_the_wrong_type_is_refused_whatever_the_runs(query: str) -> None:
    runs, _ = backends()
    for principal in (READER, OTHER_PROJECT):  # the other project sees no run at all
        with pytest.raises(InvalidInput, match=r"^Temporal refused this listing's filters"):
            await runs.list_runs(principal, RunFilters(query=query))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("ExecutionStatus = 5", {"TERMINATED"}),
        ("ExecutionStatus IN ('Running', 8)", {"RUNNING", "PAUSED"}),
        ("ExecutionStatus = 'WORKFLOW_EXECUTION_STATUS_TIMED_OUT'", {"TIMED_OUT"}),
        ("ExecutionStatus BETWEEN 6 AND 7", {"CONTINUED_AS_NEW", "TIMED_OUT"}),
        (
            "CloseTime > 5",
            {"COMPLETED", "FAILED", "CANCELED", "TERMINATED", "CONTINUED_AS_NEW", "TIMED_OUT", "UNKNOWN"},
        ),
        ("NOT (CloseTime < '2000-01-01T00:00:00Z') AND ExecutionStatus < 4", {"COMPLETED", "FAILED"}),
        ("StartTime >= '2023-03-15T15:20:00+01:00'", {"RUNNING"}),
        ("StartTime = 1678890000000000000", {"RUNNING"}),
        ("WorkflowType < 'B' AND ExecutionStatus <= 'Running'", {"RUNNING"}),
    ],
)
async def test_typed_literals_match_as_in_temporal(query: str, expected: set[str]) -> None:
    runs, _ = backends()
    assert {run["status"] for run in await every_run(runs, READER, query=query)} == expected


async def test_a_history_reaching_temporals_limits_terminates_the_run() -> None:
    seeded = seed(published_document()).runs
    run = next(run for run in seeded if run.status == "RUNNING")
    events = len(run.details["history"])
    runs = MemoryRuns(seeded, history_limits=(events + 3, 1 << 30))
    await runs.signal(READER, run.workflow_id, run.run_id, "UserInput", {"message": "one"})
    assert run.status == "RUNNING"
    await runs.signal(READER, run.workflow_id, run.run_id, "UserInput", {"message": "two"})
    details = await runs.get_run(READER, run.workflow_id, run.run_id)
    assert details["status"] == "TERMINATED" and len(details["history"]) == events + 3
    assert details["history"][-1]["reason"] == "Workflow history size / count exceeds limit."
    with pytest.raises(Conflict):
        await runs.signal(READER, run.workflow_id, run.run_id, "UserInput", {"message": "three"})

    by_size = seed(published_document()).runs
    run = next(run for run in by_size if run.status == "RUNNING")
    runs = MemoryRuns(by_size, history_limits=(1 << 30, len(json.dumps(run.details["history"])) + 1000))
    await runs.signal(READER, run.workflow_id, run.run_id, "UserInput", {"message": "x" * 1000})
    assert run.status == "TERMINATED"


async def test_a_runs_updates_expire_after_the_redis_ttl_since_the_last_post() -> None:
    now = [1_000]
    updates = MemoryUpdates(ttl_seconds=10, clock_ms=lambda: now[0])
    await updates.append("r1", {"message": "old"})
    now[0] += 9_000
    await updates.append("r1", {"message": "renews"})
    now[0] += 9_000
    assert len(updates.stored_updates("r1")) == 2
    now[0] += 1_000
    assert updates.stored_updates("r1") == [] and await updates.read_since("r1", 0) == b"[]"
    await updates.append("r1", {"message": "new"})
    assert [json.loads(u)["message"] for u in updates.stored_updates("r1")] == ["new"]


async def test_a_stream_holding_more_unread_bytes_than_the_bound_is_dropped() -> None:
    updates = MemoryUpdates(max_bytes=3_000)
    stream = await updates.open_stream("r1", after_id=None, since_ms=None, skip_history=True)
    for _ in range(3):
        await updates.append("r1", {"message": "x" * 1_200})
    assert len(updates.stored_updates("r1")) == 2  # the run keeps what fits, as Redis
    received = []
    with pytest.raises(StopAsyncIteration):
        for _ in range(10):
            received.append(await stream.next(0.01))
    assert received == []  # dropped, not handed a backlog past the bound
