"""`core.search_attributes.decode_read`: the attributes the API reads, decoded as the SDK's
`decode_typed_search_attributes` decodes them, for every payload Temporal sends and many it does
not; and where the two differ (what they raise for payloads that cannot be decoded)."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.api.common.v1 import Payload, SearchAttributes
from temporalio.converter import decode_typed_search_attributes

from core.search_attributes import (
    ALL,
    INITIATED_BY,
    IS_CONVERSATION,
    PROJECT_ID,
    READ,
    VISIBILITY,
    decode_read,
)


def payload(data: bytes, type_: bytes | None, encoding: bytes = b"json/plain") -> Payload:
    metadata = {"encoding": encoding}
    if type_ is not None:
        metadata["type"] = type_
    return Payload(metadata=metadata, data=data)


def attributes(fields: dict[str, Payload]) -> SearchAttributes:
    api = SearchAttributes()
    for name, value in fields.items():
        api.indexed_fields[name].CopyFrom(value)
    return api


def read_by_sdk(api: SearchAttributes) -> dict[str, Any]:
    decoded = decode_typed_search_attributes(api)
    return {key.name: decoded.get(key) for key in READ}


def read_by_us(api: SearchAttributes) -> dict[str, Any]:
    decoded = decode_read(api)
    return {key.name: decoded.get(key) for key in READ}


CASES: dict[str, dict[str, Payload]] = {
    "a run as the project starts it": {
        key.name: payload(b"true", b"Bool")
        if key is IS_CONVERSATION
        else payload(b'"v-%s"' % key.name.encode(), b"Keyword")
        for key in ALL
    }
    | {"BuildIds": payload(b'["a","b"]', b"KeywordList"), "TemporalChangeVersion": payload(b'["x"]', b"KeywordList")},
    "nothing set": {},
    "types spelled as the API enum": {
        PROJECT_ID.name: payload(b'"p"', b"INDEXED_VALUE_TYPE_KEYWORD"),
        IS_CONVERSATION.name: payload(b"false", b"INDEXED_VALUE_TYPE_BOOL"),
    },
    "another type than the key's": {
        PROJECT_ID.name: payload(b'"p"', b"Text"),
        IS_CONVERSATION.name: payload(b'"yes"', b"Keyword"),
    },
    "no type metadata": {PROJECT_ID.name: payload(b'"p"', None)},
    "a one-item list, a longer list, an empty one": {
        PROJECT_ID.name: payload(b'["p"]', b"Keyword"),
        VISIBILITY.name: payload(b'["a","b"]', b"Keyword"),
        IS_CONVERSATION.name: payload(b"[]", b"Bool"),
    },
    "values of the wrong JSON type": {
        PROJECT_ID.name: payload(b"5", b"Keyword"),
        IS_CONVERSATION.name: payload(b"1", b"Bool"),
        VISIBILITY.name: payload(b"null", b"Keyword"),
    },
    "a null payload": {PROJECT_ID.name: payload(b"", b"Keyword", encoding=b"binary/null")},
    "JSON only the standard library parses": {
        PROJECT_ID.name: payload(b'\xef\xbb\xbf"p"', b"Keyword"),  # a byte-order mark
        INITIATED_BY.name: payload('"u"'.encode("utf-16"), b"Keyword"),
        VISIBILITY.name: payload(b'"\\ud800"', b"Keyword"),  # a lone surrogate
        IS_CONVERSATION.name: payload(b"NaN", b"Bool"),
    },
    "another encoding": {PROJECT_ID.name: payload(b"p", b"Keyword", encoding=b"binary/plain")},
    "a one-item list of a bool; a bool for a keyword": {
        IS_CONVERSATION.name: payload(b"[true]", b"Bool"),
        PROJECT_ID.name: payload(b"true", b"Keyword"),
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_attributes_read_are_the_sdks(name: str) -> None:
    api = attributes(CASES[name])
    assert read_by_us(api) == read_by_sdk(api)


def test_attributes_the_api_does_not_read_are_left_out() -> None:
    api = attributes(CASES["a run as the project starts it"])
    assert {pair.key.name for pair in decode_read(api)} == {key.name for key in READ}


@pytest.mark.parametrize(
    "unreadable",
    [
        payload(b"{not json", b"Keyword"),
        payload(b'"p"', b"Keyword", encoding=b"binary/encrypted"),
        payload(b'"p"', b"Keyword", encoding=b"json/protobuf"),  # no messageType
    ],
)
def test_a_read_attribute_that_cannot_be_decoded_fails_as_in_the_sdk(unreadable: Payload) -> None:
    api = attributes({PROJECT_ID.name: unreadable})
    with pytest.raises(Exception) as ours:
        decode_read(api)
    with pytest.raises(Exception) as theirs:
        decode_typed_search_attributes(api)
    assert type(ours.value) is type(theirs.value)


def test_where_they_differ_an_attribute_not_read_or_not_of_its_type_is_not_decoded() -> None:
    # The SDK raises for these; decode_read never decodes them.
    for fields in (
        {"SomeOtherAttribute": payload(b"{not json", b"Keyword"), PROJECT_ID.name: payload(b'"p"', b"Keyword")},
        {PROJECT_ID.name: payload(b'"p"', b"Text", encoding=b"binary/encrypted")},
    ):
        api = attributes(fields)
        with pytest.raises(Exception):  # noqa: B017 (which error is the SDK's business)
            decode_typed_search_attributes(api)
        decoded = decode_read(api)
        assert decoded.get(PROJECT_ID) == ("p" if "SomeOtherAttribute" in fields else None)
