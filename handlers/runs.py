"""Run operations: details, listing, cancel / terminate, signal.

Thin by design: check the permission, charge the caller's rate limit (every operation here reaches
Temporal: `server.rate_limit`), call the runs backend, shape the answer through the Pydantic model
generated from the document, so that what leaves the server is what the contract says. Domain
errors raised below become the JSON error body in `server.errors`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from backends.errors import InvalidInput
from backends.protocol import RunFilters, RunPage
from generated.models import ActionResult, SignalResult, WorkflowRun, WorkflowRunList
from server.context import Backends, backends, principal_of
from server.permissions import ACT_ON_RUN, LIST_RUNS, READ_RUN, require

FILTER_FIELDS = tuple(field.name for field in dataclasses.fields(RunFilters))
ACTION_VERBS = {"cancel": "cancelled", "terminate": "terminated"}


def respond(model: type[BaseModel], data: dict[str, Any]) -> Response:
    return Response(serialised(model, data), media_type="application/json")


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


def page_body(page: RunPage) -> dict[str, Any]:
    return {"runs": page.runs, "next_page_token": page.next_page_token, "has_more": page.has_more}


def page_response(page: RunPage) -> Response:
    """A WorkflowRunList answer, as the response."""
    return respond(WorkflowRunList, page_body(page))


async def get_workflow_run(workflow_id: str, run_id: str, token_info: dict[str, Any]) -> Response:
    return Response(await run_details(backends(), token_info, workflow_id, run_id), media_type="application/json")


async def run_details(context: Backends, token_info: dict[str, Any], workflow_id: str, run_id: str) -> bytes:
    """The body of getWorkflowRun (shared with `server.fast_lane`)."""
    principal = require(principal_of(token_info), READ_RUN)
    context.rates.charge_temporal(principal)
    return serialised(WorkflowRun, await context.runs.get_run(principal, workflow_id, run_id))


async def list_workflow_runs(token_info: dict[str, Any], body: dict[str, Any] | None = None) -> Response:
    principal = require(principal_of(token_info), LIST_RUNS)
    filters = filters_of(body)
    context = backends()
    context.rates.charge_temporal(principal)
    return page_response(await context.runs.list_runs(principal, filters))


async def apply_workflow_run_action(
    workflow_id: str, run_id: str, action: str, token_info: dict[str, Any], body: dict[str, Any] | None = None
) -> Response:
    principal = require(principal_of(token_info), ACT_ON_RUN)
    reason = body.get("reason") if isinstance(body, dict) else None
    if reason is not None and not isinstance(reason, str):
        raise InvalidInput("reason must be a string.")
    if action not in ACTION_VERBS:
        raise InvalidInput("action must be cancel or terminate.", details=f"got {action!r}")
    context = backends()
    context.rates.charge_temporal(principal)
    if action == "cancel":
        await context.runs.apply_action(principal, workflow_id, run_id, "cancel", reason)
    else:
        await context.runs.apply_action(principal, workflow_id, run_id, "terminate", reason)
    return respond(ActionResult, {"message": f"Workflow {run_id} {ACTION_VERBS[action]}"})


async def signal_workflow_run(
    workflow_id: str, run_id: str, signal_name: str, body: dict[str, Any], token_info: dict[str, Any]
) -> Response:
    principal = require(principal_of(token_info), ACT_ON_RUN)
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        raise InvalidInput("The signal body must be a JSON object with a string `message`.")
    context = backends()
    context.rates.charge_temporal(principal)
    await context.runs.signal(principal, workflow_id, run_id, signal_name, body)
    return respond(SignalResult, {"status": "success", "message": f"Workflow {run_id} signalled with {signal_name}"})
