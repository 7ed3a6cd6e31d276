"""What the sample workflows, their activities, the worker and the starter share: names, the one
dataclass argument of each workflow and activity, and the search attribute keys.

Kept free of I/O so that the workflow sandbox can import it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.common import RetryPolicy

# Workflow types (what `workflow-runs start TYPE` accepts).
INGESTION_WORKFLOW = "StandardContentIngestion"
CONVERSATION_WORKFLOW = "AgentConversation"
RETRYING_WORKFLOW = "RetryingActivity"
WORKFLOW_TYPES = (INGESTION_WORKFLOW, CONVERSATION_WORKFLOW, RETRYING_WORKFLOW)

# Activity names (as they appear in run histories).
PROCESS_DOCUMENT = "processDocument"
POST_UPDATE = "postUpdate"
GENERATE_ANSWER = "generateAnswer"
FLAKY_OPERATION = "flakyOperation"

# The conversation's signal and query.
USER_INPUT_SIGNAL = "UserInput"
ACTIVITY_STATE_QUERY = "activity_state"

# Memo keys the API reads back (`activity_state`, `topic`).
MEMO_PROJECT = "project"
MEMO_INTERACTION = "interaction"
MEMO_TOPIC = "topic"
MEMO_ACTIVITY_STATE = "activity_state"

# Posting an update is best effort: a few quick attempts, then the workflow carries on without it.
POST_UPDATE_TIMEOUT = timedelta(seconds=10)
POST_UPDATE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=4),
    maximum_attempts=5,
)

# RetryingActivity's policy: `fail_attempts` >= this many makes the run fail.
FLAKY_MAX_ATTEMPTS = 5
FLAKY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=1.0,
    maximum_interval=timedelta(milliseconds=500),
    maximum_attempts=FLAKY_MAX_ATTEMPTS,
)


@dataclass
class IngestionInput:
    """StandardContentIngestion's argument; reads back in the API as `{"documentId": ...}`."""

    documentId: str  # the wire name of the seed


@dataclass
class IngestionResult:
    success: bool = True


@dataclass
class ProcessedDocument:
    documentId: str
    characters: int
    status: str = "processed"


@dataclass
class ConversationInput:
    """AgentConversation's argument. `message` is an optional first user message; the run ends
    COMPLETE after `max_idle_seconds` without input."""

    topic: str | None = None
    message: str | None = None
    max_idle_seconds: int = 24 * 3600


@dataclass
class ConversationResult:
    answered: int
    reason: str


@dataclass
class AnswerRequest:
    message: str
    turn: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RetryingInput:
    """RetryingActivity's argument: the activity fails `fail_attempts` times, each attempt working
    (and heartbeating) for `delay_seconds` first."""

    fail_attempts: int = 0
    delay_seconds: float = 0.0


@dataclass
class FlakyRequest:
    fail_attempts: int
    delay_seconds: float


@dataclass
class FlakyResult:
    attempts: int


@dataclass
class UpdateRequest:
    """One update to post through the API for a run (`POST /workflows/runs/{run_id}/updates`)."""

    run_id: str
    project: str | None
    type: str = "UPDATE"
    message: str | None = None
    details: dict[str, Any] | None = None
    workstream_id: str = "main"


@dataclass
class UpdatePosted:
    posted: bool
    status: int | None = None
    reason: str | None = None
