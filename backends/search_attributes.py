"""Custom search attributes every run started by the project carries.

The embedded stack registers them on the Temporal dev server (`server.stack`); against a real
cluster, register them once with `temporal operator search-attribute create` (README).
"""

from __future__ import annotations

# The dev server's SQLite visibility store allows at most 10 Keyword attributes, so the rule name
# lives in VertesiaWorkflowType (as the live API does for DSL workflows) and no TenantId is kept.
# name -> Temporal indexed value type (as `temporal server start-dev --search-attribute` spells it)
SEARCH_ATTRIBUTES: dict[str, str] = {
    "ProjectId": "Keyword",
    "AccountId": "Keyword",
    "DocumentId": "Keyword",
    "InitiatedBy": "Keyword",
    "EventName": "Keyword",
    "RuleId": "Keyword",
    "InteractionName": "Keyword",
    "Visibility": "Keyword",
    "IsConversation": "Bool",
    "VertesiaWorkflowType": "Keyword",
}
