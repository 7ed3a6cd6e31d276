"""What `make fuzz` (Schemathesis with hostile strings, `contract_tests/fuzz.py`) found, pinned on
the ASGI app with fake backends, so it stays fixed without the live stack.

- A control character in a list filter reached Temporal, whose SQL visibility store failed on it:
  503 carrying the store's own error text. It is the caller's mistake: 400 before any backend call.
- A value of a megabyte that breaks the schema came back whole inside the 400's message.
- A JSON body with a lone surrogate escape (`"\\ud800"`, no Unicode text) must be a 400, whichever
  lane serves the operation, never a 500.
- An integer query parameter written with surrounding whitespace (`since=%0912%09`) was taken for
  12 (Python's `int()` also reads `1_2` and non-ASCII digits): not an integer, so 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from core.principals import Principal
from core.protocols import RunFilters, RunPage
from core.settings import Settings
from core.tokens import mint_token
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, app_settings, fake_backends_factory
from web.app import create_app

SECRET = "fuzz-regressions-secret-" + "x" * 48
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
LIST_PATHS = {"listWorkflowRuns": "/api/v1/workflows/runs", "listConversations": "/api/v1/workflows/conversations"}

# A valid value for every string field of ListRunsRequest; a control character goes in the middle.
FILTER_VALUES = {
    "document_id": "doc-7f3a2c",
    "event_name": "create",
    "rule_id": "rule-42",
    "start": "2023-03-15T00:00:00Z",
    "end": "2023-03-16",
    "search_term": "Ingestion",
    "status": "running",
    "initiated_by": "user:123",
    "type": "StandardContentIngestion",
    "query": "WorkflowType = 'StandardContentIngestion'",
    "next_page_token": "c29tZVRva2Vu",
}
# NUL (what the fuzzer sent), another C0 control, DEL and a C1 control (NEL).
CONTROLS = {"NUL": "\x00", "ESC": "\x1b", "DEL": "\x7f", "NEL": "\x85"}
MEGABYTE = 1_000_000


class RecordingRuns(FakeRuns):
    """The fake runs backend, remembering every listing it was asked for."""

    def __init__(self) -> None:
        super().__init__(status="COMPLETED")  # streams of a closed run end
        self.listed: list[RunFilters] = []
        self.signalled: list[dict[str, Any]] = []

    async def list_runs(
        self, principal: Principal, filters: RunFilters, *, conversations_only: bool = False
    ) -> RunPage:
        self.listed.append(filters)
        return await super().list_runs(principal, filters, conversations_only=conversations_only)

    async def signal(
        self, principal: Principal, workflow_id: str, run_id: str, signal_name: str, payload: dict[str, Any]
    ) -> None:
        self.signalled.append(payload)
        await super().signal(principal, workflow_id, run_id, signal_name, payload)


class RecordingUpdates(FakeUpdates):
    def __init__(self) -> None:
        super().__init__()
        self.appended = False

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        self.appended = True
        return await super().append(run_id, update)


def settings() -> Settings:
    # Rate limits off: a test here sends more than a caller's burst, and a 429 is not under test.
    return app_settings(SECRET, rate_limit_temporal_per_second=0, rate_limit_updates_per_second=0)


@pytest.fixture(scope="module")
def runs() -> RecordingRuns:
    return RecordingRuns()


@pytest.fixture(scope="module")
def updates() -> RecordingUpdates:
    return RecordingUpdates()


@pytest.fixture(scope="module")
def client(runs: RecordingRuns, updates: RecordingUpdates) -> Iterator[Any]:
    app = create_app(settings(), fake_backends_factory(runs, updates))
    with app.test_client() as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def forget_calls(runs: RecordingRuns, updates: RecordingUpdates) -> None:
    runs.listed.clear()
    runs.signalled.clear()
    updates.appended = False


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user='u1', project='p1')}"}


def post_json(client: Any, path: str, body: Any) -> Any:
    """`body` serialised with escapes only (`\\u0000`, `\\ud800`), as Schemathesis sent it."""
    return client.post(
        path,
        content=orjson.dumps(body) if isinstance(body, dict) else body,
        headers={**auth(), "Content-Type": "application/json"},
    )


def assert_client_error(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"].startswith("application/json")
    assert "retry-after" not in response.headers  # the caller's mistake: retrying will not help
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    return body


@pytest.mark.parametrize("operation", sorted(LIST_PATHS))
@pytest.mark.parametrize("control", sorted(CONTROLS))
@pytest.mark.parametrize("field", sorted(FILTER_VALUES))
def test_a_control_character_in_a_list_filter_is_400_before_the_backend(
    client: Any, runs: RecordingRuns, operation: str, control: str, field: str
) -> None:
    valid = FILTER_VALUES[field]
    middle = len(valid) // 2
    response = post_json(client, LIST_PATHS[operation], {field: valid[:middle] + CONTROLS[control] + valid[middle:]})
    body = assert_client_error(response)
    assert field in body["message"] + body.get("details", "")
    assert runs.listed == []


@pytest.mark.parametrize("operation", sorted(LIST_PATHS))
def test_the_same_filters_without_the_control_character_reach_the_backend(
    client: Any, runs: RecordingRuns, operation: str
) -> None:
    # The other half of the test above: its 400s come from the control characters, not the values.
    body = {name: value for name, value in FILTER_VALUES.items() if name != "next_page_token"}
    response = post_json(client, LIST_PATHS[operation], body)
    assert response.status_code == 200, response.text
    assert [filters.document_id for filters in runs.listed] == ["doc-7f3a2c"]


# (method, path, body) with one value of a megabyte that breaks the schema.
HUGE_BAD_VALUES = {
    "filter over maxLength": ("POST", "/api/v1/workflows/runs", {"document_id": "d" * MEGABYTE}),
    "filter off its pattern": ("POST", "/api/v1/workflows/conversations", {"status": "s" * MEGABYTE}),
    "query over maxLength": ("POST", "/api/v1/workflows/runs", {"query": "WorkflowType = '" + "q" * MEGABYTE + "'"}),
    "page token off its pattern": ("POST", "/api/v1/workflows/runs", {"next_page_token": "!" * MEGABYTE}),
    "unknown field name": ("POST", "/api/v1/workflows/runs", {"f" * MEGABYTE: 1}),
    "update type": ("POST", f"/api/v1/workflows/runs/{RUN_ID}/updates", {"type": "t" * MEGABYTE}),
    "signal message type": ("POST", f"{RUN}/signal/UserInput", {"message": ["m" * MEGABYTE]}),
    "action reason type": ("POST", f"{RUN}/actions/cancel", {"reason": ["r" * MEGABYTE]}),
}


@pytest.mark.parametrize("case", sorted(HUGE_BAD_VALUES))
def test_a_megabyte_bad_value_gets_a_short_400(client: Any, case: str) -> None:
    method, path, body = HUGE_BAD_VALUES[case]
    raw = orjson.dumps(body)
    assert len(raw) < settings().max_body_bytes  # under the body limit: a 400, not a 413
    response = client.request(method, path, content=raw, headers={**auth(), "Content-Type": "application/json"})
    error = assert_client_error(response)
    assert len(error["message"]) <= 1000
    assert len(error.get("details", "")) <= 1000


def test_a_long_path_parameter_gets_a_short_400(client: Any) -> None:
    # 60 KB, under the test client's URL limit; on the wire the request-head limit answers first.
    response = client.get(f"/api/v1/workflows/runs/{WORKFLOW_ID}/{'9' * 60_000}", headers=auth())
    error = assert_client_error(response)
    assert len(error["message"]) <= 1000
    assert len(error.get("details", "")) <= 1000


LONE_SURROGATE_BODIES = {
    # Connexion's lane
    "listWorkflowRuns": ("/api/v1/workflows/runs", b'{"document_id": "doc\\ud800"}'),
    "listConversations": ("/api/v1/workflows/conversations", b'{"search_term": "\\udc00x"}'),
    "signalWorkflowRun": (f"{RUN}/signal/UserInput", b'{"message": "S\\udc00\\ud800tuck"}'),
    "applyWorkflowRunAction": (f"{RUN}/actions/cancel", b'{"reason": "\\udfff"}'),
    # the fast lane
    "postWorkflowRunUpdate": (f"/api/v1/workflows/runs/{RUN_ID}/updates", b'{"message": "half \\ud83d a smile"}'),
    "postWorkflowRunUpdate details key": (f"/api/v1/workflows/runs/{RUN_ID}/updates", b'{"details": {"\\ud800": 1}}'),
}


@pytest.mark.parametrize("case", sorted(LONE_SURROGATE_BODIES))
def test_a_lone_surrogate_in_a_json_body_is_400_not_stored(
    client: Any, runs: RecordingRuns, updates: RecordingUpdates, case: str
) -> None:
    path, raw = LONE_SURROGATE_BODIES[case]
    assert_client_error(post_json(client, path, raw))
    assert runs.listed == [] and runs.signalled == [] and not updates.appended


# Text Python's int() reads as 12 that is no integer in the document's sense (ASCII digits only).
NOT_INTEGERS = {"tab-padded": "%0912%09", "space-padded": "%2012", "underscore": "1_2", "arabic-indic": "%D9%A1%D9%A2"}


@pytest.mark.parametrize("operation", ["updates", "stream"])
@pytest.mark.parametrize("spelling", sorted(NOT_INTEGERS))
def test_an_integer_query_parameter_must_be_plain_digits(client: Any, operation: str, spelling: str) -> None:
    response = client.get(f"{RUN}/{operation}?since={NOT_INTEGERS[spelling]}", headers=auth())
    assert "since" in assert_client_error(response)["message"]


@pytest.mark.parametrize("operation", ["updates", "stream"])
def test_a_plain_integer_query_parameter_is_accepted(client: Any, operation: str) -> None:
    response = client.get(f"{RUN}/{operation}?since=12", headers=auth())
    assert response.status_code == 200, response.text
