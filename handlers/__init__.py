"""The eight operations of the document, one module per resource.

Every handler has one signature, whoever calls it (Connexion's endpoint or the fast lane, both in
`web`): `await handler(deps, principal, **parameters)`, where `deps` is the app's `handlers.deps.Deps`,
`principal` the verified caller, and the parameters are the operation's path, query and header
parameters and its JSON `body`, by their Python names (`workflowId` -> `workflow_id`,
`Last-Event-ID` -> `last_event_id`), each passed only if the handler declares it. A handler returns
the JSON bytes of its 200 answer, or (the stream) a `handlers.updates.OpenedStream`; it raises a
`core.errors.DomainError` for anything else.

`HANDLERS` maps every operationId of the document to its handler; the HTTP layer refuses to start
when one is missing or unused (`tests/unit/test_operations.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from handlers import conversations, runs, updates

Handler = Callable[..., Awaitable[Any]]

HANDLERS: dict[str, Handler] = {
    "getWorkflowRun": runs.get_workflow_run,
    "listWorkflowRuns": runs.list_workflow_runs,
    "applyWorkflowRunAction": runs.apply_workflow_run_action,
    "signalWorkflowRun": runs.signal_workflow_run,
    "getWorkflowRunUpdates": updates.get_workflow_run_updates,
    "streamWorkflowRunUpdates": updates.stream_workflow_run_updates,
    "postWorkflowRunUpdate": updates.post_workflow_run_update,
    "listConversations": conversations.list_conversations,
}
