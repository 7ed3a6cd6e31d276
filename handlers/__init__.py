"""Handlers, one module per resource; `OPERATIONS` maps every operationId of the document to one.

The table is explicit (no naming convention to guess) and `tests/unit/test_routing.py` proves every
operation of the document resolves to an entry here and every entry is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from handlers import conversations, runs, updates

OPERATIONS: dict[str, Callable[..., Any]] = {
    "getWorkflowRun": runs.get_workflow_run,
    "listWorkflowRuns": runs.list_workflow_runs,
    "applyWorkflowRunAction": runs.apply_workflow_run_action,
    "signalWorkflowRun": runs.signal_workflow_run,
    "getWorkflowRunUpdates": updates.get_workflow_run_updates,
    "streamWorkflowRunUpdates": updates.stream_workflow_run_updates,
    "postWorkflowRunUpdate": updates.post_workflow_run_update,
    "listConversations": conversations.list_conversations,
}


def resolve(operation_id: str) -> Callable[..., Any]:
    return OPERATIONS[operation_id]
