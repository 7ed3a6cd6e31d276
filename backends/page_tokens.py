"""Listing page tokens: Temporal's cursor, bound to the query it continues, and signed.

A token is the unpadded base64url of

    version (1 byte) | digest of the query (16 bytes) | Temporal's cursor | HMAC-SHA256 (32 bytes)

where the HMAC covers every byte before it. A caller can neither replay a token against another
query (another filter set, another project: the digest differs) nor change Temporal's cursor inside
it (the HMAC fails): any change to a token is refused, before Temporal is asked anything.

The key is built once at start-up (`page_token_key`) and given to the backend: PAGE_TOKEN_SECRET,
else derived from JWT_SECRET when tokens are HS256, else random per process (then a token only works
on the process that issued it, which is logged at start).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets

from core.errors import InvalidInput
from core.settings import Settings

log = logging.getLogger(__name__)

VERSION = 2  # 1 was an unsigned JSON token
DIGEST_BYTES = 16
TAG_BYTES = 32
MAX_TOKEN_LENGTH = 4096  # as the document's `next_page_token` says
KEY_LABEL = b"workflow-runs listing page tokens"
_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")


def page_token_key(settings: Settings) -> bytes:
    """The HMAC key every replica must share: from PAGE_TOKEN_SECRET, else from the HS256 JWT
    secret (the label keeps the two uses apart), else a random one for this process alone."""
    secret = settings.page_token_secret
    if secret is None and settings.jwt_secret and not (settings.jwt_public_key or settings.jwks_url):
        secret = settings.jwt_secret
    if secret is None:
        log.warning(
            "PAGE_TOKEN_SECRET is not set and tokens are not HS256: listing page tokens are signed with a"
            " random key of this process, so a next_page_token only works on the replica that issued it"
        )
        return secrets.token_bytes(32)
    return hmac.new(secret.encode("utf-8"), KEY_LABEL, hashlib.sha256).digest()


def _digest(query: str) -> bytes:
    return hashlib.sha256(query.encode("utf-8")).digest()[:DIGEST_BYTES]


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


class PageTokens:
    """Issues and checks the page tokens of listings, with one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _tag(self, signed: bytes) -> bytes:
        return hmac.new(self._key, signed, hashlib.sha256).digest()

    def encode(self, cursor: bytes, query: str) -> str:
        """The token continuing `query` at Temporal's `cursor`."""
        signed = bytes([VERSION]) + _digest(query) + cursor
        return _b64encode(signed + self._tag(signed))

    def decode(self, token: str, query: str) -> bytes:
        """Temporal's cursor back, or InvalidInput unless `token` is exactly one this key issued
        for `query`."""
        invalid = InvalidInput(
            "Invalid page token: pass back the next_page_token of the previous page, with the same filters."
        )
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _ALPHABET.fullmatch(token):
            raise invalid
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid from None
        # Base64 leaves a few bits of the last character unused: a token that differs only there
        # decodes to the same bytes, so only the canonical spelling is accepted.
        if _b64encode(raw) != token or len(raw) <= 1 + DIGEST_BYTES + TAG_BYTES:
            raise invalid
        signed, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(signed)):
            raise invalid
        if signed[0] != VERSION or not hmac.compare_digest(signed[1 : 1 + DIGEST_BYTES], _digest(query)):
            raise invalid
        return signed[1 + DIGEST_BYTES :]
