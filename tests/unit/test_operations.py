"""The operation table: the document and the handlers name the same operations, and every handler
has the one signature both Connexion's endpoint and the fast lane call."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
from connexion.json_schema import resolve_refs

from handlers import HANDLERS
from web.app import published_document
from web.operations import MISSING, compile_operations


def document() -> dict[str, Any]:
    resolved: dict[str, Any] = resolve_refs(copy.deepcopy(published_document()))
    return resolved


def test_every_operation_of_the_document_has_a_handler_and_every_handler_an_operation() -> None:
    table = compile_operations(document(), HANDLERS)
    assert set(table) == set(HANDLERS)
    assert len(table) == 8


def test_an_operation_without_a_handler_stops_the_table() -> None:
    handlers = dict(HANDLERS)
    del handlers["getWorkflowRun"]
    with pytest.raises(ValueError, match="getWorkflowRun of the document has no handler"):
        compile_operations(document(), handlers)


def test_a_handler_without_an_operation_stops_the_table() -> None:
    with pytest.raises(ValueError, match="does not have: deleteEverything"):
        compile_operations(document(), {**HANDLERS, "deleteEverything": HANDLERS["getWorkflowRun"]})


@pytest.mark.parametrize("operation_id", sorted(HANDLERS))
def test_every_handler_takes_deps_and_principal_then_the_operation_inputs_by_name(operation_id: str) -> None:
    handler = HANDLERS[operation_id]
    parameters = list(inspect.signature(handler).parameters.values())
    assert [p.name for p in parameters[:2]] == ["deps", "principal"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters[:2])
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[2:])
    assert inspect.iscoroutinefunction(handler)
    # Every keyword is an input of the operation: a parameter (by its Python name) or the body.
    operation = compile_operations(document(), HANDLERS)[operation_id]
    inputs = {p.python_name for p in operation.parameters} | ({"body"} if operation.body else set())
    assert operation.accepts <= inputs, operation.accepts - inputs


def test_parameters_carry_the_document_s_types_defaults_and_required() -> None:
    table = compile_operations(document(), HANDLERS)
    stream = {p.name: p for p in table["streamWorkflowRunUpdates"].parameters}
    assert stream["Last-Event-ID"].location == "header"
    assert stream["Last-Event-ID"].python_name == "last_event_id"
    assert stream["skipHistory"].python_name == "skip_history"
    assert stream["skipHistory"].default is False
    assert stream["since"].default is MISSING
    assert stream["workflowId"].required and stream["workflowId"].location == "path"
    updates = {p.name: p for p in table["getWorkflowRunUpdates"].parameters}
    assert updates["since"].default == 0 and updates["since"].schema["type"] == "integer"
    post = table["postWorkflowRunUpdate"]
    assert post.method == "POST" and post.body is not None and post.body.required
    assert post.security == [{"bearerAuth": []}]
