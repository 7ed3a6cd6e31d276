"""Run operations: details, listing, cancel / terminate, signal.

Thin by design: check the permission, charge the caller's rate limit (every operation here reaches
Temporal: `handlers.rate_limits`), call the runs backend, shape the answer through the Pydantic
model generated from the document, so that what leaves the server is what the contract says.
Domain errors raised below become the JSON error body in the HTTP layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast, get_args

from pydantic import BaseModel

from core.errors import InvalidInput
from core.principals import ACT_ON_RUN, LIST_RUNS, READ_RUN, Principal, require
from core.protocols import Action, RunFilters, RunPage
from generated.models import ActionResult, SignalResult, WorkflowRun, WorkflowRunList
from handlers.deps import Deps

FILTER_FIELDS = tuple(field.name for field in dataclasses.fields(RunFilters))
ACTION_DONE: dict[str, str] = {"cancel": "cancelled", "terminate": "terminated"}  # by `Action`


def serialised(model: type[BaseModel], data: dict[str, Any]) -> bytes:
    """`data` validated by the model generated from the document and serialised once by it (in
    Rust), rather than dumped to a dict the framework re-encodes with the standard library."""
    return model.model_validate(data).model_dump_json(by_alias=True, exclude_unset=True).encode()


def filters_of(body: dict[str, Any] | None) -> RunFilters:
    """The list inputs of a request body (the document has already validated their types)."""
    if body is None:
        return RunFilters()
    if not isinstance(body, dict):
        raise InvalidInput("The request body must be a JSON object.")
    return RunFilters(**{name: body[name] for name in FILTER_FIELDS if body.get(name) is not None})


def page_answer(page: RunPage) -> bytes:
    """A WorkflowRunList answer."""
    return serialised(
        WorkflowRunList, {"runs": page.runs, "next_page_token": page.next_page_token, "has_more": page.has_more}
    )


async def get_workflow_run(deps: Deps, principal: Principal, *, workflow_id: str, run_id: str) -> bytes:
    require(principal, READ_RUN)
    deps.rates.charge_temporal(principal)
    return serialised(WorkflowRun, await deps.runs.get_run(principal, workflow_id, run_id))


async def list_workflow_runs(deps: Deps, principal: Principal, *, body: dict[str, Any] | None = None) -> bytes:
    require(principal, LIST_RUNS)
    filters = filters_of(body)
    deps.rates.charge_temporal(principal)
    return page_answer(await deps.runs.list_runs(principal, filters))


async def apply_workflow_run_action(
    deps: Deps, principal: Principal, *, workflow_id: str, run_id: str, action: str, body: dict[str, Any] | None = None
) -> bytes:
    require(principal, ACT_ON_RUN)
    reason = body.get("reason") if isinstance(body, dict) else None
    if reason is not None and not isinstance(reason, str):
        raise InvalidInput("reason must be a string.")
    if action not in get_args(Action):
        raise InvalidInput("action must be cancel or terminate.", details=f"got {action!r}")
    deps.rates.charge_temporal(principal)
    await deps.runs.apply_action(principal, workflow_id, run_id, cast(Action, action), reason)
    return serialised(ActionResult, {"message": f"Workflow {run_id} {ACTION_DONE[action]}"})


async def signal_workflow_run(
    deps: Deps, principal: Principal, *, workflow_id: str, run_id: str, signal_name: str, body: dict[str, Any]
) -> bytes:
    require(principal, ACT_ON_RUN)
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        raise InvalidInput("The signal body must be a JSON object with a string `message`.")
    deps.rates.charge_temporal(principal)
    await deps.runs.signal(principal, workflow_id, run_id, signal_name, body)
    return serialised(SignalResult, {"status": "success", "message": f"Workflow {run_id} signalled with {signal_name}"})
