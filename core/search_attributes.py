"""Custom search attributes every run started by the project carries: what the API filters and
scopes on. One definition, used by the starter, the workflows, the runs backend and the stack.

The embedded stack registers them on the Temporal dev server (`cli.stack`); against a real
cluster, register them once with `temporal operator search-attribute create` (README).
The dev server's SQLite visibility store allows at most 10 Keyword attributes, so the rule name
lives in VertesiaWorkflowType (as the live API does for DSL workflows) and no TenantId is kept.
"""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeIndexedValueType, SearchAttributeKey

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
