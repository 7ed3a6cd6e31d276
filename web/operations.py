"""The operation table: every operation of the bundled document, compiled once, with its handler.

Connexion's registration (`web.endpoints`) and the fast lane (`web.fast_lane`) both read this one
table: the endpoint Connexion calls for each operation, and everything the lane knows of its
operations (path, parameters with their types, defaults and `required`, body, security, answer),
come from the document, here. Connexion also reads the document itself, for its routing and
validation; the lane refuses at start-up any construct it could read differently.

Building the table checks that the document and `handlers.HANDLERS` name the same operations, and
reads each handler's keywords: a handler receives, by its Python name, every parameter and the body
it declares, and nothing else (see `handlers`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
from connexion.decorators.parameter import pythonic

from handlers import Handler
from web import openapi31

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
MISSING: Any = object()  # a parameter with no default in the document


@dataclass(frozen=True)
class Parameter:
    name: str  # as the document (and the wire) spells it
    location: str  # path, query, header or cookie
    python_name: str  # the handler's keyword: Connexion's Python form of `name`
    required: bool
    schema: dict[str, Any]
    default: Any  # the schema's default, else MISSING
    validator: jsonschema_rs.Validator
    spec: dict[str, Any]  # the whole Parameter Object, as the document writes it


@dataclass(frozen=True)
class Body:
    required: bool
    content: dict[str, Any]  # media type -> Media Type Object
    spec: dict[str, Any]


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str  # upper case
    path: str  # the template, e.g. /workflows/runs/{workflowId}/{runId}
    parameters: tuple[Parameter, ...]
    body: Body | None
    security: list[dict[str, list[str]]]  # the operation's, else the document's
    security_schemes: dict[str, Any]  # the document's, by name
    responses: dict[str, Any]
    handler: Handler
    accepts: frozenset[str]  # the handler's keywords (beyond deps and principal)
    spec: dict[str, Any]  # the whole Operation Object

    def parameters_in(self, location: str) -> tuple[Parameter, ...]:
        return tuple(parameter for parameter in self.parameters if parameter.location == location)


def compile_operations(document: dict[str, Any], handlers: Mapping[str, Handler]) -> dict[str, Operation]:
    """The table of `document` (with its references resolved), by operationId. Raises `ValueError`
    when an operation has no handler or a handler no operation."""
    table: dict[str, Operation] = {}
    for template, item in document["paths"].items():
        shared = item.get("parameters", [])
        for method in HTTP_METHODS:
            spec = item.get(method)
            if spec is None:
                continue
            operation_id = spec["operationId"]
            handler = handlers.get(operation_id)
            if handler is None:
                raise ValueError(f"operation {operation_id} of the document has no handler in handlers.HANDLERS")
            table[operation_id] = Operation(
                operation_id=operation_id,
                method=method.upper(),
                path=template,
                parameters=tuple(_parameter(spec) for spec in _merged(shared, spec.get("parameters", []))),
                body=_body(spec.get("requestBody")),
                security=spec.get("security", document.get("security", [])),
                security_schemes=document.get("components", {}).get("securitySchemes", {}),
                responses=spec.get("responses", {}),
                handler=handler,
                accepts=_keywords(handler),
                spec=spec,
            )
    unused = sorted(set(handlers) - set(table))
    if unused:
        raise ValueError(f"handlers.HANDLERS names operations the document does not have: {', '.join(unused)}")
    return table


def path_pattern(base_path: str, template: str) -> re.Pattern[str]:
    """The operation's path as a regex with a named group per path parameter. A parameter stops at
    `/` and at a newline: Connexion mounts the API under its base path with `.*`, which never
    crosses a newline (such paths are Connexion's to refuse)."""
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/\\n]+)", re.escape(base_path + template))
    return re.compile(rf"^{regex}\Z")


def _merged(shared: list[dict[str, Any]], own: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Path-level parameters overridden by the operation's own (same name and location), as OpenAPI says."""
    merged = {(p["name"], p["in"]): p for p in shared}
    merged.update({(p["name"], p["in"]): p for p in own})
    return list(merged.values())


def _parameter(spec: dict[str, Any]) -> Parameter:
    schema = spec.get("schema", {})
    return Parameter(
        name=spec["name"],
        location=spec["in"],
        python_name=pythonic(spec["name"]),
        required=bool(spec.get("required", False)),
        schema=schema,
        default=schema.get("default", MISSING),
        validator=openapi31.compiled(schema),
        spec=spec,
    )


def _body(spec: dict[str, Any] | None) -> Body | None:
    if spec is None:
        return None
    return Body(required=bool(spec.get("required", False)), content=spec.get("content", {}), spec=spec)


def _keywords(handler: Handler) -> frozenset[str]:
    """The handler's keyword-only parameters: the operation's inputs it wants."""
    return frozenset(
        name for name, param in inspect.signature(handler).parameters.items() if param.kind is param.KEYWORD_ONLY
    )
