"""The encryption codec: payloads round trip through it, in the samples' format, and nothing is read
under the wrong key; key settings are read strictly and never echoed."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from workloads.codec import (
    ENCODING,
    KEY_ID_KEY,
    NONCE_BYTES,
    TAG_BYTES,
    CodecKeyError,
    EncryptionCodec,
    UndecryptablePayload,
    key_from_setting,
    key_id_of,
    new_key_setting,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def plain(data: bytes = b'{"documentId":"d-1"}') -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


async def test_a_payload_round_trips() -> None:
    codec = EncryptionCodec(KEY)
    payloads = [plain(), plain(b"[1,2,3]"), Payload(metadata={"encoding": b"binary/null"})]
    encoded = await codec.encode(payloads)
    assert await codec.decode(encoded) == payloads


async def test_encoded_payloads_carry_the_encoding_and_key_id_and_no_plain_text() -> None:
    codec = EncryptionCodec(KEY, key_id="k-2026")
    [encoded] = await codec.encode([plain(b'{"secret":"swordfish"}')])
    assert dict(encoded.metadata) == {"encoding": ENCODING, KEY_ID_KEY: b"k-2026"}
    assert b"swordfish" not in encoded.data and b"json/plain" not in encoded.data
    assert len(encoded.data) == NONCE_BYTES + len(plain(b'{"secret":"swordfish"}').SerializeToString()) + TAG_BYTES


async def test_each_encryption_uses_a_fresh_nonce() -> None:
    codec = EncryptionCodec(KEY)
    first, second = await codec.encode([plain(), plain()])
    assert first.data[:NONCE_BYTES] != second.data[:NONCE_BYTES]
    assert first.data != second.data


async def test_the_samples_format_reads_back() -> None:
    """What Temporal's samples write: nonce, then AES-GCM of the serialized payload, no associated data."""
    nonce = b"\x07" * NONCE_BYTES
    sealed = nonce + AESGCM(KEY).encrypt(nonce, plain().SerializeToString(), None)
    written = Payload(metadata={"encoding": ENCODING, KEY_ID_KEY: b"test-key-id"}, data=sealed)
    assert await EncryptionCodec(KEY, key_id="test-key-id").decode([written]) == [plain()]


async def test_the_default_key_id_is_the_keys_fingerprint() -> None:
    assert EncryptionCodec(KEY).key_id == key_id_of(KEY) != key_id_of(OTHER_KEY)
    assert key_id_of(KEY).startswith("sha256-")
    assert KEY.hex() not in key_id_of(KEY)


async def test_the_wrong_key_fails() -> None:
    encoded = await EncryptionCodec(KEY, key_id="same").encode([plain()])
    with pytest.raises(UndecryptablePayload) as error:
        await EncryptionCodec(OTHER_KEY, key_id="same").decode(encoded)
    assert "does not verify" in str(error.value)


async def test_another_key_id_fails_and_says_which() -> None:
    encoded = await EncryptionCodec(KEY).encode([plain()])
    with pytest.raises(UndecryptablePayload) as error:
        await EncryptionCodec(OTHER_KEY).decode(encoded)
    assert key_id_of(KEY) in str(error.value)


async def test_tampered_data_fails() -> None:
    codec = EncryptionCodec(KEY)
    [encoded] = await codec.encode([plain()])
    tampered = bytearray(encoded.data)
    tampered[-1] ^= 1
    encoded.data = bytes(tampered)
    assert codec.try_decrypt(encoded) is None
    with pytest.raises(UndecryptablePayload):
        await codec.decode([encoded])


async def test_plain_payloads_pass_through_decode() -> None:
    assert await EncryptionCodec(KEY).decode([plain()]) == [plain()]


async def test_a_data_converter_with_the_codec_round_trips_values() -> None:
    converter = DataConverter(payload_codec=EncryptionCodec(KEY))
    encoded = await converter.encode([{"documentId": "d-1"}, 42])
    assert all(p.metadata["encoding"] == ENCODING for p in encoded)
    assert await converter.decode(encoded) == [{"documentId": "d-1"}, 42]


def test_a_key_is_read_from_base64_in_either_alphabet_with_or_without_padding() -> None:
    key = b"\xfb\xff" * 16  # encodes with + and / (or - and _)
    standard = base64.b64encode(key).decode()
    assert "+" in standard or "/" in standard
    for text in (standard, standard.rstrip("="), base64.urlsafe_b64encode(key).decode(), f"  {standard}\n"):
        assert key_from_setting(text) == key


def test_a_new_key_setting_reads_back_as_32_bytes() -> None:
    first, second = new_key_setting(), new_key_setting()
    assert len(key_from_setting(first)) == 32 and first != second


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "is empty"),
        ("not base64!!", "not base64"),
        (base64.b64encode(b"k" * 16).decode(), "16 bytes"),
        (base64.b64encode(b"k" * 33).decode(), "33 bytes"),
    ],
)
def test_a_bad_key_setting_is_refused_by_name_without_its_value(value: str, words: str) -> None:
    with pytest.raises(CodecKeyError) as error:
        key_from_setting(value, name="CODEC_KEY")
    assert words in str(error.value) and "CODEC_KEY" in str(error.value)
    if value:
        assert value not in str(error.value)


def test_a_codec_refuses_a_key_of_the_wrong_size() -> None:
    with pytest.raises(CodecKeyError):
        EncryptionCodec(b"short")
