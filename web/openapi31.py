"""Teaching Connexion 3.3 to serve an OpenAPI 3.1 document, the project's single source.

Connexion 3.3 refuses any `openapi: 3.1.x` document (its spec check pins 3.0) and validates with
JSON Schema Draft 4, whose meaning differs from 3.1's JSON Schema 2020-12 (`const` ignored, a numeric
`exclusiveMinimum` ignored, `2.0` not an integer, ...). This module:

1. skips Connexion's 3.0 spec check (CI validates the 3.1 document with openapi-spec-validator,
   Redocly and Spectral instead);
2. replaces every request validator (parameters and JSON bodies) and the JSON response validator
   with 2020-12 ones, compiled once per schema with jsonschema-rs;
3. reads integer and number parameters as JSON spells them: Connexion converts them with Python's
   `int()` / `float()`, which also take ` 12 `, `1_2`, Arabic-Indic digits and `nan`.

It patches a private classmethod: re-check it on every Connexion upgrade (tests/unit/test_openapi31.py
proves the 2020-12 semantics end to end).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema_rs
import orjson
from connexion import uri_parsing
from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem, NonConformingResponseBody, TypeValidationError
from connexion.spec import OpenAPISpecification
from connexion.utils import is_null
from connexion.validators import (
    FormDataValidator,
    JSONRequestBodyValidator,
    JSONResponseBodyValidator,
    MultiPartFormDataValidator,
    ParameterValidator,
)

# (schema, compiled validator) keyed by id(schema): the schema object is kept alive by the entry,
# so its id cannot be reused by another dict while cached. Connexion keeps one schema dict per
# operation, so the cache is bounded by the size of the document.
_COMPILED: dict[int, tuple[dict[str, Any], jsonschema_rs.Validator]] = {}


def compiled(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    entry = _COMPILED.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = (schema, jsonschema_rs.Draft202012Validator(schema, validate_formats=True))
        _COMPILED[id(schema)] = entry
    return entry[1]


def first_error(schema: dict[str, Any], instance: Any, where: str) -> str | None:
    """A one-line description of the first violation, e.g. `body.page_size: 0 is less than ...`."""
    for error in compiled(schema).iter_errors(instance):
        path = ".".join(str(p) for p in error.instance_path)
        return f"{where}{'.' + path if path else ''}: {error.message}"
    return None


# A run of digits orjson might not keep exact: it reads integers beyond 64 bits as floats.
_LONG_NUMBER = re.compile(rb"[0-9]{19,}")
# Deeper JSON is refused (400): the standard library, which Connexion and the storage fall back on,
# overflows Python's stack near 1000 levels, and no update needs more.
MAX_JSON_DEPTH = 128


def load_json(raw: bytes) -> Any:
    """A request body's JSON. orjson: strict RFC 8259 (no NaN/Infinity), and it rejects invalid
    UTF-8 itself where Connexion's own parser answers 500
    (https://github.com/spec-first/connexion/issues/1860). A body with a very long number is read
    again by the standard library, which keeps big integers exact (update details are stored as
    given). Raises ValueError (`orjson.JSONDecodeError` is one)."""
    value = orjson.loads(raw)
    # Cheap first: a body with fewer brackets than the limit cannot nest deeper than it.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if _LONG_NUMBER.search(raw):
        value = json.loads(raw, parse_constant=_no_constant)
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in children)
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _skip_spec_check(cls: type, spec: dict[str, Any]) -> None:
    return None


# A parameter's number as JSON writes one, in ASCII (leading zeros let through, as `int()` does).
_JSON_NUMBER = {
    "integer": re.compile(r"-?[0-9]+\Z"),
    "number": re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z"),
}
_connexion_coerce_type = uri_parsing.coerce_type


def _strict_coerce_type(param: dict[str, Any], value: Any, parameter_type: str, parameter_name: Any = None) -> Any:
    """Connexion's `coerce_type`, refusing a number not spelt as JSON spells it. Refused, the value
    stays a string, which the schema then rejects (400), as for any other non-number."""
    schema = param.get("schema", param)
    kind = schema.get("type")
    item_kind = schema.get("items", {}).get("type") if kind == "array" else None
    pattern = _JSON_NUMBER.get(item_kind if kind == "array" else kind)  # type: ignore[arg-type]
    if pattern is not None:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(one, str) and not pattern.match(one) for one in values):
            raise TypeValidationError(kind, parameter_type, parameter_name)
    return _connexion_coerce_type(param, value, parameter_type, parameter_name)


class Parameter202012Validator(ParameterValidator):  # type: ignore[misc]
    @staticmethod
    def validate_parameter(
        parameter_type: str, value: Any, param: dict[str, Any], param_name: str | None = None
    ) -> str | None:
        if value is None or (is_null(value) and "null" in _types(param.get("schema", {}))):
            if value is None and param.get("required"):
                return f"Missing {parameter_type} parameter '{param['name']}'"
            return None
        return first_error(param.get("schema", param), value, f"{parameter_type} parameter '{param['name']}'")


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type", [])
    return kind if isinstance(kind, list) else [kind]


# What `_parse` returns for an empty body, so that an absent body and a JSON `null` differ.
_ABSENT = object()


class JSONBody202012Validator(JSONRequestBodyValidator):  # type: ignore[misc]
    async def _parse(self, stream: AsyncIterator[bytes], scope: Any) -> Any:
        raw = b"".join([chunk async for chunk in stream])
        if not raw.strip():
            return _ABSENT
        try:
            return load_json(raw)
        except ValueError as exc:
            raise BadRequestProblem(detail=f"The request body is not JSON this API accepts: {exc}") from exc

    def _validate(self, body: Any) -> dict[str, Any] | None:
        if body is _ABSENT:
            # An absent body is fine when the document says the body is optional.
            if self._required:
                raise BadRequestProblem(detail="The request body is required.")
            return None
        error = first_error(self._schema, body, "body")
        if error:
            raise BadRequestProblem(detail=error)
        return None


class JSONResponse202012Validator(JSONResponseBodyValidator):  # type: ignore[misc]
    def _validate(self, body: Any) -> None:
        problem = nonconforming(self._schema, body)
        if problem is not None:
            raise problem


def nonconforming(schema: dict[str, Any], body: Any) -> NonConformingResponseBody | None:
    """The problem (a 500) of a response body that does not conform to its schema, if it does not."""
    error = first_error(schema, body, "response body")
    if error is None:
        return None
    return NonConformingResponseBody(detail=f"Response body does not conform to the document. {error}")


VALIDATOR_MAP: dict[str, Any] = {
    "parameter": Parameter202012Validator,
    "body": MediaTypeDict(
        {
            "*/*json": JSONBody202012Validator,
            "application/x-www-form-urlencoded": FormDataValidator,
            "multipart/form-data": MultiPartFormDataValidator,
        }
    ),
    "response": MediaTypeDict({"*/*json": JSONResponse202012Validator}),
}


def install() -> None:
    """Let Connexion load 3.1 documents. Idempotent."""
    OpenAPISpecification._validate_spec = classmethod(_skip_spec_check)
    uri_parsing.coerce_type = _strict_coerce_type
