"""`core.search_attributes.decode_read`: the attributes the API reads, decoded exactly as the
SDK's `decode_typed_search_attributes` decodes them, whatever a run's payloads hold."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.api.common.v1 import Payload, SearchAttributes
from temporalio.converter import decode_typed_search_attributes

from core.search_attributes import ALL, IS_CONVERSATION, PROJECT_ID, READ, VISIBILITY, decode_read


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
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_attributes_read_are_the_sdks(name: str) -> None:
    api = attributes(CASES[name])
    assert read_by_us(api) == read_by_sdk(api)


def test_attributes_the_api_does_not_read_are_left_out() -> None:
    api = attributes(CASES["a run as the project starts it"])
    assert {pair.key.name for pair in decode_read(api)} == {key.name for key in READ}


def test_json_that_does_not_parse_fails_as_in_the_sdk() -> None:
    api = attributes({PROJECT_ID.name: payload(b"{not json", b"Keyword")})
    with pytest.raises(Exception) as ours:
        decode_read(api)
    with pytest.raises(Exception) as theirs:
        decode_typed_search_attributes(api)
    assert type(ours.value) is type(theirs.value)
