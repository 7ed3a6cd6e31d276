"""The listing page size is bounded in two places that must agree: the code (`core.protocols`) and
the bundled document (`ListRunsRequest.page_size`), which validates requests and which clients are
generated from. A change to either alone fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.visibility_query import page_size_of
from core.errors import InvalidInput
from core.protocols import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE, RunFilters

BUNDLED = Path(__file__).resolve().parents[2] / "generated" / "openapi.yaml"


def documented_page_size() -> dict[str, Any]:
    document = yaml.safe_load(BUNDLED.read_text(encoding="utf-8"))
    schema: dict[str, Any] = document["components"]["schemas"]["ListRunsRequest"]["properties"]["page_size"]
    return schema


def test_the_document_states_the_same_bounds_and_default_as_the_code() -> None:
    schema = documented_page_size()
    assert schema["type"] == "integer"
    assert schema["minimum"] == MIN_PAGE_SIZE
    assert schema["maximum"] == MAX_PAGE_SIZE
    assert schema["default"] == DEFAULT_PAGE_SIZE
    # Exclusive bounds would shift the documented range by one without changing these numbers.
    assert "exclusiveMinimum" not in schema and "exclusiveMaximum" not in schema


def test_the_backend_applies_those_bounds_and_default() -> None:
    assert RunFilters().page_size == DEFAULT_PAGE_SIZE
    assert page_size_of(None) == DEFAULT_PAGE_SIZE
    assert page_size_of(MIN_PAGE_SIZE) == MIN_PAGE_SIZE
    assert page_size_of(MAX_PAGE_SIZE) == MAX_PAGE_SIZE


@pytest.mark.parametrize("size", [MIN_PAGE_SIZE - 1, MAX_PAGE_SIZE + 1])
def test_the_backend_refuses_sizes_just_outside_them(size: int) -> None:
    with pytest.raises(InvalidInput, match=f"from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"):
        page_size_of(size)
