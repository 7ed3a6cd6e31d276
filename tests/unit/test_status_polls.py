"""Streams asking whether their run has closed (`TemporalRunsBackend.closed_status`).

Every open stream polls its run's status each heartbeat, at staggered times: a describe that found
the run open answers every poll of that run for OPEN_STATUS_REUSE_SECONDS, a close is answered from
memory for good, and a failed describe is not remembered. Temporal is a fake that counts describes;
the backend's clock is a fake the tests move. The real thing is tests/integration/test_temporal_runs.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from temporalio.api.common.v1 import WorkflowExecution, WorkflowType
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionRequest, DescribeWorkflowExecutionResponse
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import encode_search_attributes
from temporalio.service import RPCError, RPCStatusCode

from backends.temporal_runs import OPEN_STATUS_REUSE_SECONDS, TemporalRunsBackend
from core.errors import BackendUnavailable, NotFound
from core.principals import Principal
from core.search_attributes import INITIATED_BY, PROJECT_ID

WORKFLOW_ID = "wf-1"
RUN_A, RUN_B, RUN_C = (f"3f1c9a52-8b7e-4d21-9c55-0a6e2b7d41f{n}" for n in range(3))
ME = Principal(user_id="u1", project_id="p1", permissions=frozenset({"workflow:run"}))
RUNNING = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
TERMINATED = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TERMINATED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeTemporal:
    """Just enough of temporalio's client for `closed_status` and `find_run`: runs of project p1 in
    the status `statuses` gives (running unless named), described runs counted by run id. A describe
    takes `latency` seconds of the fake clock, and fails with `error` while one is set."""

    clock: Clock
    statuses: dict[str, WorkflowExecutionStatus.ValueType] = field(default_factory=dict)
    describes: Counter[str] = field(default_factory=Counter)
    error: RPCError | None = None
    latency: float = 0.0
    namespace: str = "default"

    @property
    def workflow_service(self) -> FakeTemporal:
        return self

    async def describe_workflow_execution(
        self, request: DescribeWorkflowExecutionRequest, **_: Any
    ) -> DescribeWorkflowExecutionResponse:
        run_id = request.execution.run_id
        self.describes[run_id] += 1
        await asyncio.sleep(0)  # in flight for a moment: concurrent askers can join it
        self.clock.now += self.latency
        if self.error is not None:
            raise self.error
        status = self.statuses.get(run_id, RUNNING)
        return DescribeWorkflowExecutionResponse(workflow_execution_info=run_info(run_id, status))

    def get_workflow_handle(self, workflow_id: str, *, run_id: str) -> Any:
        return SimpleNamespace(id=workflow_id)


def run_info(run_id: str, status: WorkflowExecutionStatus.ValueType) -> WorkflowExecutionInfo:
    info = WorkflowExecutionInfo(
        execution=WorkflowExecution(workflow_id=WORKFLOW_ID, run_id=run_id),
        type=WorkflowType(name="AgentConversation"),
        status=status,
    )
    info.start_time.FromSeconds(1_700_000_000)
    if status != RUNNING:
        info.close_time.FromSeconds(1_700_000_100)
    attributes = TypedSearchAttributes(
        [SearchAttributePair(PROJECT_ID, "p1"), SearchAttributePair(INITIATED_BY, "user:u1")]
    )
    encode_search_attributes(attributes, info.search_attributes)
    return info


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def temporal(clock: Clock) -> FakeTemporal:
    return FakeTemporal(clock)


@pytest.fixture
def runs(temporal: FakeTemporal, clock: Clock) -> TemporalRunsBackend:
    return TemporalRunsBackend(temporal, clock=clock)  # type: ignore[arg-type]


async def test_polls_of_one_run_within_the_window_share_one_describe(
    runs: TemporalRunsBackend, temporal: FakeTemporal, clock: Clock
) -> None:
    # Streams polling at once share the describe in flight...
    assert await asyncio.gather(*(runs.closed_status(WORKFLOW_ID, RUN_A) for _ in range(20))) == [None] * 20
    # ...and streams polling at staggered times within the window reuse its answer.
    for _ in range(49):
        clock.now += OPEN_STATUS_REUSE_SECONDS / 50
        assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes == {RUN_A: 1}
    # Another run is another question.
    assert await runs.closed_status(WORKFLOW_ID, RUN_B) is None
    assert temporal.describes == {RUN_A: 1, RUN_B: 1}


async def test_a_poll_past_the_window_asks_again(
    runs: TemporalRunsBackend, temporal: FakeTemporal, clock: Clock
) -> None:
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    clock.now += OPEN_STATUS_REUSE_SECONDS
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes[RUN_A] == 2
    clock.now += OPEN_STATUS_REUSE_SECONDS / 2  # the new answer is reused in turn
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes[RUN_A] == 2


async def test_the_window_counts_from_when_the_describe_was_sent(
    runs: TemporalRunsBackend, temporal: FakeTemporal, clock: Clock
) -> None:
    # The run may have closed while a slow answer travelled: its age counts from the asking.
    temporal.latency = 2.0
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    clock.now += OPEN_STATUS_REUSE_SECONDS - temporal.latency
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes[RUN_A] == 2


async def test_a_close_is_seen_after_the_window_and_then_never_asked_again(
    runs: TemporalRunsBackend, temporal: FakeTemporal, clock: Clock
) -> None:
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    temporal.statuses[RUN_A] = TERMINATED
    # Within the window the last answer stands (the staleness bound)...
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes[RUN_A] == 1
    # ...after it, the close is seen...
    clock.now += OPEN_STATUS_REUSE_SECONDS
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) == "TERMINATED"
    # ...and is final: no later poll, however late, asks Temporal.
    for _ in range(10):
        clock.now += OPEN_STATUS_REUSE_SECONDS * 100
        assert await runs.closed_status(WORKFLOW_ID, RUN_A) == "TERMINATED"
    assert temporal.describes[RUN_A] == 2


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (RPCError("down", RPCStatusCode.UNAVAILABLE, b""), BackendUnavailable),
        (RPCError("workflow execution not found", RPCStatusCode.NOT_FOUND, b""), NotFound),
    ],
)
async def test_a_failed_describe_is_not_remembered(
    runs: TemporalRunsBackend, temporal: FakeTemporal, clock: Clock, error: RPCError, raised: type[Exception]
) -> None:
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    clock.now += OPEN_STATUS_REUSE_SECONDS
    temporal.error = error
    for expected_describes in (2, 3):  # each poll asks again: neither the failure nor "open" is kept
        with pytest.raises(raised):
            await runs.closed_status(WORKFLOW_ID, RUN_A)
        assert temporal.describes[RUN_A] == expected_describes
    temporal.error = None
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes[RUN_A] == 4  # an answer is reused again once one comes


async def test_the_remembered_open_answers_are_bounded(temporal: FakeTemporal, clock: Clock) -> None:
    runs = TemporalRunsBackend(temporal, clock=clock, cache_size=2)  # type: ignore[arg-type]
    for run_id in (RUN_A, RUN_B, RUN_C):
        assert await runs.closed_status(WORKFLOW_ID, run_id) is None
    # Within the window, the two latest answers are reused; the oldest was dropped for them.
    assert await runs.closed_status(WORKFLOW_ID, RUN_C) is None
    assert await runs.closed_status(WORKFLOW_ID, RUN_B) is None
    assert temporal.describes == {RUN_A: 1, RUN_B: 1, RUN_C: 1}
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes == {RUN_A: 2, RUN_B: 1, RUN_C: 1}


async def test_a_post_after_a_shorter_window_still_asks_temporal(temporal: FakeTemporal, clock: Clock) -> None:
    # A find_run past the post-after-close window describes the run, even while the streams'
    # "open" answer is reused: that window, not this one, bounds how late a post may come.
    runs = TemporalRunsBackend(temporal, clock=clock, open_status_seconds=1.0)  # type: ignore[arg-type]
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    clock.now += 2.0
    temporal.statuses[RUN_A] = TERMINATED
    assert not runs.is_known(RUN_A, WORKFLOW_ID)
    assert (await runs.find_run(ME, RUN_A, WORKFLOW_ID)).closed
    assert temporal.describes[RUN_A] == 2
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) == "TERMINATED"  # and the streams learn it too
    assert temporal.describes[RUN_A] == 2


async def test_a_fresh_question_asks_temporal_even_within_the_window(
    runs: TemporalRunsBackend, temporal: FakeTemporal
) -> None:
    # A stream's opening asks afresh (it must answer 503 while Temporal is down), and its answer
    # serves the polls after it.
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert await runs.closed_status(WORKFLOW_ID, RUN_A, fresh=True) is None
    assert temporal.describes[RUN_A] == 2
    assert await runs.closed_status(WORKFLOW_ID, RUN_A) is None
    assert temporal.describes[RUN_A] == 2
