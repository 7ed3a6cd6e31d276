"""Custom search attributes every run started by the project carries: what the API filters and
scopes on. One definition, used by the starter, the workflows, the runs backend and the stack.

The embedded stack registers them on the Temporal dev server (`cli.stack`); against a real
cluster, register them once with `temporal operator search-attribute create` (README).
The dev server's SQLite visibility store allows at most 10 Keyword attributes, so the rule name
lives in VertesiaWorkflowType (as the live API does for DSL workflows) and no TenantId is kept.
"""

from __future__ import annotations

from typing import Any

import orjson
from temporalio.api.common.v1 import Payload, SearchAttributes
from temporalio.common import (
    SearchAttributeIndexedValueType,
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.converter import default as default_converter

PROJECT_ID = SearchAttributeKey.for_keyword("ProjectId")
ACCOUNT_ID = SearchAttributeKey.for_keyword("AccountId")
INITIATED_BY = SearchAttributeKey.for_keyword("InitiatedBy")
DOCUMENT_ID = SearchAttributeKey.for_keyword("DocumentId")
EVENT_NAME = SearchAttributeKey.for_keyword("EventName")
RULE_ID = SearchAttributeKey.for_keyword("RuleId")
INTERACTION_NAME = SearchAttributeKey.for_keyword("InteractionName")
VISIBILITY = SearchAttributeKey.for_keyword("Visibility")
IS_CONVERSATION = SearchAttributeKey.for_bool("IsConversation")
VERTESIA_WORKFLOW_TYPE = SearchAttributeKey.for_keyword("VertesiaWorkflowType")

ALL: tuple[SearchAttributeKey[Any], ...] = (
    PROJECT_ID,
    ACCOUNT_ID,
    INITIATED_BY,
    DOCUMENT_ID,
    EVENT_NAME,
    RULE_ID,
    INTERACTION_NAME,
    VISIBILITY,
    IS_CONVERSATION,
    VERTESIA_WORKFLOW_TYPE,
)

# name -> type as `temporal server start-dev --search-attribute NAME=TYPE` spells it
SEARCH_ATTRIBUTES: dict[str, str] = {
    key.name: "Bool" if key.indexed_value_type == SearchAttributeIndexedValueType.BOOL else "Keyword" for key in ALL
}

# The attributes the API reads from a run (its scope, and what a run summary shows).
READ: tuple[SearchAttributeKey[Any], ...] = (
    PROJECT_ID,
    INITIATED_BY,
    VISIBILITY,
    IS_CONVERSATION,
    VERTESIA_WORKFLOW_TYPE,
    INTERACTION_NAME,
)
# How Temporal spells an attribute's type in its payload's `type` metadata (both forms occur).
_TYPE_METADATA = {
    SearchAttributeIndexedValueType.KEYWORD: (b"Keyword", b"INDEXED_VALUE_TYPE_KEYWORD"),
    SearchAttributeIndexedValueType.BOOL: (b"Bool", b"INDEXED_VALUE_TYPE_BOOL"),
}
_READ_TYPES = tuple((key, _TYPE_METADATA[key.indexed_value_type], key.origin_value_type) for key in READ)


def decode_read(api: SearchAttributes) -> TypedSearchAttributes:
    """The attributes of `READ`, decoded as `temporalio.converter.decode_typed_search_attributes`
    decodes them (an attribute whose type metadata is another type, or whose value is not one value
    of its type, is left out), and no other. The SDK's function decodes every attribute a run
    carries through the payload converter: about 12 µs each, measured, which made it the largest
    part of a listing's CPU after Temporal's own call.

    Where the two differ, it is on payloads Temporal does not send, and only in what they raise:
    the SDK raises for an attribute it cannot decode, any attribute; this decodes only the ones it
    reads, and skips one whose type metadata is not its type before decoding it."""
    fields = api.indexed_fields
    pairs: list[SearchAttributePair[Any]] = []
    for key, type_metadata, value_type in _READ_TYPES:
        if key.name not in fields:
            continue
        payload = fields[key.name]
        if payload.metadata.get("type") not in type_metadata:
            continue
        value = _value(payload)
        if isinstance(value, list):
            if len(value) != 1:
                continue
            value = value[0]
        if isinstance(value, value_type):
            pairs.append(SearchAttributePair(key, value))
    return TypedSearchAttributes(pairs)


def _value(payload: Payload) -> Any:
    if payload.metadata.get("encoding") == b"json/plain":
        try:
            return orjson.loads(payload.data)
        except orjson.JSONDecodeError:
            pass  # the SDK's converter says what is wrong with it
    return default_converter().payload_converter.from_payload(payload)
