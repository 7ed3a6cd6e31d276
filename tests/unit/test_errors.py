"""What an error answer may say: a 5xx only the API's own sentence and the request id (the backend's
words go to the log), a 4xx at most a short prefix of a bad value, and control characters in the
listing filters refused before any backend is asked."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from core.errors import BackendUnavailable, DomainError
from core.principals import Principal
from core.protocols import RunFilters, RunPage
from core.settings import Settings
from core.tokens import mint_token
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, app_settings, fake_backends_factory
from web.app import create_app
from web.errors import MAX_MESSAGE_CHARS, MAX_QUOTED_CHARS, UNAVAILABLE, UNAVAILABLE_DEFAULT, bounded

SECRET = "errors-unit-test-secret-" + "x" * 40
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
BACKEND_TEXT = 'SQL logic error: unrecognized token: "\'a" (1) at 10.0.0.7:5432'


class FailingRuns(FakeRuns):
    """Runs whose listing and details fail as `failure` says; lists what it was asked."""

    def __init__(self) -> None:
        super().__init__(status="RUNNING")
        self.failure: Exception | None = None
        self.listed: list[RunFilters] = []

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        return await super().get_run(principal, workflow_id, run_id)

    async def list_runs(
        self, principal: Principal, filters: RunFilters, *, conversations_only: bool = False
    ) -> RunPage:
        self.listed.append(filters)
        if self.failure is not None:
            raise self.failure
        return await super().list_runs(principal, filters, conversations_only=conversations_only)


class FailingUpdates(FakeUpdates):
    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        raise BackendUnavailable(f"Redis did not answer: Error 111 connecting to 10.0.0.8:6379. {BACKEND_TEXT}")


RUNS = FailingRuns()


def settings(fast_lane: bool) -> Settings:
    return app_settings(SECRET, fast_lane=fast_lane)


@pytest.fixture(scope="module", params=[True, False], ids=["fast-lane", "connexion"])
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    app = create_app(settings(request.param), fake_backends_factory(RUNS, FailingUpdates()))
    with app.test_client() as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def healthy_runs() -> Iterator[None]:
    RUNS.failure = None
    RUNS.listed.clear()
    yield
    RUNS.failure = None


def auth(request_id: str = "req-123") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user='u1', project='p1')}", "X-Request-ID": request_id}


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["errorCode"]
    return body


# -- 5xx: the API's sentence and the request id, nothing of the backend ---------------------------


@pytest.mark.parametrize(
    ("backend", "sentence"),
    [("temporal", UNAVAILABLE["temporal"]), ("redis", UNAVAILABLE["redis"]), ("backend", UNAVAILABLE_DEFAULT)],
)
def test_a_backend_unavailable_says_the_apis_sentence_and_the_request_id(
    client: Any, backend: str, sentence: str, caplog: pytest.LogCaptureFixture
) -> None:
    RUNS.failure = BackendUnavailable(f"Temporal could not list runs: INTERNAL {BACKEND_TEXT}", backend=backend)
    with caplog.at_level(logging.WARNING, logger="workflow_runs.errors"):
        for response in (
            client.get(RUN, headers=auth("req-5xx")),
            client.post("/api/v1/workflows/runs", json={}, headers=auth("req-5xx")),
        ):
            body = error_of(response, 503)
            assert body["message"] == f"{sentence} (request id req-5xx)"
            assert "details" not in body
            assert response.headers["retry-after"]
    assert any(BACKEND_TEXT in record.getMessage() for record in caplog.records)  # the cause is logged


def test_redis_text_in_a_backend_unavailable_never_reaches_the_caller(client: Any) -> None:
    response = client.post(f"/api/v1/workflows/runs/{RUN_ID}/updates", json={}, headers=auth("req-redis"))
    body = error_of(response, 503)
    assert "10.0.0.8" not in response.text and "SQL" not in response.text
    assert body["message"].endswith("(request id req-redis)")


def test_a_500_is_the_apis_sentence_and_the_request_id(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    RUNS.failure = DomainError(f"a bug: {BACKEND_TEXT}", details=BACKEND_TEXT)
    with caplog.at_level(logging.ERROR, logger="workflow_runs.errors"):
        body = error_of(client.get(RUN, headers=auth("req-500")), 500)
    assert body == {
        "error": "Internal Server Error",
        "status": 500,
        "message": "Internal server error. (request id req-500)",
        "errorCode": "internal_error",
    }
    assert any(BACKEND_TEXT in record.getMessage() for record in caplog.records)


def test_an_unexpected_exception_is_a_500_with_the_request_id(client: Any) -> None:
    RUNS.failure = RuntimeError(BACKEND_TEXT)
    response = client.get(RUN, headers=auth("req-boom"))
    assert error_of(response, 500)["message"] == "Internal server error. (request id req-boom)"
    assert "SQL" not in response.text


# -- control characters in the listing filters: 400 before the backend ----------------------------

FILTERS = ("document_id", "event_name", "rule_id", "search_term", "initiated_by", "type", "query")


@pytest.mark.parametrize("operation", ["/api/v1/workflows/runs", "/api/v1/workflows/conversations"])
@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("character", ["\x00", "\x1f", "\x7f", "\x9f", "\n"], ids=["NUL", "US", "DEL", "APC", "LF"])
def test_control_characters_in_a_filter_are_400_before_the_backend(
    client: Any, operation: str, name: str, character: str
) -> None:
    response = client.post(operation, json={name: f"a{character}b"}, headers=auth())
    body = error_of(response, 400)
    assert name in body["message"]
    assert RUNS.listed == []


# -- 4xx messages quote a short prefix of a bad value --------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"document_id": "d" * 300_000},  # too long
        {"status": "s" * 300_000},  # not one of the statuses
        {"page_size": "p" * 300_000},  # not an integer
        {"q" * 300_000: 1},  # an unknown field
        {"next_page_token": "!" * 300_000},
    ],
    ids=["too-long", "pattern", "type", "unknown-field", "token"],
)
def test_a_huge_bad_value_is_quoted_by_a_short_prefix(client: Any, payload: dict[str, Any]) -> None:
    response = client.post("/api/v1/workflows/runs", json=payload, headers=auth())
    message = error_of(response, 400)["message"]
    assert len(message) <= MAX_MESSAGE_CHARS
    assert len(response.content) < 2 * MAX_MESSAGE_CHARS
    value = next(iter(payload.values())) if not next(iter(payload)).startswith("q") else next(iter(payload))
    assert value[:MAX_QUOTED_CHARS] + "\u2026" in message
    assert value[: MAX_QUOTED_CHARS + 1] not in message


def test_a_huge_bad_query_parameter_is_quoted_by_a_short_prefix(client: Any) -> None:
    response = client.get(f"{RUN}/updates?since={'9' * 5000}x", headers=auth())
    message = error_of(response, 400)["message"]
    assert len(message) <= MAX_MESSAGE_CHARS
    assert "9" * (MAX_QUOTED_CHARS + 1) not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("short and 'quoted' and \"double\"", "short and 'quoted' and \"double\""),
        ('body.x: "' + "a" * 150 + '" is too long', 'body.x: "' + "a" * 100 + '\u2026" is too long'),
        ("('" + "b" * 150 + "' was unexpected)", "('" + "b" * 100 + "\u2026' was unexpected)"),
        ("the token's " + "c" * 150, "the token's " + "c" * 150),  # an apostrophe opens no quote
        ('"' + "d" * 150, '"' + "d" * 100 + "\u2026"),  # unterminated
        ('"' + "e\\" * 99 + 'e\\" more"', '"' + "e\\" * 49 + 'e\u2026"'),  # no half escape left
    ],
)
def test_bounded_cuts_quoted_values(text: str, expected: str) -> None:
    assert bounded(text) == expected


def test_bounded_caps_the_whole_message() -> None:
    text = "x " * 5000
    assert len(bounded(text)) == MAX_MESSAGE_CHARS
    assert bounded(text).endswith("\u2026")
