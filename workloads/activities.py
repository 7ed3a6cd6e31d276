"""The sample activities. They run outside the workflow sandbox, so they may do I/O.

`WorkloadActivities` holds what the activities need (the API's address, the key that signs the
worker's tokens, one HTTP client) and exposes them as bound methods, as temporalio's samples do
for activities with dependencies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core import tracing
from core.tokens import mint_token
from workloads.shared import (
    FLAKY_OPERATION,
    GENERATE_ANSWER,
    POST_UPDATE,
    PROCESS_DOCUMENT,
    AnswerRequest,
    FlakyRequest,
    FlakyResult,
    IngestionInput,
    ProcessedDocument,
    UpdatePosted,
    UpdateRequest,
)

log = logging.getLogger(__name__)

WORKER_USER = "worker"
WORKER_PERMISSIONS = ("workflow:run",)
HEARTBEAT_EVERY_SECONDS = 0.5


class WorkloadActivities:
    """The activities of the sample workflows.

    `api_url` None (or no `secret` to sign tokens with) turns posting updates into a no-op that
    still appears in the run's history: the workflows then run without the API, as the backend's
    integration tests do."""

    def __init__(
        self,
        *,
        api_url: str | None,
        secret: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        http_timeout: float = 5.0,
    ) -> None:
        self.api_url = api_url.rstrip("/") if api_url else None
        self._secret = secret
        self._audience = audience
        self._issuer = issuer
        self._http = httpx.AsyncClient(timeout=http_timeout)

    async def __aenter__(self) -> WorkloadActivities:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def all(self) -> Sequence[Callable[..., Any]]:
        return [self.process_document, self.post_update, self.generate_answer, self.flaky_operation]

    @activity.defn(name=PROCESS_DOCUMENT)
    async def process_document(self, request: IngestionInput) -> ProcessedDocument:
        activity.heartbeat("processing")
        # Stand-in for real work (fetch, parse, index) that is cheap enough for tests.
        text = f"Contents of document {request.documentId}"
        return ProcessedDocument(documentId=request.documentId, characters=len(text))

    @activity.defn(name=POST_UPDATE)
    async def post_update(self, request: UpdateRequest) -> UpdatePosted:
        """POST the update through the API, exactly as the seed says workflows do, naming the run's
        workflow (`workflow_id`): the API then describes the run, which it sees the moment it
        starts, instead of waiting for Temporal's listings to show it.

        Transport errors, 404, 429 and 5xx are retried by the activity's retry policy; other
        answers are final."""
        secret = self._secret
        if not self.api_url or not secret:
            return UpdatePosted(posted=False, reason="the API is not configured for this worker")
        if not request.project:
            return UpdatePosted(posted=False, reason="the run has no ProjectId")
        token = mint_token(
            secret,
            user=WORKER_USER,
            kind="service_account",
            project=request.project,
            permissions=list(WORKER_PERMISSIONS),
            ttl_seconds=300,
            audience=self._audience,
            issuer=self._issuer,
        )
        body: dict[str, Any] = {"type": request.type, "workstream_id": request.workstream_id}
        if request.message is not None:
            body["message"] = request.message
        if request.details is not None:
            body["details"] = request.details
        url = f"{self.api_url}/workflows/runs/{request.run_id}/updates"
        # The workflow that scheduled this activity is the run's own (`request.run_id` is its run).
        params = {"workflow_id": activity.info().workflow_id}
        headers = {"Authorization": f"Bearer {token}"}
        # With tracing on, the API's span for this post continues this activity's (`traceparent`).
        tracing.inject(headers)
        try:
            response = await self._http.post(url, params=params, json=body, headers=headers)
        except httpx.TransportError as err:
            raise ApplicationError(f"the API at {self.api_url} is unreachable: {err}", type="ApiUnreachable") from err
        status = response.status_code
        if 200 <= status < 300:
            return UpdatePosted(posted=True, status=status)
        problem = f"posting the update answered {status}: {response.text[:300]}"
        if status in {404, 429} or status >= 500:
            raise ApplicationError(problem, type="ApiRetryable")
        raise ApplicationError(problem, type="ApiRejected", non_retryable=True)

    @activity.defn(name=GENERATE_ANSWER)
    async def generate_answer(self, request: AnswerRequest) -> str:
        activity.heartbeat("thinking")
        # A deterministic stand-in for an LLM call.
        return f"Answer #{request.turn}: you said {request.message!r}."

    @activity.defn(name=FLAKY_OPERATION)
    async def flaky_operation(self, request: FlakyRequest) -> FlakyResult:
        """Work for `delay_seconds` while heartbeating, then fail while the attempt number is at
        most `fail_attempts`."""
        attempt = activity.info().attempt
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, request.delay_seconds)
        while True:
            activity.heartbeat({"attempt": attempt})
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(HEARTBEAT_EVERY_SECONDS, remaining))
        if attempt <= request.fail_attempts:
            raise ApplicationError(
                f"attempt {attempt} failed on purpose ({request.fail_attempts} failures configured)",
                type="PlannedFailure",
            )
        return FlakyResult(attempts=attempt)
