"""Secrets never reach the logs: the access log redacts `access_token`."""

from __future__ import annotations

from server.middleware import redacted_query


def test_access_token_is_redacted_and_the_rest_kept() -> None:
    query = redacted_query(b"since=5&access_token=eyJhbGciOi.secret.sig&skipHistory=true")
    assert "secret" not in query
    assert query == "since=5&access_token=%5Bredacted%5D&skipHistory=true"


def test_queries_without_tokens_are_unchanged() -> None:
    assert redacted_query(b"since=0") == "since=0"
    assert redacted_query(b"") == ""
