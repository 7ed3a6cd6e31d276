"""The list inputs -> visibility query translation: escaping, validation, confinement."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from backends.visibility_query import (
    MAX_QUERY_LENGTH,
    MAX_VALUE_LENGTH,
    TIME_PATTERN,
    build_query,
    confine_custom_query,
    page_size_of,
    parse_time,
    quote,
    rfc3339,
    status_value,
    tokenize,
    value_problem,
)
from core.errors import Forbidden, InvalidInput
from core.protocols import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, RunFilters

SCOPE = "ProjectId = 'p1' AND (Visibility IS NULL OR Visibility != 'private' OR InitiatedBy = 'user:u1')"


def query(**filters: object) -> str:
    return build_query(RunFilters(**filters), project_id="p1", principal_ref="user:u1")  # type: ignore[arg-type]


# -- quoting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", "'plain'"),
        ("a'b", r"'a\'b'"),
        ("c\\d", r"'c\\d'"),
        ('e"f', "'e\"f'"),
        ("x' OR ProjectId = 'other", r"'x\' OR ProjectId = \'other'"),
        ("line\nbreak\ttab\x00nul", r"'line\nbreak\ttab\0nul'"),
        ("ünïcødé ✓", "'ünïcødé ✓'"),
    ],
)
def test_quote_escapes_what_could_end_the_literal(value: str, literal: str) -> None:
    assert quote(value) == literal


@given(st.text(max_size=200))
def test_any_value_stays_one_string_literal(value: str) -> None:
    tokens = list(tokenize(quote(value)))
    assert [(t.kind, t.text) for t in tokens] == [("STRING", value)]


@given(st.text(max_size=100))
def test_an_injected_filter_value_cannot_change_the_query_structure(value: str) -> None:
    """Whatever the document id, the query is the scope, then `DocumentId = <one literal>`."""
    assume(value_problem(value) is None)  # the others are refused: see below
    tokens = list(tokenize(query(document_id=value))) if value.strip() else []
    if not tokens:
        return
    kinds = [(t.kind, t.text) for t in tokens]
    assert kinds[-3:] == [("IDENT", "DocumentId"), ("OP", "="), ("STRING", value)]
    assert kinds[:3] == [("IDENT", "ProjectId"), ("OP", "="), ("STRING", "p1")]


# -- plain filters ----------------------------------------------------------------------------


def test_no_filters_is_just_the_scope() -> None:
    assert query() == SCOPE


def test_superadmin_skips_the_private_rule_but_not_the_project() -> None:
    assert build_query(RunFilters(), project_id="p1", principal_ref="user:u1", superadmin=True) == "ProjectId = 'p1'"


def test_conversations_scope() -> None:
    built = build_query(RunFilters(), project_id="p'1", principal_ref="user:o'brien", conversations_only=True)
    assert built == (
        r"ProjectId = 'p\'1' AND IsConversation = true"
        r" AND (Visibility IS NULL OR Visibility != 'private' OR InitiatedBy = 'user:o\'brien')"
    )


@pytest.mark.parametrize(
    ("filters", "clause"),
    [
        ({"document_id": "d1"}, "DocumentId = 'd1'"),
        ({"event_name": "create"}, "EventName = 'create'"),
        ({"rule_id": "r1"}, "RuleId = 'r1'"),
        ({"initiated_by": "user:123"}, "InitiatedBy = 'user:123'"),
        # Listings show a run without the attribute as `unknown`: the filter finds those runs too.
        ({"initiated_by": "unknown"}, "(InitiatedBy IS NULL OR InitiatedBy = '' OR InitiatedBy = 'unknown')"),
        ({"status": "PAUSED"}, "ExecutionStatus = 'Paused'"),
        (
            {"type": "StandardContentIngestion"},
            "(WorkflowType = 'StandardContentIngestion' OR VertesiaWorkflowType = 'StandardContentIngestion')",
        ),
        ({"status": "Cancelled"}, "ExecutionStatus = 'Canceled'"),
        ({"start": "2024-05-01"}, "StartTime >= '2024-05-01T00:00:00.000000Z'"),
        ({"end": "2024-05-01"}, "StartTime <= '2024-05-01T23:59:59.999999Z'"),
        ({"start": "2024-05-01T12:30:00+02:00"}, "StartTime >= '2024-05-01T10:30:00.000000Z'"),
        ({"end": "2024-05-01T12:30:00Z"}, "StartTime <= '2024-05-01T12:30:00.000000Z'"),
        ({"query": "HistoryLength > 3"}, "(HistoryLength > 3)"),
    ],
)
def test_each_filter_adds_its_clause(filters: dict[str, str], clause: str) -> None:
    assert query(**filters) == f"{SCOPE} AND {clause}"


def test_search_term_matches_type_rule_name_workflow_id_or_run_id() -> None:
    built = query(search_term=" Ingest ")
    assert built.endswith(
        "(WorkflowType = 'Ingest' OR VertesiaWorkflowType = 'Ingest' OR WorkflowId = 'Ingest' OR RunId = 'Ingest'"
        " OR WorkflowId STARTS_WITH 'Ingest' OR WorkflowType STARTS_WITH 'Ingest'"
        " OR VertesiaWorkflowType STARTS_WITH 'Ingest')"
    )


def test_blank_values_are_ignored() -> None:
    assert query(document_id="", status="  ", query=" ") == SCOPE


@pytest.mark.parametrize(
    ("status", "value"),
    [
        ("running", "Running"),
        ("COMPLETED", "Completed"),
        ("Failed", "Failed"),
        ("canceled", "Canceled"),
        ("cancelled", "Canceled"),
        ("terminated", "Terminated"),
        ("continued_as_new", "ContinuedAsNew"),
        ("ContinuedAsNew", "ContinuedAsNew"),
        ("timed_out", "TimedOut"),
        ("TIMEDOUT", "TimedOut"),
        ("paused", "Paused"),
    ],
)
def test_status_is_case_insensitive(status: str, value: str) -> None:
    assert status_value(status) == value


@pytest.mark.parametrize("status", ["done", "Running'", "", "completed OR 1=1"])
def test_unknown_status_is_refused(status: str) -> None:
    with pytest.raises(InvalidInput):
        status_value(status)


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-13-01",
        "2024-02-30",
        "01/05/2024",
        "2024-05-01T25:00:00Z",
        "1714521600",
        # Outside the documented shape, though Python's ISO parser would take them:
        "2024-05-01T12:00",
        "2024-05-01 12:00:00",
        "20240501",
        " 2024-05-01",
        "2024-05-01T12:00:00+0200",
        "2024-05-01T12:00:00.1234567890Z",
        # Of the shape but no real instant:
        "2024-05-01T23:59:60Z",
        "2024-05-01T12:00:00+24:00",
        "2024-05-01T12:00:00+05:60",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:00:00-01:00",
    ],
)
def test_bad_dates_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput):
        query(start=value)
    with pytest.raises(InvalidInput):
        query(end=value)


def test_start_after_end_is_refused() -> None:
    with pytest.raises(InvalidInput):
        query(start="2024-05-02", end="2024-05-01")


def test_same_day_start_and_end_cover_the_whole_day() -> None:
    start, end = parse_time("start", "2024-05-01"), parse_time("end", "2024-05-01", end_of_day=True)
    assert rfc3339(start) == "2024-05-01T00:00:00.000000Z"
    assert rfc3339(end) == "2024-05-01T23:59:59.999999Z"


def test_naive_date_time_is_utc() -> None:
    assert rfc3339(parse_time("start", "2024-05-01T08:00:00")) == "2024-05-01T08:00:00.000000Z"


@pytest.mark.parametrize(
    ("value", "instant"),
    [
        ("2024-05-01t08:00:00z", "2024-05-01T08:00:00.000000Z"),
        ("2024-05-01T08:00:00.5", "2024-05-01T08:00:00.500000Z"),
        ("2024-05-01T08:00:00.123456789-01:30", "2024-05-01T09:30:00.123456Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z"),
    ],
)
def test_every_documented_form_is_read(value: str, instant: str) -> None:
    assert rfc3339(parse_time("start", value)) == instant


@given(st.from_regex(TIME_PATTERN))
def test_a_value_of_the_documented_shape_is_read_or_refused_as_invalid_input(value: str) -> None:
    """The pattern cannot rule out `2024-02-30`: such a value is a 400, never another failure."""
    try:
        moment = parse_time("start", value)
    except InvalidInput:
        return
    assert moment.tzinfo is not None


@given(st.text(alphabet="0123456789-:T+Z.tz ", max_size=40))
def test_the_parser_reads_nothing_the_documented_pattern_refuses(value: str) -> None:
    if re.fullmatch(TIME_PATTERN.removeprefix("^").removesuffix("$"), value) is None:
        with pytest.raises(InvalidInput):
            parse_time("start", value)


@pytest.mark.parametrize("size", [0, -1, MAX_PAGE_SIZE + 1, True, "10"])
def test_bad_page_sizes_are_refused(size: object) -> None:
    with pytest.raises(InvalidInput):
        page_size_of(size)


def test_page_size_default_and_bounds() -> None:
    assert page_size_of(None) == DEFAULT_PAGE_SIZE
    assert page_size_of(1) == 1
    assert page_size_of(MAX_PAGE_SIZE) == MAX_PAGE_SIZE


def test_overlong_values_are_refused() -> None:
    assert query(document_id="x" * MAX_VALUE_LENGTH).endswith(f"DocumentId = '{'x' * MAX_VALUE_LENGTH}'")
    with pytest.raises(InvalidInput, match="longer than 256"):
        query(document_id="x" * (MAX_VALUE_LENGTH + 1))


# -- the custom query -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("custom", "rewritten"),
    [
        ("WorkflowType = 'A'", "WorkflowType = 'A'"),
        ("WorkflowType = 'A' OR WorkflowType = 'B'", "(WorkflowType = 'A' OR WorkflowType = 'B')"),
        ("a = 1 AND b != 'x' OR c >= 2.5", "((a = 1 AND b != 'x') OR c >= 2.5)"),
        ("(a = 1 OR b = 2) AND c = 3", "(((a = 1 OR b = 2)) AND c = 3)"),
        ('DocumentId = "dq"', "DocumentId = 'dq'"),
        (r"DocumentId = 'it\'s'", r"DocumentId = 'it\'s'"),
        ("DocumentId = 'it''s'", r"DocumentId = 'it\'s'"),
        ("DocumentId in ('a', 'b')", "DocumentId IN ('a', 'b')"),
        ("DocumentId NOT IN ('a')", "DocumentId NOT IN ('a')"),
        ("StartTime BETWEEN '2024-01-01T00:00:00Z' AND '2024-02-01T00:00:00Z'",
         "StartTime BETWEEN '2024-01-01T00:00:00Z' AND '2024-02-01T00:00:00Z'"),
        ("WorkflowId starts_with 'ingest-'", "WorkflowId STARTS_WITH 'ingest-'"),
        ("WorkflowId NOT STARTS_WITH 'ingest-'", "WorkflowId NOT STARTS_WITH 'ingest-'"),
        ("RuleId IS NULL", "RuleId IS NULL"),
        ("RuleId is not null", "RuleId IS NOT NULL"),
        ("NOT WorkflowType = 'A'", "NOT (WorkflowType = 'A')"),
        ("HistoryLength > -1", "HistoryLength > -1"),
        ("TemporalSchedulePaused = TRUE", "TemporalSchedulePaused = true"),
    ],
)  # fmt: skip
def test_custom_queries_are_rewritten_from_their_parse(custom: str, rewritten: str) -> None:
    assert confine_custom_query(custom) == rewritten


def test_a_custom_top_level_or_stays_inside_the_scope() -> None:
    built = query(query="WorkflowType = 'A' OR WorkflowType = 'B'")
    assert built == f"{SCOPE} AND ((WorkflowType = 'A' OR WorkflowType = 'B'))"


@pytest.mark.parametrize(
    "custom",
    [
        "(WorkflowType = 'A'",  # unbalanced parentheses
        "WorkflowType = 'A')",
        "WorkflowType = 'A') OR (ProjectId = 'other'",
        "WorkflowType = 'A",  # unbalanced quote
        "WorkflowType = 'A\\'",
        'WorkflowType = "A',
        "ProjectId = 'other'",  # scoping attributes
        "projectid = 'other'",
        "WorkflowType = 'A' OR ProjectId != 'p1'",
        "AccountId = 'a'",
        "TenantId = 't'",
        "Visibility = 'private'",
        "InitiatedBy = 'user:1'",
        "IsConversation = false",
        "WorkflowType = 'A' ORDER BY StartTime",  # not conditions
        "WorkflowType = 'A' LIMIT 5",
        "WorkflowType = 'A'; DROP TABLE executions",
        "WorkflowType = 'A' -- comment",
        "WorkflowType = 'A' /* comment */",
        "WorkflowType = 'A' # comment",
        "`ProjectId` = 'other'",
        "WorkflowType = 'A' AND",  # incomplete
        "WorkflowType",
        "= 'A'",
        "WorkflowType = OtherAttribute",
        "WorkflowType IN 'A'",
        "WorkflowType IN ('A' 'B')",
        "WorkflowType LIKE 'A%'",
        "1 = 1",
        "()",
        "(" * 40 + "a = 1" + ")" * 40,
    ],
)
def test_custom_queries_that_cannot_be_combined_safely_are_refused(custom: str) -> None:
    with pytest.raises(InvalidInput):
        query(query=custom)


def test_custom_query_length_is_bounded() -> None:
    with pytest.raises(InvalidInput):
        confine_custom_query("a = 1 AND " * 500 + "a = 1")


def test_the_query_limit_is_the_documents_2000_characters() -> None:
    longest = "a = 1" + " " * (MAX_QUERY_LENGTH - 5)
    assert MAX_QUERY_LENGTH == 2000
    assert query(query=longest).endswith("AND (a = 1)")
    with pytest.raises(InvalidInput, match="longer than 2000"):
        query(query=longest + "0")


# -- values the visibility store cannot match as sent -------------------------------------------

TEXT_FILTERS = ("document_id", "event_name", "rule_id", "search_term", "initiated_by", "type", "query")
CONTROL_CHARACTERS = [
    "\x00",
    "\x01",
    "\t",
    "\n",
    "\r",
    "\x1b",
    "\x1f",
    "\x7f",
    "\x80",
    "\x85",
    "\x9f",
    "\ud800",
    "\udfff",
]


@pytest.mark.parametrize("name", [*TEXT_FILTERS, "status", "start", "end"])
@pytest.mark.parametrize("character", CONTROL_CHARACTERS, ids=[f"U+{ord(c):04X}" for c in CONTROL_CHARACTERS])
def test_control_characters_are_refused_in_every_filter(name: str, character: str) -> None:
    for value in (f"a{character}b", character, f"WorkflowType = 'a{character}'"):
        with pytest.raises(InvalidInput, match="control characters"):
            query(**{name: value})


@pytest.mark.parametrize("name", [name for name in TEXT_FILTERS if name != "query"])
@pytest.mark.parametrize("value", ["'", "''", "'abc", "abc'", "'abc'"])
def test_values_the_store_would_strip_of_their_quotes_are_refused(name: str, value: str) -> None:
    """Temporal trims quotes off both ends of a value: `'` alone would be a prefix of every run."""
    with pytest.raises(InvalidInput, match="single quote"):
        query(**{name: value})


def test_search_term_is_checked_as_it_is_matched_once_trimmed() -> None:
    with pytest.raises(InvalidInput, match="single quote"):
        query(search_term="  ' ")
    assert "WorkflowId = 'a\\'b'" in query(search_term=" a'b ")


@pytest.mark.parametrize("value", ["a'b", 'a"b', "a\\b", "a%b", "a_b", "a*b", "a!b", 'it\'s \\ "quoted"'])
def test_other_special_characters_are_sent_literally(value: str) -> None:
    built = query(search_term=value)
    literal = quote(value)
    assert f"WorkflowId = {literal}" in built
    assert f"WorkflowId STARTS_WITH {literal}" in built
    assert [token.text for token in tokenize(literal)] == [value]


@pytest.mark.parametrize(
    "custom", ["DocumentId = '''abc'", "DocumentId = 'abc'''", "WorkflowId STARTS_WITH ''''", "a IN ('x', '''')"]
)
def test_custom_query_strings_the_store_would_change_are_refused(custom: str) -> None:
    with pytest.raises(InvalidInput, match="single quote"):
        confine_custom_query(custom)


@pytest.mark.parametrize(
    ("project", "principal_ref"),
    [("p1'", "user:u1"), ("'p1", "user:u1"), ("p\x001", "user:u1"), ("p1", "user:u1'"), ("p1", "user:\x85")],
)
def test_a_scope_the_store_would_read_as_another_lists_nothing(project: str, principal_ref: str) -> None:
    with pytest.raises(Forbidden):
        build_query(RunFilters(), project_id=project, principal_ref=principal_ref)
