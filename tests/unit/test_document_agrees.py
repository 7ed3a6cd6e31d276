"""Small points where the document states what the server does, held together."""

from __future__ import annotations

import re

import pytest

from backends import visibility_query
from backends.redis_updates import parse_event_id
from core.errors import InvalidInput
from core.protocols import RunFilters
from tests.support.fakes import FakeRuns, FakeUpdates, app_settings, bearer, fake_backends_factory
from web.app import create_app, resolved_document

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


def test_a_part_beyond_64_bits_fits_the_pattern_and_is_read_as_the_largest_cursor_it_means() -> None:
    pattern = str(stream_parameter("Last-Event-ID")["pattern"])
    for value in ("18446744073709551616-0", "1-94867321557044046119", "99999999999999999999"):
        assert re.search(pattern, value)
    assert parse_event_id("1-94867321557044046119") == (1, int(LARGEST))
    assert parse_event_id("18446744073709551616-0") == (int(LARGEST), int(LARGEST))
    assert parse_event_id("99999999999999999999") == (int(LARGEST), int(LARGEST))


def test_a_value_outside_the_pattern_is_refused() -> None:
    for value in ("1-", "-1", "1-2-3", "abc", "\u0661-0", "123456789012345678901-0"):
        with pytest.raises(InvalidInput):
            parse_event_id(value)


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


@pytest.mark.parametrize("name", ["start", "end"])
def test_start_and_end_are_one_string_whose_pattern_is_the_parser_s(name: str) -> None:
    schema = list_filter(name)
    assert schema["type"] == "string" and "anyOf" not in schema and "format" not in schema
    assert schema["pattern"] == visibility_query.TIME_PATTERN
    assert len("2023-03-15T13:20:00.123456789+02:00") == int(schema["maxLength"])
    assert "read as UTC" in schema["description"]


ACCEPTED_TIMES = [
    "2024-05-01",
    "2024-05-01T08:00:00Z",
    "2024-05-01T08:00:00+02:00",
    "2024-05-01T08:00:00",  # no offset: UTC
    "2024-05-01t08:00:00.123456789z",
]
REFUSED_TIMES = ["2024-05-01T08:00", "2024-05-01 08:00:00", "20240501", "2024-05-01T08:00:00+0200", "tomorrow"]


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "connexion"])
def test_the_server_takes_exactly_the_documented_times(fast_lane: bool) -> None:
    """The document's validation (HTTP) and the parser (backend) accept the same values."""
    secret = "document-agrees-unit-test-secret-" + "x" * 40
    app = create_app(app_settings(secret, fast_lane=fast_lane), fake_backends_factory(FakeRuns(), FakeUpdates()))
    with app.test_client() as client:
        for value in ACCEPTED_TIMES:
            visibility_query.parse_time("start", value)
            answer = client.post("/api/v1/workflows/runs", json={"start": value, "end": value}, headers=bearer(secret))
            assert answer.status_code == 200, (value, answer.text)
        for value in REFUSED_TIMES:
            with pytest.raises(InvalidInput):
                visibility_query.parse_time("start", value)
            answer = client.post("/api/v1/workflows/runs", json={"start": value}, headers=bearer(secret))
            assert answer.status_code == 400, value
            assert "start" in answer.json()["message"]


def test_every_status_filter_the_server_reads_is_documented_and_no_other() -> None:
    schema = list_filter("status")
    for value in visibility_query.STATUS_VALUES:
        assert re.fullmatch(schema["pattern"].strip("^$"), value), value
        assert f"`{value}`" in schema["description"], value
    assert schema["pattern"].count("|") + 1 == len(visibility_query.STATUS_VALUES)


def test_initiated_by_unknown_is_documented_as_matching_the_runs_listed_so() -> None:
    described = list_filter("initiated_by")["description"]
    assert "`unknown` matches the runs listed with `initiated_by: unknown`" in described
    built = visibility_query.build_query(RunFilters(initiated_by="unknown"), project_id="p", principal_ref="user:u")
    assert built.endswith("(InitiatedBy IS NULL OR InitiatedBy = '' OR InitiatedBy = 'unknown')")
