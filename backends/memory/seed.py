"""Mock mode's starting state, read from the document's own examples.

- Every run example (`components/examples` whose value is a `WorkflowRun`: it has `run_id`,
  `workflow_id`, `status` and `history`) becomes a run of the mock project, as written.
- Every status of the `WorkflowRunStatus` enum that no example shows gets a run derived from the
  first non-interactive example run: new ids, that status, its close event and time (open
  statuses none; `UNKNOWN` a close time but no event), `result` only
  when `COMPLETED`, `error` only for a failure status. The list of statuses is the document's, so
  a status added there gets its run without a change here.
- Every update-list example (`{"messages": [...]}`) is stored for the run its updates name, with
  its timestamps.
- A listing example that filters on `document_id` (with `event_name`, `rule_id`) gives those
  search attributes to the runs whose input names that document, so the example request finds them.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.memory.runs import COMPLETED, FAILURE_STATUSES, OPEN_STATUSES, UNKNOWN, MemoryRun
from core.protocols import JSON

MOCK_PROJECT = "dev-project"
RUN_FIELDS = frozenset({"run_id", "workflow_id", "status", "history"})
ATTRIBUTE_FIELDS = ("document_id", "event_name", "rule_id")
DEFAULT_RUN_SECONDS = 60  # a derived run's duration when its model has no close time


@dataclass
class Seed:
    runs: list[MemoryRun] = field(default_factory=list)
    updates: dict[str, list[dict[str, JSON]]] = field(default_factory=dict)  # run id -> RunUpdates

    @property
    def initiated_by(self) -> str:
        """Who started the seeded runs (the example runs' `initiated_by`): the mock's dev token is
        that principal's, so it sees their private runs too."""
        for run in self.runs:
            if run.details.get("visibility") == "private":
                return str(run.details["initiated_by"])
        return str(self.runs[0].details["initiated_by"]) if self.runs else "user:dev"


def _resolve(document: Mapping[str, Any], node: Any) -> Any:
    """`node`, or what its local `$ref` points to (followed until it is not a reference)."""
    for _ in range(16):
        if not (isinstance(node, Mapping) and isinstance(node.get("$ref"), str)):
            return node
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def statuses(document: Mapping[str, Any]) -> list[str]:
    """The values of the run status enum, as the document lists them."""
    schemas = document["components"]["schemas"]
    summary = _resolve(document, schemas["WorkflowRunSummary"])
    status = _resolve(document, summary["properties"]["status"])
    return [str(value) for value in status["enum"]]


def _example_values(document: Mapping[str, Any]) -> list[Any]:
    examples = document.get("components", {}).get("examples", {})
    return [_resolve(document, example).get("value") for example in examples.values()]


def derived_run(model: dict[str, JSON], status: str) -> dict[str, JSON]:
    """`model` (a WorkflowRun) as it would read had it ended with `status` (or were running)."""
    run = copy.deepcopy(model)
    suffix = status.lower().replace("_", "-")
    run["run_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{model['run_id']}/{status}"))
    run["workflow_id"] = f"{model['workflow_id']}-{suffix}"
    started = int(model["started_at"])
    closed = model.get("closed_at")
    closed_at = int(closed) if isinstance(closed, int) else started + DEFAULT_RUN_SECONDS
    model_close = f"EVENT_TYPE_WORKFLOW_EXECUTION_{model['status']}"
    history = [event for event in model.get("history", []) if event.get("event_type") != model_close]
    run.update(status=status, result=None, error=None)
    if status in OPEN_STATUSES:
        run.update(closed_at=None, execution_duration=max(0, closed_at - started))
        run["history"] = history
        return run
    if status == UNKNOWN:
        # A status Temporal added after this API: closed (it has a close time), but no close event
        # this API could name.
        run.update(closed_at=closed_at, execution_duration=closed_at - started, pendingActivities=[])
        run["history"] = history
        return run
    close: dict[str, JSON] = {
        "event_id": max((int(e["event_id"]) for e in history), default=0) + 1,
        "event_time": closed_at,
        "event_type": f"EVENT_TYPE_WORKFLOW_EXECUTION_{status}",
        "task_id": str(max((int(e["event_id"]) for e in history), default=0) + 1),
        "attempt": 0,
    }
    if status == COMPLETED:
        run["result"] = model.get("result")
        close["result"] = [model.get("result")]
    elif status in FAILURE_STATUSES:
        run["error"] = close["error"] = f"Workflow run {status.lower()}"
    elif status == "TERMINATED":
        close["reason"] = "terminated by an operator"
    run.update(closed_at=closed_at, execution_duration=closed_at - started, pendingActivities=[])
    run["history"] = [*history, close]
    return run


def seed(document: Mapping[str, Any], *, project: str = MOCK_PROJECT) -> Seed:
    """The runs and updates mock mode starts with, from `document`'s examples (see the module)."""
    values = _example_values(document)
    examples: dict[str, dict[str, JSON]] = {}
    for value in values:
        if isinstance(value, dict) and value.keys() >= RUN_FIELDS:
            examples.setdefault(str(value["run_id"]), copy.deepcopy(value))
    runs = list(examples.values())
    if runs:
        model = next((run for run in runs if not run.get("interactive")), runs[0])
        shown = {str(run["status"]) for run in runs}
        runs += [derived_run(model, status) for status in statuses(document) if status not in shown]
    requests = [v for v in values if isinstance(v, dict) and isinstance(v.get("document_id"), str)]
    result = Seed()
    for details in runs:
        attributes: dict[str, JSON] = {}
        given = details.get("input")
        for request in requests:
            if isinstance(given, dict) and given.get("documentId") == request["document_id"]:
                attributes = {name: request[name] for name in ATTRIBUTE_FIELDS if name in request}
        closed = details.get("closed_at")
        result.runs.append(
            MemoryRun(
                details=details,
                project_id=project,
                attributes=attributes,
                closed_at=float(closed) if isinstance(closed, int) else None,
            )
        )
    known = {run.run_id for run in result.runs}
    for value in values:
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            for message in value["messages"]:
                run_id = message.get("workflow_run_id") if isinstance(message, dict) else None
                if run_id in known:
                    result.updates.setdefault(str(run_id), []).append(copy.deepcopy(message))
    return result
