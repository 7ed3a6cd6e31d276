"""Posting an update for a run Temporal's listings do not show yet (docs/decisions/0015-visibility-lag.md).

With `workflow_id` the run is described, which sees it at once; without it the run is looked up in
the listings again, with growing pauses, for VISIBILITY_WAIT_SECONDS, past the remembered "not
found", each further look-up taken from the caller's Temporal bucket, and at most
MAX_VISIBILITY_WAITS_PER_PROCESS such waits at once (429 beyond). Temporal is a fake here whose
listings show the run `lag` seconds (of a fake clock) after it started; the real thing, behind a
lagging wrapper, is tests/integration/test_visibility_lag.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from temporalio.api.common.v1 import WorkflowExecution, WorkflowType
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import (
    DescribeWorkflowExecutionRequest,
    DescribeWorkflowExecutionResponse,
    ListWorkflowExecutionsRequest,
    ListWorkflowExecutionsResponse,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import default as default_converter
from temporalio.converter import encode_search_attributes
from temporalio.service import RPCError, RPCStatusCode

from backends.memory import MemoryUpdates
from backends.temporal_runs import TemporalRunsBackend
from core.errors import NotFound, TooManyRequests
from core.principals import Principal
from core.search_attributes import INITIATED_BY, PROJECT_ID
from core.settings import Settings
from tests.support.fakes import app_settings, bearer
from tests.support.tls import served
from tests.support.waits import wait_until
from web.app import create_app

WORKFLOW_ID, RUN_ID = "wf-1", "3f1c9a52-8b7e-4d21-9c55-0a6e2b7d41f8"
MISSING_RUN_ID = "00000000-0000-4000-8000-000000000000"
SECRET = "s" * 32
ME = Principal(user_id="u1", project_id="p1", permissions=frozenset({"workflow:run"}))
OTHER_PROJECT = Principal(user_id="u1", project_id="p2", permissions=frozenset({"workflow:run"}))
WINDOW = 5.0
DEADLINE = 10.0


class Clock:
    """The backend's clock and its pauses: a pause moves the clock on, and waits first for `gate`
    when a test holds it shut."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.gate: asyncio.Event | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class LaggingTemporal:
    """Just enough of temporalio's client for `find_run`: one run of project p1 that started at
    `started_at` (clock time); a describe sees it from then on, a listing `lag` seconds later."""

    clock: Clock
    started_at: float
    lag: float = 2.0
    listings: list[str] = field(default_factory=list)  # the run ids listed, one per call
    describes: int = 0
    namespace: str = "default"
    data_converter: Any = field(default_factory=default_converter)
    config: Any = field(default_factory=lambda: SimpleNamespace(identity="test@fake", target_host="fake:7233"))

    @property
    def workflow_service(self) -> LaggingTemporal:
        return self

    @property
    def service_client(self) -> LaggingTemporal:
        return self

    async def describe_workflow_execution(
        self, request: DescribeWorkflowExecutionRequest, **_: Any
    ) -> DescribeWorkflowExecutionResponse:
        self.describes += 1
        execution = request.execution
        if (execution.workflow_id, execution.run_id) != (WORKFLOW_ID, RUN_ID) or self.clock() < self.started_at:
            raise RPCError("workflow execution not found", RPCStatusCode.NOT_FOUND, b"")
        return DescribeWorkflowExecutionResponse(workflow_execution_info=run_info())

    async def list_workflow_executions(
        self, request: ListWorkflowExecutionsRequest, **_: Any
    ) -> ListWorkflowExecutionsResponse:
        run_id = request.query.split("'")[1]  # the look-up's `RunId = '...'`
        self.listings.append(run_id)
        listed = run_id == RUN_ID and self.clock() >= self.started_at + self.lag
        return ListWorkflowExecutionsResponse(executions=[run_info()] if listed else [])

    def get_workflow_handle(self, workflow_id: str, *, run_id: str) -> Any:
        return SimpleNamespace(id=workflow_id)


def run_info() -> WorkflowExecutionInfo:
    info = WorkflowExecutionInfo(
        execution=WorkflowExecution(workflow_id=WORKFLOW_ID, run_id=RUN_ID),
        type=WorkflowType(name="StandardContentIngestion"),
        status=WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING,
    )
    info.start_time.FromSeconds(1_700_000_000)
    attributes = TypedSearchAttributes(
        [SearchAttributePair(PROJECT_ID, "p1"), SearchAttributePair(INITIATED_BY, "user:u1")]
    )
    encode_search_attributes(attributes, info.search_attributes)
    return info


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def temporal(clock: Clock) -> LaggingTemporal:
    return LaggingTemporal(clock, started_at=clock.now)


def backend_of(temporal: LaggingTemporal, clock: Clock, **options: Any) -> TemporalRunsBackend:
    options = {"visibility_wait_seconds": WINDOW, **options}
    return TemporalRunsBackend(temporal, clock=clock, sleep=clock.sleep, **options)  # type: ignore[arg-type]


class Charges:
    """A `before_look_up` that counts, and refuses (as an empty bucket does) past `limit`."""

    def __init__(self, limit: int = 1000) -> None:
        self.count = 0
        self.limit = limit

    def __call__(self) -> None:
        if self.count >= self.limit:
            raise TooManyRequests("over the Temporal bucket", retry_after=1)
        self.count += 1


# -- the backend ----------------------------------------------------------------------------------


async def test_a_run_not_listed_yet_is_found_once_it_is_each_look_up_charged(
    temporal: LaggingTemporal, clock: Clock
) -> None:
    runs = backend_of(temporal, clock)
    with pytest.raises(NotFound):
        await runs.find_run(ME, RUN_ID)  # listed 2 s after its start: not yet
    charges = Charges()
    ref = await runs.await_listed_run(ME, RUN_ID, before_look_up=charges)
    assert (ref.workflow_id, ref.run_id, ref.closed) == (WORKFLOW_ID, RUN_ID, False)
    assert clock.now >= temporal.started_at + temporal.lag
    assert charges.count == len(temporal.listings) - 1 > 1  # every look-up after the first, charged
    # Found: known from here on, at no further call.
    listed = len(temporal.listings)
    assert runs.is_known(RUN_ID)
    assert (await runs.find_run(ME, RUN_ID)).workflow_id == WORKFLOW_ID
    assert len(temporal.listings) == listed


async def test_the_remembered_not_found_does_not_answer_during_the_wait(
    temporal: LaggingTemporal, clock: Clock
) -> None:
    runs = backend_of(temporal, clock, not_found_seconds=60)
    with pytest.raises(NotFound):
        await runs.find_run(ME, RUN_ID)
    # The fast path keeps its cache: asked again, Temporal is not.
    with pytest.raises(NotFound):
        await runs.find_run(ME, RUN_ID)
    assert len(temporal.listings) == 1
    assert runs.is_known(RUN_ID)
    # The wait looks past it, well before the 60 s are over.
    assert (await runs.await_listed_run(ME, RUN_ID, before_look_up=Charges())).run_id == RUN_ID
    assert clock.now < temporal.started_at + 60


async def test_a_run_that_never_exists_is_not_found_once_the_window_is_over(
    temporal: LaggingTemporal, clock: Clock
) -> None:
    runs = backend_of(temporal, clock)
    began = clock.now
    with pytest.raises(NotFound, match=f"Workflow run {MISSING_RUN_ID} was not found"):
        await runs.await_listed_run(ME, MISSING_RUN_ID, before_look_up=Charges())
    assert clock.now >= began + WINDOW
    assert temporal.listings == [MISSING_RUN_ID] * len(temporal.listings)
    assert 3 < len(temporal.listings) <= 10  # growing pauses: a few look-ups, not one per tick
    # Remembered as missing afterwards, as any "not found" of the fast path.
    assert runs.is_known(MISSING_RUN_ID)


async def test_another_projects_run_is_not_found_without_waiting_once_it_is_known(
    temporal: LaggingTemporal, clock: Clock
) -> None:
    runs = backend_of(temporal, clock)
    clock.now += temporal.lag  # listed
    with pytest.raises(NotFound):
        await runs.find_run(OTHER_PROJECT, RUN_ID)
    listed, now = len(temporal.listings), clock.now
    with pytest.raises(NotFound, match=f"Workflow run {RUN_ID} was not found"):
        await runs.await_listed_run(OTHER_PROJECT, RUN_ID, before_look_up=Charges())
    assert (len(temporal.listings), clock.now) == (listed, now)


async def test_another_projects_run_not_listed_yet_is_not_found_once_listed(
    temporal: LaggingTemporal, clock: Clock
) -> None:
    runs = backend_of(temporal, clock)
    with pytest.raises(NotFound):
        await runs.await_listed_run(OTHER_PROJECT, RUN_ID, before_look_up=Charges())
    assert clock.now < temporal.started_at + WINDOW  # answered as soon as the listing told whose it is


async def test_with_the_workflow_id_the_run_is_described_at_once(temporal: LaggingTemporal, clock: Clock) -> None:
    runs = backend_of(temporal, clock)
    assert (await runs.find_run(ME, RUN_ID, WORKFLOW_ID)).run_id == RUN_ID
    assert (temporal.listings, temporal.describes) == ([], 1)
    with pytest.raises(NotFound):
        await backend_of(temporal, clock).find_run(OTHER_PROJECT, RUN_ID, WORKFLOW_ID)


async def test_a_window_of_0_answers_at_once(temporal: LaggingTemporal, clock: Clock) -> None:
    runs = backend_of(temporal, clock, visibility_wait_seconds=0)
    charges = Charges()
    with pytest.raises(NotFound):
        await runs.await_listed_run(ME, RUN_ID, before_look_up=charges)
    assert (temporal.listings, charges.count, clock.now) == ([], 0, temporal.started_at)


async def test_an_empty_bucket_ends_the_wait(temporal: LaggingTemporal, clock: Clock) -> None:
    runs = backend_of(temporal, clock, max_visibility_waits=1)
    with pytest.raises(TooManyRequests):
        await runs.await_listed_run(ME, MISSING_RUN_ID, before_look_up=Charges(limit=2))
    assert len(temporal.listings) == 2  # what was charged, and nothing more
    # Its place was given back: another post may wait.
    assert (await runs.await_listed_run(ME, RUN_ID, before_look_up=Charges())).run_id == RUN_ID


async def test_at_most_so_many_posts_wait_at_once_the_next_is_429(temporal: LaggingTemporal, clock: Clock) -> None:
    runs = backend_of(temporal, clock, max_visibility_waits=1)
    clock.gate = asyncio.Event()
    waiting = asyncio.create_task(runs.await_listed_run(ME, MISSING_RUN_ID, before_look_up=Charges()))
    try:
        await wait_until(lambda: runs._visibility_waits == 1, DEADLINE, "the first post waits")
        with pytest.raises(TooManyRequests, match="already waiting for 1 runs") as refused:
            await runs.await_listed_run(ME, RUN_ID, before_look_up=Charges())
        assert refused.value.retry_after == 1
    finally:
        clock.gate.set()
    with pytest.raises(NotFound):
        await waiting
    assert runs._visibility_waits == 0
    assert (await runs.await_listed_run(ME, RUN_ID, before_look_up=Charges())).run_id == RUN_ID


async def test_a_cancelled_wait_gives_its_place_back(temporal: LaggingTemporal, clock: Clock) -> None:
    runs = backend_of(temporal, clock, max_visibility_waits=1)
    clock.gate = asyncio.Event()
    waiting = asyncio.create_task(runs.await_listed_run(ME, MISSING_RUN_ID, before_look_up=Charges()))
    await wait_until(lambda: runs._visibility_waits == 1, DEADLINE, "the post waits")
    waiting.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert runs._visibility_waits == 0


# -- over HTTP, on both paths -----------------------------------------------------------------------


@dataclass
class Api:
    http: httpx.AsyncClient
    temporal: LaggingTemporal
    clock: Clock
    updates: MemoryUpdates

    async def post(self, run_id: str = RUN_ID, *, project: str = "p1", **params: str) -> httpx.Response:
        return await self.http.post(
            f"/workflows/runs/{run_id}/updates",
            params=params,
            json={"type": "PROGRESS", "message": "started"},
            headers=bearer(SECRET, project=project),
        )

    def stored(self, run_id: str = RUN_ID) -> list[dict[str, Any]]:
        return [orjson.loads(entry) for entry in self.updates.stored_updates(run_id)]


@asynccontextmanager
async def api_of(fast_lane: bool, **overrides: Any) -> AsyncIterator[Api]:
    clock = Clock()
    temporal = LaggingTemporal(clock, started_at=clock.now)
    updates = MemoryUpdates()
    settings: Settings = app_settings(SECRET, fast_lane=fast_lane, **overrides)

    async def factory(settings: Settings) -> tuple[TemporalRunsBackend, MemoryUpdates]:
        runs = backend_of(
            temporal,
            clock,
            visibility_wait_seconds=settings.visibility_wait_seconds,
            max_visibility_waits=settings.max_visibility_waits_per_process,
        )
        return runs, updates

    frozen = 0.0  # the rate limits' clock: buckets refill only when a test says so
    async with served(create_app(settings, factory, clock=lambda: frozen)) as http:
        yield Api(http, temporal, clock, updates)


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_post_naming_the_workflow_is_stored_at_once(fast_lane: bool) -> None:
    async with api_of(fast_lane) as api:
        posted = await api.post(workflow_id=WORKFLOW_ID)
        assert posted.status_code == 200, posted.text
        assert [u["message"] for u in api.stored()] == ["started"]
        assert api.temporal.listings == []
        assert api.clock.now == api.temporal.started_at


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_post_without_the_workflow_waits_for_the_listing(fast_lane: bool) -> None:
    async with api_of(fast_lane) as api:
        posted = await api.post()
        assert posted.status_code == 200, posted.text
        assert [u["message"] for u in api.stored()] == ["started"]
        assert api.clock.now >= api.temporal.started_at + api.temporal.lag


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_another_project_naming_a_real_runs_workflow_gets_the_404_of_a_missing_run(fast_lane: bool) -> None:
    async with api_of(fast_lane) as api:
        refused = await api.post(project="p2", workflow_id=WORKFLOW_ID)
        wrong = await api.post(workflow_id="another-workflow")
        assert refused.status_code == wrong.status_code == 404
        assert refused.json() == wrong.json()
        assert api.stored() == []
        assert api.temporal.listings == []  # described, not waited for


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_run_that_never_exists_is_404_after_the_window(fast_lane: bool) -> None:
    async with api_of(fast_lane) as api:
        refused = await api.post(MISSING_RUN_ID)
        assert refused.status_code == 404, refused.text
        assert refused.json()["message"] == f"Workflow run {MISSING_RUN_ID} was not found."
        assert api.clock.now >= api.temporal.started_at + WINDOW
        assert api.stored(MISSING_RUN_ID) == []


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_each_look_up_of_the_wait_takes_a_temporal_token(fast_lane: bool) -> None:
    async with api_of(fast_lane, rate_limit_temporal_per_second=1, rate_limit_temporal_burst=3) as api:
        refused = await api.post(MISSING_RUN_ID)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert len(api.temporal.listings) == 3  # the first look-up and two more: the burst of 3
        assert api.stored(MISSING_RUN_ID) == []


async def test_a_window_of_0_answers_404_at_once() -> None:
    async with api_of(True, visibility_wait_seconds=0) as api:
        assert (await api.post(MISSING_RUN_ID)).status_code == 404
        assert (len(api.temporal.listings), api.clock.now) == (1, api.temporal.started_at)
