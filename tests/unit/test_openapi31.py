"""The 3.1 bridge: requests are validated with JSON Schema 2020-12, exactly as a 3.1 document means.

Each case is a construct whose meaning differs between Draft 4 (Connexion's own validators) and
2020-12; the server's verdict must equal the 2020-12 reference validator's.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from connexion import AsyncApp
from connexion.resolver import Resolver

from web import openapi31

BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "priority"],
    "properties": {
        "kind": {"const": "run"},
        "priority": {"type": "integer", "exclusiveMinimum": 0},
        "note": {"type": ["string", "null"]},
        "when": {"type": "string", "format": "date-time"},
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "bridge test", "version": "1"},
    "paths": {
        "/items": {
            "post": {
                "operationId": "create",
                "requestBody": {"required": True, "content": {"application/json": {"schema": BODY_SCHEMA}}},
                "responses": {"200": {"description": "ok"}},
            },
            "get": {
                "operationId": "list",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10},
                    }
                ],
                "responses": {"200": {"description": "ok"}},
            },
        }
    },
}


async def _ok(**kwargs: Any) -> dict[str, Any]:
    return {"ok": True}


@pytest.fixture(scope="module")
def client() -> Any:
    openapi31.install()
    app = AsyncApp(__name__)
    app.add_api(
        DOCUMENT,
        resolver=Resolver(function_resolver=lambda _: _ok),
        strict_validation=True,
        validator_map=openapi31.VALIDATOR_MAP,
    )
    return app.test_client()


BODIES = [
    {"kind": "run", "priority": 2},
    {"kind": "run", "priority": 2.0},  # an integer in 2020-12, not in Draft 4
    {"kind": "nope", "priority": 2},  # `const`: ignored by Draft 4
    {"kind": {}, "priority": 2},
    {"kind": "run", "priority": 0},  # numeric exclusiveMinimum: ignored by Draft 4 without minimum
    {"kind": "run", "priority": 1, "note": None},  # type array with null
    {"kind": "run", "priority": 1, "note": 5},
    {"kind": "run", "priority": 1, "when": "2026-11-28T10:00:00Z"},
    {"kind": "run", "priority": 1, "when": "yesterday"},
    {"kind": "run", "priority": 1, "extra": True},
    {"priority": 1},
]


@pytest.mark.parametrize("body", BODIES, ids=[str(b) for b in BODIES])
def test_body_verdict_equals_2020_12(client: Any, body: dict[str, Any]) -> None:
    reference = jsonschema.Draft202012Validator(
        BODY_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    response = client.post("/items", json=body)
    assert response.status_code == (200 if reference.is_valid(body) else 400), response.text


@pytest.mark.parametrize(("limit", "status"), [("1", 200), ("10", 200), ("0", 400), ("11", 400), ("x", 400)])
def test_query_parameters_use_2020_12(client: Any, limit: str, status: int) -> None:
    assert client.get("/items", params={"limit": limit}).status_code == status


def test_400_names_what_was_wrong(client: Any) -> None:
    response = client.post("/items", json={"kind": "run", "priority": 0})
    assert response.status_code == 400
    assert "body.priority" in response.text


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b"{not json", b'{"kind": "run", "priority": NaN}'])
def test_undecodable_bodies_are_400_not_500(client: Any, raw: bytes) -> None:
    response = client.post("/items", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400


def test_unknown_query_parameter_is_refused(client: Any) -> None:
    assert client.get("/items", params={"limit": "1", "other": "x"}).status_code == 400


def test_big_integers_are_read_exactly_and_constants_still_refused() -> None:
    assert openapi31.load_json(b'{"n": 1180591620717411303425}') == {"n": 2**70 + 1}
    assert openapi31.load_json(b'{"id": "12345678901234567890123", "x": 1.5}') == {
        "id": "12345678901234567890123",
        "x": 1.5,
    }
    with pytest.raises(ValueError):
        openapi31.load_json(b'{"n": 1180591620717411303425, "m": NaN}')
    assert openapi31.load_json(b'{"n": -9223372036854775809}') == {"n": -(2**63) - 1}  # 19 digits


@pytest.mark.parametrize("depth", [129, 1000, 1023])
def test_json_nested_deeper_than_the_limit_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match="nested more than 128 levels deep"):
        openapi31.load_json(b"[" * depth + b"12345678901234567890123" + b"]" * depth)
    assert openapi31.load_json(b"[" * 128 + b"]" * 128) is not None  # at the limit
    assert openapi31.load_json(b'{"s": "' + b"[" * 500 + b'"}') == {"s": "[" * 500}  # brackets in a string
