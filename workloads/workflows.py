"""The sample workflows: deterministic code run in temporalio's sandbox.

Activities are called by name (see `workloads.shared`), so this module never imports the activity
implementations and their I/O dependencies.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from core.search_attributes import PROJECT_ID
    from workloads.shared import (
        ACTIVITY_STATE_QUERY,
        CONVERSATION_WORKFLOW,
        FLAKY_OPERATION,
        FLAKY_RETRY,
        GENERATE_ANSWER,
        INGESTION_WORKFLOW,
        MEMO_ACTIVITY_STATE,
        POST_UPDATE,
        POST_UPDATE_RETRY,
        POST_UPDATE_TIMEOUT,
        PROCESS_DOCUMENT,
        RETRYING_WORKFLOW,
        USER_INPUT_SIGNAL,
        AnswerRequest,
        ConversationInput,
        ConversationResult,
        FlakyRequest,
        FlakyResult,
        IngestionInput,
        IngestionResult,
        ProcessedDocument,
        RetryingInput,
        UpdatePosted,
        UpdateRequest,
    )


async def post_update(kind: str, message: str, details: dict[str, Any] | None = None) -> bool:
    """Post an update for the current run through the API; best effort, never fails the run."""
    info = workflow.info()
    request = UpdateRequest(
        run_id=info.run_id,
        project=info.typed_search_attributes.get(PROJECT_ID),
        type=kind,
        message=message,
        details=details,
    )
    try:
        posted: UpdatePosted = await workflow.execute_activity(
            POST_UPDATE,
            request,
            start_to_close_timeout=POST_UPDATE_TIMEOUT,
            retry_policy=POST_UPDATE_RETRY,
            result_type=UpdatePosted,
        )
    except ActivityError as err:
        if is_cancelled_exception(err):
            raise
        workflow.logger.warning("update %s not posted: %s", kind, err.cause or err)
        return False
    return posted.posted


@workflow.defn(name=INGESTION_WORKFLOW)
class StandardContentIngestion:
    """The seed's example: process one document, report progress, answer `{"success": true}`."""

    @workflow.run
    async def run(self, request: IngestionInput) -> IngestionResult:
        await post_update("UPDATE", f"Processing document {request.documentId}", {"progress": 0})
        processed: ProcessedDocument = await workflow.execute_activity(
            PROCESS_DOCUMENT,
            request,
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=20),
            result_type=ProcessedDocument,
        )
        await post_update(
            "COMPLETE",
            f"Document {request.documentId} processed",
            {"progress": 100, "characters": processed.characters},
        )
        return IngestionResult(success=True)


@workflow.defn(name=CONVERSATION_WORKFLOW)
class AgentConversation:
    """An agent conversation: each `UserInput` signal gets an ANSWER update, then the agent idles.

    `activity_state` (working / idle) is kept in the memo, where listings read it, and answered by
    the `activity_state` query. Cancelling runs the cleanup (a closing TERMINATED update) and ends
    the run CANCELED; terminating ends it at once, with no cleanup."""

    def __init__(self) -> None:
        self._inbox: list[dict[str, Any]] = []
        self._state = "idle"
        self._answered = 0

    @workflow.signal(name=USER_INPUT_SIGNAL)
    def user_input(self, payload: dict[str, Any]) -> None:
        self._inbox.append(payload if isinstance(payload, dict) else {"message": str(payload)})

    @workflow.query(name=ACTIVITY_STATE_QUERY)
    def activity_state(self) -> str:
        return self._state

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            workflow.upsert_memo({MEMO_ACTIVITY_STATE: state})

    @workflow.run
    async def run(self, request: ConversationInput) -> ConversationResult:
        if request.message:
            self._inbox.append({"message": request.message})
        try:
            while True:
                try:
                    await workflow.wait_condition(
                        lambda: bool(self._inbox), timeout=timedelta(seconds=request.max_idle_seconds)
                    )
                except TimeoutError:
                    await post_update("COMPLETE", "Conversation closed after being idle")
                    return ConversationResult(answered=self._answered, reason="idle")
                await self._answer(self._inbox.pop(0))
                if not self._inbox:
                    self._set_state("idle")
        except BaseException as err:
            if not is_cancelled_exception(err):
                raise
            await self._clean_up()
            raise

    async def _answer(self, payload: dict[str, Any]) -> None:
        self._set_state("working")
        message = payload.get("message")
        turn = self._answered + 1
        answer: str = await workflow.execute_activity(
            GENERATE_ANSWER,
            AnswerRequest(
                message=message if isinstance(message, str) else "",
                turn=turn,
                data={k: v for k, v in payload.items() if k != "message"},
            ),
            start_to_close_timeout=timedelta(seconds=60),
            result_type=str,
        )
        await post_update("ANSWER", answer, {"turn": turn})
        self._answered = turn

    async def _clean_up(self) -> None:
        reason = workflow.cancellation_reason()
        self._set_state("idle")
        message = "Conversation cancelled" + (f": {reason}" if reason else "")
        await post_update("TERMINATED", message, {"cancelled": True, "answered": self._answered})


@workflow.defn(name=RETRYING_WORKFLOW)
class RetryingActivity:
    """Runs an activity that fails `fail_attempts` times; at FLAKY_MAX_ATTEMPTS or more the run
    ends FAILED."""

    @workflow.run
    async def run(self, request: RetryingInput) -> FlakyResult:
        try:
            result: FlakyResult = await workflow.execute_activity(
                FLAKY_OPERATION,
                FlakyRequest(fail_attempts=request.fail_attempts, delay_seconds=request.delay_seconds),
                start_to_close_timeout=timedelta(seconds=max(30.0, request.delay_seconds * 2 + 10)),
                heartbeat_timeout=timedelta(seconds=5),
                retry_policy=FLAKY_RETRY,
                result_type=FlakyResult,
            )
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            cause = err.cause.message if isinstance(err.cause, ApplicationError) else str(err.cause or err)
            raise ApplicationError(f"{FLAKY_OPERATION} gave up after its retries: {cause}", non_retryable=True) from err
        return result


WORKFLOWS: list[type] = [StandardContentIngestion, AgentConversation, RetryingActivity]
