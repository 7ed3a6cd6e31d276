"""The access log: one JSON line per request, whoever answers it; `access_token` redacted."""

from __future__ import annotations

import base64
import io
from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, app_settings, bearer, fake_backends_factory
from web import middleware
from web.app import create_app
from web.logs import MAX_FIELD_CHARS, AccessLog, clip
from web.middleware import redacted_query


def test_access_token_is_redacted_and_the_rest_kept() -> None:
    query = redacted_query(b"since=5&access_token=eyJhbGciOi.secret.sig&skipHistory=true")
    assert "secret" not in query
    assert query == "since=5&access_token=%5Bredacted%5D&skipHistory=true"


def test_an_escaped_parameter_name_is_redacted_too() -> None:
    # `access%5Ftoken` is `access_token` once decoded, and the stream accepts it as the token.
    assert "s3cret" not in redacted_query(b"access%5Ftoken=s3cret")


def test_queries_without_tokens_are_unchanged() -> None:
    assert redacted_query(b"since=0") == "since=0"
    assert redacted_query(b"") == ""


SECRET = "middleware-unit-test-secret-" + "x" * 40
GET = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}/updates"
FAST = create_app(app_settings(SECRET), fake_backends_factory(FakeRuns(status="RUNNING")))


def auth() -> dict[str, str]:
    return bearer(SECRET)


JWT = auth()["Authorization"].removeprefix("Bearer ")  # a real one: header `eyJ...`, payload, signature


@pytest.mark.parametrize(
    "query",
    [
        f"token={JWT}",
        f"ACCESS_TOKEN={JWT}",
        f"jwt={JWT}&since=5",
        "Access_Token=opaque-not-a-jwt",
        f"auth=Bearer%20{JWT}",
        f"x={JWT.replace('.', '%2E')}",
        # A JWT whose header is not written `eyJ` (whitespace first) is recognised by decoding it.
        "t=" + base64.urlsafe_b64encode(b' {"alg":"none"}').decode().rstrip("=") + ".e30.",
    ],
)
def test_a_jwt_is_redacted_whatever_the_parameter_is_called(query: str) -> None:
    logged = redacted_query(query.encode())
    assert middleware.REDACTED in unquote(logged)
    for secret in (JWT, JWT.split(".")[1], "opaque-not-a-jwt", "e30."):
        assert secret not in unquote(logged)


@pytest.mark.parametrize(
    "query",
    ["version=1.2.3", "host=example.com.au", "since=5&note=a.b.c", "x=eyJ", "v=abc.def", "%41=1", ""],
)
def test_dotted_values_that_are_not_jwts_are_logged_as_sent(query: str) -> None:
    assert redacted_query(query.encode()) == query


def test_every_response_says_nosniff_and_no_redirect_goes_where_the_host_header_says() -> None:
    with FAST.test_client() as client:
        responses = {
            "fast lane": client.get(GET, headers=auth()),
            "connexion": client.get(GET + "?limit=1", headers=auth()),
            "unknown route": client.get("/nowhere"),
            "document": client.get("/api/v1/openapi.json"),
            "health": client.get("/health/live"),
        }
        for name, response in responses.items():
            assert response.headers["x-content-type-options"] == "nosniff", name
        # A trailing slash was a 307 to `http://<Host header>/...`, before authentication.
        for path in (GET + "/", "/api/v1/workflows/runs/", "/health/live/", "/api/v1/openapi.json/"):
            response = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
            assert response.status_code == 404, path
            assert "location" not in response.headers
            assert response.json()["errorCode"] == "not_found"
        # Swagger UI keeps its own redirect to the folder, relative.
        response = client.get("/api/v1/ui", headers={"Host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"] == "/api/v1/ui/"
        assert client.get("/api/v1/ui/").status_code == 200


def test_one_access_log_line_per_request_served_by_the_lane_or_by_connexion(monkeypatch: pytest.MonkeyPatch) -> None:
    output = io.BytesIO()
    log = AccessLog(interval=3600)  # flushed by hand below, not by its thread
    monkeypatch.setattr(middleware, "access_log", log)
    log.start(output)
    try:
        with FAST.test_client() as client:
            headers = {**auth(), "X-Request-ID": "req-1"}
            assert client.get(GET, headers=headers).status_code == 200  # the fast lane
            assert client.get(GET + "?access_token=s3cret", headers=headers).status_code == 400  # Connexion
    finally:
        log.stop()
    lines = [orjson.loads(line) for line in output.getvalue().splitlines()]
    assert [(line["method"], line["status"], line["request_id"]) for line in lines] == [
        ("GET", 200, "req-1"),
        ("GET", 400, "req-1"),
    ]
    assert lines[0]["path"] == GET and lines[0]["logger"] == "workflow_runs.access"
    assert b"s3cret" not in output.getvalue() and lines[1]["query"] == "access_token=%5Bredacted%5D"
    assert all(line["duration_ms"] >= 0 for line in lines)


def test_lines_are_dropped_until_the_log_is_started() -> None:
    log = AccessLog()
    log.write("GET / 200", {"status": 200})
    output = io.BytesIO()
    log.start(output)
    log.stop()
    assert output.getvalue() == b""


class FlakyOutput(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    def write(self, data: Any) -> int:
        if self.failures:
            self.failures -= 1
            raise BrokenPipeError("stderr went away")
        return super().write(data)


def test_a_failed_write_loses_its_batch_not_the_log() -> None:
    log, output = AccessLog(interval=3600), FlakyOutput()
    log.start(output)
    log.start(output)  # a second start changes nothing
    log.write("GET /a 200", {"status": 200})
    log.flush()  # fails: this batch is lost
    log.write("GET /b 200", {"status": 200})
    log.stop()
    log.write("GET /c 200", {"status": 200})  # after stop: dropped
    log.stop()
    assert [orjson.loads(line)["msg"] for line in output.getvalue().splitlines()] == ["GET /b 200"]


def test_a_blocked_log_output_bounds_the_queue_and_reports_what_it_dropped() -> None:
    log, output = AccessLog(interval=3600, max_pending=3), io.BytesIO()
    log.start(output)
    for index in range(5):  # the writer never runs: as with an output that does not take lines
        log.write(f"GET /{index} 200", {"status": 200})
    log.stop()
    lines = [orjson.loads(line) for line in output.getvalue().splitlines()]
    assert [line["msg"] for line in lines[:3]] == ["GET /0 200", "GET /1 200", "GET /2 200"]
    assert len(lines) == 4 and "2 access log lines dropped" in lines[3]["msg"]


def test_a_long_path_and_query_are_clipped_in_the_access_log() -> None:
    assert clip("a" * 10) == "a" * 10
    clipped = clip("a" * 5000)
    assert len(clipped) == MAX_FIELD_CHARS and clipped.endswith("\u2026")
