"""Start a sample workflow the way the project's runs are started: with the search attributes the
API scopes and filters on, and a memo the API reads back (`workflow-runs start` calls this)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from core.search_attributes import (
    ACCOUNT_ID,
    DOCUMENT_ID,
    EVENT_NAME,
    INITIATED_BY,
    INTERACTION_NAME,
    IS_CONVERSATION,
    PROJECT_ID,
    RULE_ID,
    VERTESIA_WORKFLOW_TYPE,
    VISIBILITY,
)
from workloads.shared import (
    CONVERSATION_WORKFLOW,
    INGESTION_WORKFLOW,
    MEMO_ACTIVITY_STATE,
    MEMO_INTERACTION,
    MEMO_PROJECT,
    MEMO_TOPIC,
    WORKFLOW_TYPES,
    ConversationInput,
    IngestionInput,
    RetryingInput,
)

VISIBILITIES = ("project", "private")
START_TIMEOUT = timedelta(seconds=10)
DEFAULT_INTERACTION = "default"


def principal_ref(user: str) -> str:
    """`user:123` for a bare id; a reference that already names its kind (`apikey:abc`) as is."""
    return user if ":" in user else f"user:{user}"


def _argument(workflow_type: str, given: dict[str, Any], document_id: str | None) -> Any:
    if workflow_type == INGESTION_WORKFLOW:
        doc = given.get("documentId", document_id)
        if not isinstance(doc, str) or not doc:
            raise ValueError(f'{INGESTION_WORKFLOW} needs an input {{"documentId": ...}} or a document id')
        return IngestionInput(documentId=doc)
    if workflow_type == CONVERSATION_WORKFLOW:
        defaults = ConversationInput()
        return ConversationInput(
            topic=given.get("topic", defaults.topic),
            message=given.get("message", defaults.message),
            max_idle_seconds=int(given.get("max_idle_seconds", defaults.max_idle_seconds)),
        )
    return RetryingInput(
        fail_attempts=int(given.get("fail_attempts", 0)), delay_seconds=float(given.get("delay_seconds", 0.0))
    )


async def start_workflow(
    client: Client,
    workflow_type: str,
    *,
    project: str,
    user: str,
    input: dict[str, Any] | None = None,
    visibility: str = "project",
    interaction: str | None = None,
    document_id: str | None = None,
    event_name: str | None = None,
    rule_id: str | None = None,
    task_queue: str,
    account: str | None = None,
    workflow_id: str | None = None,
) -> tuple[str, str]:
    """Start `workflow_type` for `project` on behalf of `user`; return `(workflow_id, run_id)`.

    `account` defaults to the one `core.tokens.mint_token` puts in dev tokens (`acct-<project>`)."""
    if workflow_type not in WORKFLOW_TYPES:
        raise ValueError(f"unknown workflow type {workflow_type!r}: one of {', '.join(WORKFLOW_TYPES)}")
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}")
    if input is not None and not isinstance(input, dict):
        raise ValueError("input must be a JSON object")
    given = dict(input or {})
    argument = _argument(workflow_type, given, document_id)
    conversation = workflow_type == CONVERSATION_WORKFLOW
    if conversation and interaction is None:
        interaction = DEFAULT_INTERACTION
    if isinstance(argument, IngestionInput) and document_id is None:
        document_id = argument.documentId

    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(PROJECT_ID, project),
        SearchAttributePair(ACCOUNT_ID, account or f"acct-{project}"),
        SearchAttributePair(INITIATED_BY, principal_ref(user)),
        SearchAttributePair(VISIBILITY, visibility),
        SearchAttributePair(IS_CONVERSATION, conversation),
        SearchAttributePair(VERTESIA_WORKFLOW_TYPE, workflow_type),
    ]
    for key, value in (
        (DOCUMENT_ID, document_id),
        (EVENT_NAME, event_name),
        (RULE_ID, rule_id),
        (INTERACTION_NAME, interaction),
    ):
        if value:
            pairs.append(SearchAttributePair(key, value))

    memo: dict[str, Any] = {MEMO_PROJECT: project}
    if interaction:
        memo[MEMO_INTERACTION] = interaction
    if isinstance(argument, ConversationInput):
        if argument.topic:
            memo[MEMO_TOPIC] = argument.topic
        memo[MEMO_ACTIVITY_STATE] = "idle"

    handle = await client.start_workflow(
        workflow_type,
        argument,
        id=workflow_id or f"{workflow_type}-{uuid.uuid4()}",
        task_queue=task_queue,
        search_attributes=TypedSearchAttributes(pairs),
        memo=memo,
        rpc_timeout=START_TIMEOUT,
    )
    run_id = handle.result_run_id or handle.run_id
    assert run_id is not None  # start_workflow always knows the run it started
    return handle.id, run_id
