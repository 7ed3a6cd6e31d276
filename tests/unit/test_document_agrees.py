"""Small points where the document states what the server does, held together."""

from __future__ import annotations

import re

import pytest

from backends import visibility_query
from backends.redis_updates import parse_event_id
from core.errors import InvalidInput
from core.protocols import RunFilters
from web.app import resolved_document

STREAM = "/workflows/runs/{workflowId}/{runId}/stream"
LARGEST = "18446744073709551615"  # a Redis stream id part is an unsigned 64-bit integer


def stream_parameter(name: str) -> dict[str, object]:
    operation = resolved_document()["paths"][STREAM]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == name]
    schema: dict[str, object] = parameter["schema"]
    return schema


def test_every_event_id_the_server_sends_is_a_last_event_id_it_accepts() -> None:
    event_id = resolved_document()["components"]["schemas"]["RunUpdateMessageEvent"]["properties"]["id"]
    last_event_id = stream_parameter("Last-Event-ID")
    for value in (f"{LARGEST}-{LARGEST}", "1678886400000-0", "1678886400000"):
        assert re.search(str(last_event_id["pattern"]), value)
        assert len(value) <= int(str(last_event_id["maxLength"]))
        assert parse_event_id(value)
    assert re.search(event_id["pattern"], f"{LARGEST}-{LARGEST}")


def test_a_part_beyond_64_bits_is_refused_by_the_server_though_its_digits_fit() -> None:
    with pytest.raises(InvalidInput):
        parse_event_id("18446744073709551616-0")


def list_filter(name: str) -> dict[str, str]:
    schema: dict[str, str] = resolved_document()["components"]["schemas"]["ListRunsRequest"]["properties"][name]
    return schema


def test_every_comparison_the_query_grammar_takes_is_documented() -> None:
    described = list_filter("query")["description"]
    for operator in sorted(visibility_query._COMPARISONS):
        assert f"`{operator}`" in described, operator
    for words in ("`[NOT] IN`", "`BETWEEN`", "`[NOT] STARTS_WITH`", "`IS [NOT] NULL`", "`NOT`", "`AND`", "`OR`"):
        assert words in described, words
    assert "VertesiaWorkflowType" in visibility_query.build_query(
        RunFilters(type="T"), project_id="p", principal_ref="user:u"
    )
    assert "`vertesia_workflow_type`" in list_filter("type")["description"]


def test_since_is_documented_as_the_whole_milliseconds_the_server_reads() -> None:
    for name, path in (("since", "/workflows/runs/{workflowId}/{runId}/updates"), ("since", STREAM)):
        operation = resolved_document()["paths"][path]["get"]
        (parameter,) = [p for p in operation["parameters"] if p["name"] == name]
        assert parameter["schema"]["type"] == "integer"
        assert "`1.5` is a 400" in parameter["description"]


def test_the_listing_documents_private_runs_and_superadmin() -> None:
    described = resolved_document()["paths"]["/workflows/runs"]["post"]["description"]
    assert "private runs" in described and "`workflow:superadmin`" in described
    scope = visibility_query.build_query(RunFilters(), project_id="p", principal_ref="user:u")
    assert "Visibility != 'private'" in scope  # private runs of others are left out ...
    everything = visibility_query.build_query(RunFilters(), project_id="p", principal_ref="user:u", superadmin=True)
    assert "private" not in everything  # ... except for a superadmin


@pytest.mark.parametrize("path", ["/workflows/runs", "/workflows/conversations"])
def test_a_start_after_its_end_is_a_documented_400(path: str) -> None:
    assert "a `start` later than `end`" in resolved_document()["paths"][path]["post"]["description"]
    with pytest.raises(InvalidInput):
        visibility_query.build_query(
            RunFilters(start="2024-05-02", end="2024-05-01"), project_id="p", principal_ref="user:u"
        )
