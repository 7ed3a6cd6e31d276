"""The access log: one JSON line per request, whoever answers it; `access_token` redacted."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest

from server import middleware
from server.logs import AccessLog
from server.middleware import redacted_query
from tests.unit.test_fast_lane import FAST, GET, auth


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
