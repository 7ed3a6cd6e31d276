"""Listing page tokens: bound to their query, signed, and refused after any change."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import replace

import pytest

from backends.page_tokens import MAX_TOKEN_LENGTH, PageTokens, page_token_key
from core.errors import InvalidInput
from core.settings import Settings

CURSOR = b'{"CloseTime":"2024-05-01T00:00:00Z","StartTime":"2024-05-01T00:00:00Z","RunID":"3f1c9a52"}'
QUERY = "ProjectId = 'p1' AND DocumentId = 'd1'"
TOKENS = PageTokens(b"k" * 32)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refused(token: str, query: str = QUERY, tokens: PageTokens = TOKENS) -> bool:
    with pytest.raises(InvalidInput) as error:
        tokens.decode(token, query)
    assert "invalid page token" in error.value.message.lower()
    return True


def test_a_token_round_trips_to_temporals_cursor() -> None:
    token = TOKENS.encode(CURSOR, QUERY)
    assert set(token) <= set(ALPHABET)
    assert len(token) <= MAX_TOKEN_LENGTH
    assert TOKENS.decode(token, QUERY) == CURSOR


def test_a_token_for_another_query_or_key_is_refused() -> None:
    token = TOKENS.encode(CURSOR, QUERY)
    assert refused(token, QUERY + " AND RuleId = 'r1'")
    assert refused(token, tokens=PageTokens(b"another key" * 3))


@pytest.mark.parametrize("position", range(len(TOKENS.encode(CURSOR, QUERY))))
def test_any_changed_character_is_refused(position: int) -> None:
    token = TOKENS.encode(CURSOR, QUERY)
    for replacement in {ALPHABET[(ALPHABET.index(token[position]) + shift) % 64] for shift in (1, 32, 63)}:
        assert refused(token[:position] + replacement + token[position + 1 :])


def test_any_flipped_byte_is_refused() -> None:
    raw = unb64(TOKENS.encode(CURSOR, QUERY))
    for position in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            changed = bytearray(raw)
            changed[position] ^= mask
            assert refused(b64(bytes(changed)))


def test_a_changed_cursor_with_its_old_signature_is_refused() -> None:
    """What a caller would try: keep the envelope, point Temporal's cursor somewhere else."""
    raw = unb64(TOKENS.encode(CURSOR, QUERY))
    forged = raw.replace(b"3f1c9a52", b"00000000")
    assert forged != raw
    assert refused(b64(forged))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "base64EncodedToken",
        "not base64 !!",
        b64(b"raw temporal token"),
        b64(json.dumps({"v": 1, "q": "0" * 16, "t": b64(b"x")}).encode()),  # the old, unsigned format
        "x" * (MAX_TOKEN_LENGTH + 1),
    ],
)
def test_tokens_this_api_did_not_issue_are_refused(token: str) -> None:
    assert refused(token)


def test_only_the_canonical_spelling_is_accepted() -> None:
    token = TOKENS.encode(CURSOR, QUERY)
    assert refused(token + "=")
    assert refused(token + "==")
    assert refused(" " + token)
    # Base64's last character may have unused bits: other spellings would decode to the same bytes.
    siblings_seen = 0
    for cursor in (CURSOR, CURSOR + b"x", CURSOR + b"xy"):
        token = TOKENS.encode(cursor, QUERY)
        siblings = [c for c in ALPHABET if c != token[-1] and unb64(token[:-1] + c) == unb64(token)]
        siblings_seen += len(siblings)
        for sibling in siblings:
            assert refused(token[:-1] + sibling)
    assert siblings_seen > 0


def test_a_token_without_a_cursor_is_refused() -> None:
    assert refused(TOKENS.encode(b"", QUERY))  # never issued: the last page has no token


SETTINGS = replace(Settings(), page_token_secret=None, jwt_secret=None, jwt_public_key=None, jwks_url=None)


def test_the_key_comes_from_page_token_secret_first() -> None:
    one = page_token_key(replace(SETTINGS, page_token_secret="s1", jwt_secret="j"))
    assert one == page_token_key(replace(SETTINGS, page_token_secret="s1", jwt_secret="other"))
    assert one != page_token_key(replace(SETTINGS, page_token_secret="s2", jwt_secret="j"))


def test_the_key_is_derived_from_an_hs256_secret_not_equal_to_it() -> None:
    derived = page_token_key(replace(SETTINGS, jwt_secret="jwt-secret"))
    assert derived == page_token_key(replace(SETTINGS, jwt_secret="jwt-secret"))  # every replica agrees
    assert derived != b"jwt-secret"
    assert derived != page_token_key(replace(SETTINGS, jwt_secret="jwt-secret-2"))


def test_without_a_shared_secret_the_key_is_random_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    asymmetric = replace(SETTINGS, jwt_secret="unused with a public key", jwt_public_key="PEM")
    with caplog.at_level(logging.WARNING, logger="backends.page_tokens"):
        first, second = page_token_key(asymmetric), page_token_key(replace(SETTINGS))
    assert first != second
    assert first != page_token_key(replace(SETTINGS, jwt_secret="unused with a public key"))
    assert len(caplog.records) == 2
    assert "only works on the replica that issued it" in caplog.records[0].getMessage()
