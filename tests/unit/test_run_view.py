"""A run's status as the API shows it: the document's values only, PAUSED open, and any status
Temporal reports that the document does not list answered as the documented `UNKNOWN`."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.common import TypedSearchAttributes

from backends import run_view
from backends.run_view import DOCUMENTED_STATUSES, UNKNOWN_STATUS, RunScope, is_open, status_name, summary
from generated.models import WorkflowRunStatus, WorkflowRunSummary
from web.app import resolved_document

NOT_A_STATUS_YET = 99  # what a newer Temporal could send: no SDK or document knows it


def info(status: int, *, closed: bool) -> WorkflowExecutionInfo:
    execution = WorkflowExecutionInfo(status=status)  # type: ignore[arg-type]
    execution.execution.workflow_id, execution.execution.run_id = "wf", "3f1c9a52-8b7e-4d21-9c55-0a6e2b7d41f8"
    execution.type.name = "T"
    execution.start_time.seconds = 1_678_886_400
    if closed:
        execution.close_time.seconds = 1_678_886_460
    return execution


def listed(execution: WorkflowExecutionInfo) -> dict[str, Any]:
    shown = summary(execution, TypedSearchAttributes.empty, {}, now=1_678_886_500)
    WorkflowRunSummary.model_validate(shown)  # what the handlers do before answering
    return shown


def test_the_statuses_shown_are_exactly_the_document_s() -> None:
    documented = resolved_document()["components"]["schemas"]["WorkflowRunStatus"]["enum"]
    assert set(documented) == DOCUMENTED_STATUSES | {UNKNOWN_STATUS}
    assert {member.value for member in WorkflowRunStatus} == set(documented)
    described = resolved_document()["components"]["schemas"]["WorkflowRunStatus"]["description"]
    assert all(f"`{value}`" in described for value in documented)
    assert "must accept values not listed" in described


@pytest.mark.parametrize(("name", "value"), list(WorkflowExecutionStatus.items()))
def test_every_status_this_sdk_knows_is_shown_as_a_documented_value(name: str, value: int) -> None:
    shown = status_name(value)
    expected = name.removeprefix(run_view.STATUS_PREFIX)
    assert shown == (expected if expected in DOCUMENTED_STATUSES else UNKNOWN_STATUS)


def test_paused_is_an_open_status() -> None:
    paused = info(WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_PAUSED, closed=False)
    assert is_open(paused)
    shown = listed(paused)
    assert (shown["status"], shown["closed_at"], shown["execution_duration"]) == ("PAUSED", None, 100)


@pytest.mark.parametrize("closed", [True, False])
def test_a_status_no_one_knows_is_unknown_and_open_unless_temporal_closed_it(closed: bool) -> None:
    execution = info(NOT_A_STATUS_YET, closed=closed)
    assert is_open(execution) is not closed
    shown = listed(execution)
    assert shown["status"] == UNKNOWN_STATUS
    assert shown["closed_at"] == (1_678_886_460 if closed else None)


def test_closed_statuses_are_closed_even_without_a_close_time() -> None:
    assert not is_open(info(WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED, closed=False))
    assert is_open(info(WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING, closed=False))


def test_a_run_without_a_recorded_starter_is_shown_as_the_filter_value_that_finds_it() -> None:
    """`initiated_by: unknown` in a listing is what the `initiated_by` filter takes to find it
    (tests/unit/test_visibility_query.py checks the query it builds)."""
    assert RunScope.of(TypedSearchAttributes.empty).initiated_by == "unknown"
    assert listed(info(WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING, closed=False))["initiated_by"] == (
        "unknown"
    )
