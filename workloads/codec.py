"""Encrypted payloads: a Temporal payload codec with AES-256-GCM, and the key it reads from a setting.

The format is the one of Temporal's encryption samples (Python, Go, TypeScript), so that their codec
servers and this one read each other's payloads: the whole serialized payload is encrypted, under a
12-byte random nonce written before the ciphertext (which ends with GCM's 16-byte tag), with no
associated data; the new payload's metadata says `encoding: binary/encrypted` and, in
`encryption-key-id`, which key was used.

Payloads of another encoding go through `decode` untouched, so runs started before encryption was
turned on (and signals sent in plain JSON) still read. A payload encrypted under another key id, or
one whose tag does not verify, makes `decode` raise: a worker must not run a workflow on data it
cannot read. The codec server, which only shows data, uses `try_decrypt` and leaves such a payload
as it is instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
ENCODING_KEY = "encoding"
KEY_ID_KEY = "encryption-key-id"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random per payload, so one key may encrypt ~2**32 payloads
TAG_BYTES = 16


class CodecKeyError(ValueError):
    """A key setting that is not the base64 of 32 bytes. The message names the setting, never its
    value."""


class UndecryptablePayload(ValueError):
    """A `binary/encrypted` payload this codec cannot decrypt: another key id, or data that does not
    verify under this key (wrong key, or corrupted). The message holds no payload data."""


def key_from_setting(value: str, *, name: str = "CODEC_KEY") -> bytes:
    """The key a setting holds as base64 (standard or URL-safe alphabet, padding optional), which
    must decode to exactly 32 bytes. Raises `CodecKeyError` naming `name` otherwise."""
    text = value.strip()
    if not text:
        raise CodecKeyError(f"{name} is empty: set it to the base64 of {KEY_BYTES} random bytes.")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CodecKeyError(f"{name} is not base64: set it to the base64 of {KEY_BYTES} random bytes.") from None
    if len(key) != KEY_BYTES:
        raise CodecKeyError(f"{name} decodes to {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}.")
    return key


def new_key_setting() -> str:
    """A fresh random key, as the base64 text a key setting holds."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def key_id_of(key: bytes) -> str:
    """The default key id: a short fingerprint of the key. It changes with the key, so payloads of an
    old key are recognised as such (rather than failing to verify), and it reveals nothing usable of
    the key (a truncated SHA-256 of 256 random bits)."""
    return "sha256-" + hashlib.sha256(key).hexdigest()[:16]


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads, in the samples' format (see the module's docstring)."""

    def __init__(self, key: bytes, *, key_id: str | None = None) -> None:
        if len(key) != KEY_BYTES:
            raise CodecKeyError(f"An AES-256 key is {KEY_BYTES} bytes, not {len(key)}.")
        super().__init__()
        self.key_id = key_id or key_id_of(key)
        self._key_id_bytes = self.key_id.encode("utf-8")
        self._aead = AESGCM(key)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out: list[Payload] = []
        for payload in payloads:
            if not is_encrypted(payload):
                out.append(payload)
                continue
            decrypted = self.try_decrypt(payload)
            if decrypted is None:
                raise UndecryptablePayload(self._why_not(payload))
            out.append(decrypted)
        return out

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        return Payload(
            metadata={ENCODING_KEY: ENCODING, KEY_ID_KEY: self._key_id_bytes},
            data=nonce + self._aead.encrypt(nonce, payload.SerializeToString(), None),
        )

    def try_decrypt(self, payload: Payload) -> Payload | None:
        """The payload an encrypted one holds, or None when this codec cannot decrypt it."""
        if payload.metadata.get(KEY_ID_KEY) != self._key_id_bytes or len(payload.data) < NONCE_BYTES + TAG_BYTES:
            return None
        data = payload.data
        try:
            return Payload.FromString(self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None))
        except (InvalidTag, DecodeError):
            return None

    def _why_not(self, payload: Payload) -> str:
        key_id = payload.metadata.get(KEY_ID_KEY, b"").decode("utf-8", "replace")
        if key_id != self.key_id:
            return f"payload encrypted under key id {key_id or '(none)'!r}, not the configured {self.key_id!r}"
        return f"payload under key id {key_id!r} does not verify: another key of that id, or corrupted data"


def is_encrypted(payload: Payload) -> bool:
    return payload.metadata.get(ENCODING_KEY) == ENCODING
