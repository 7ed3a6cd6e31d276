"""The runs backend over Temporal: details and history, listing, cancel and terminate, signals.

Every operation is scoped to the caller: a run is visible when its `ProjectId` search attribute is
the caller's project and, for a private run, when the caller started it or holds
`workflow:superadmin`. Anything else answers `NotFound`, exactly as a missing run does.

Every Temporal call carries an RPC timeout and each operation an overall deadline; Temporal not
answering (connection refused, UNAVAILABLE, deadline exceeded) becomes `BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import (
    GetSystemInfoRequest,
    ListWorkflowExecutionsRequest,
    ListWorkflowExecutionsResponse,
)
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle
from temporalio.converter import decode_typed_search_attributes
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from backends import temporal_connection
from backends.errors import BackendUnavailable, Conflict, Forbidden, InvalidInput, NotFound
from backends.protocol import JSON, Action, Principal, RunFilters, RunPage, RunRef
from backends.run_view import (
    RUNNING,
    HistoryView,
    RunScope,
    decode_memo,
    pending_activity,
    status_name,
    summary,
)
from backends.visibility_query import build_query, decode_page_token, encode_page_token, page_size_of, quote
from server.settings import Settings

log = logging.getLogger(__name__)

HISTORY_PAGE_SIZE = 1000
SEED_SUMMARY_FIELDS = ("status", "started_at", "closed_at", "execution_duration", "run_id", "workflow_id", "type")
RUN_CACHE_SIZE = 10_000
# Codes that mean "Temporal is not able to answer now", as opposed to "your request is wrong".
UNAVAILABLE_CODES = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.UNKNOWN,
        RPCStatusCode.INTERNAL,
    }
)
COMPLETED = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED
FAILURE_STATUSES = frozenset(
    {
        WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_FAILED,
        WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
    }
)


@dataclass(frozen=True)
class _KnownRun:
    """What never changes about a run, kept so that repeated look-ups by run id stay cheap."""

    workflow_id: str
    scope: RunScope
    closed: bool


def _not_found(workflow_id: str | None, run_id: str) -> NotFound:
    # Built from the run id alone: a missing run and another project's run read the same, whichever
    # operation (details, action, signal, updates) was asked.
    return NotFound(f"Workflow run {run_id} was not found.")


class TemporalRunsBackend:
    """`backends.protocol.RunsBackend` over a Temporal client."""

    def __init__(self, client: Client, *, timeout_seconds: float = 10.0, cache_size: int = RUN_CACHE_SIZE) -> None:
        self._client = client
        self._rpc_timeout = timedelta(seconds=timeout_seconds)
        # A whole operation may page through a long history: give it a few RPCs' worth of time.
        self._deadline = timeout_seconds * 3
        self._known: OrderedDict[str, _KnownRun] = OrderedDict()
        self._cache_size = cache_size
        self._closed_checks: dict[tuple[str, str], asyncio.Future[bool]] = {}

    @classmethod
    async def connect(cls, settings: Settings) -> TemporalRunsBackend:
        """A backend for the cluster the settings name. The connection is made lazily, so the API
        starts (and answers 503) even while Temporal is still coming up."""
        timeout = settings.backend_timeout_seconds
        client = await temporal_connection.connect(
            settings,
            lazy=True,
            retry_config=RetryConfig(
                initial_interval_millis=100,
                max_interval_millis=1000,
                max_elapsed_time_millis=timeout * 1000,
                max_retries=3,
            ),
        )
        return cls(client, timeout_seconds=timeout)

    @property
    def client(self) -> Client:
        return self._client

    # -- error translation -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _temporal(self, what: str, *, workflow_id: str | None = None, run_id: str = "") -> AsyncIterator[None]:
        """Bound the block by the operation deadline and translate Temporal's errors. With a
        `run_id`, NOT_FOUND and INVALID_ARGUMENT (a malformed id) mean the run does not exist."""
        try:
            async with asyncio.timeout(self._deadline):
                yield
        except RPCError as err:
            if err.status in UNAVAILABLE_CODES:
                raise BackendUnavailable(f"Temporal is unavailable ({what}): {err.message}") from err
            if run_id and err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                raise _not_found(workflow_id, run_id) from err
            if err.status == RPCStatusCode.INVALID_ARGUMENT:
                raise InvalidInput(f"Temporal refused the request ({what}).", details=err.message) from err
            raise
        except TimeoutError as err:
            raise BackendUnavailable(f"Temporal did not answer in time ({what}).") from err
        except RuntimeError as err:
            if "connect" not in str(err).lower():
                raise
            raise BackendUnavailable(f"Temporal is unreachable ({what}).", retry_after=5) from err

    # -- scope and cache ---------------------------------------------------------------------

    def _remember(self, run_id: str, known: _KnownRun) -> None:
        self._known[run_id] = known
        self._known.move_to_end(run_id)
        while len(self._known) > self._cache_size:
            self._known.popitem(last=False)

    def _check_scope(self, principal: Principal, scope: RunScope, workflow_id: str | None, run_id: str) -> None:
        if not scope.visible_to(principal.project_id, principal.ref, principal.superadmin):
            raise _not_found(workflow_id, run_id)

    async def _describe(
        self, principal: Principal, workflow_id: str, run_id: str
    ) -> tuple[WorkflowHandle[Any, Any], WorkflowExecutionDescription]:
        """Describe exactly this run and check the caller may see it (call inside `_temporal`)."""
        handle, description, _ = await self._describe_scoped(principal, workflow_id, run_id)
        return handle, description

    async def _describe_scoped(
        self, principal: Principal, workflow_id: str, run_id: str
    ) -> tuple[WorkflowHandle[Any, Any], WorkflowExecutionDescription, RunScope]:
        """`_describe`, and the run's scope as read from its search attributes."""
        handle = self._client.get_workflow_handle(workflow_id, run_id=run_id)
        description = await handle.describe(rpc_timeout=self._rpc_timeout)
        info = description.raw_description.workflow_execution_info
        if info.execution.run_id != run_id or info.execution.workflow_id != workflow_id:
            raise _not_found(workflow_id, run_id)
        scope = RunScope.of(description.typed_search_attributes)
        self._remember(run_id, _KnownRun(workflow_id, scope, closed=info.status != RUNNING))
        self._check_scope(principal, scope, workflow_id, run_id)
        return handle, description, scope

    # -- RunsBackend -------------------------------------------------------------------------

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, JSON]:
        async with self._temporal("describe run", workflow_id=workflow_id, run_id=run_id):
            handle, description, scope = await self._describe_scoped(principal, workflow_id, run_id)
            events = [
                event
                async for event in handle.fetch_history_events(
                    page_size=HISTORY_PAGE_SIZE, rpc_timeout=self._rpc_timeout
                )
            ]
        raw = description.raw_description
        info = raw.workflow_execution_info
        converter = self._client.data_converter
        memo = await decode_memo(converter, info.memo.fields)
        view = HistoryView(converter)
        history = await view.render(events)
        base = summary(info, description.typed_search_attributes, memo, scope=scope)
        run: dict[str, JSON] = {key: base[key] for key in SEED_SUMMARY_FIELDS}  # the seed's order first
        run.update(
            input=view.input,
            result=view.result if info.status == COMPLETED else None,
            memo=memo,
            history=history,
            pendingActivities=[pending_activity(p) for p in raw.pending_activities],
            error=(view.error or f"Workflow run {status_name(info.status).lower()}")
            if info.status in FAILURE_STATUSES
            else None,
        )
        run.update({key: value for key, value in base.items() if key not in run})
        return run

    async def list_runs(
        self, principal: Principal, filters: RunFilters, *, conversations_only: bool = False
    ) -> RunPage:
        if principal.project_id is None:
            raise Forbidden("The token has no project; workflow runs belong to a project.")
        query = build_query(
            filters,
            project_id=principal.project_id,
            principal_ref=principal.ref,
            superadmin=principal.superadmin,
            conversations_only=conversations_only,
        )
        page_size = page_size_of(filters.page_size)
        token = decode_page_token(filters.next_page_token, query) if filters.next_page_token else b""
        async with self._temporal("list runs"):
            page = await self._list(query, page_size, token)
            next_token = page.next_page_token or b""
            # Temporal may hand out a token for a page that turns out empty: look one run ahead
            # so that `has_more` is true exactly when another page exists.
            has_more = bool(next_token) and bool((await self._list(query, 1, next_token)).executions)
        runs = [await self._summary(info) for info in page.executions]
        return RunPage(
            runs=runs, next_page_token=encode_page_token(next_token, query) if has_more else None, has_more=has_more
        )

    async def _list(self, query: str, page_size: int, token: bytes) -> ListWorkflowExecutionsResponse:
        return await self._client.workflow_service.list_workflow_executions(
            ListWorkflowExecutionsRequest(
                namespace=self._client.namespace, page_size=page_size, next_page_token=token, query=query
            ),
            retry=True,
            timeout=self._rpc_timeout,
        )

    async def _summary(self, info: WorkflowExecutionInfo) -> dict[str, JSON]:
        attributes = decode_typed_search_attributes(info.search_attributes)
        scope = RunScope.of(attributes)
        self._remember(
            info.execution.run_id, _KnownRun(info.execution.workflow_id, scope, closed=info.status != RUNNING)
        )
        memo = await decode_memo(self._client.data_converter, info.memo.fields)
        return summary(info, attributes, memo, scope=scope)

    async def apply_action(
        self, principal: Principal, workflow_id: str, run_id: str, action: Action, reason: str | None
    ) -> None:
        if action not in ("cancel", "terminate"):
            raise InvalidInput("action must be cancel or terminate.")
        async with self._temporal(f"{action} run", workflow_id=workflow_id, run_id=run_id):
            handle, description = await self._describe(principal, workflow_id, run_id)
            self._ensure_open(description, run_id)
            try:
                if action == "cancel":
                    await handle.cancel(reason=reason or "", rpc_timeout=self._rpc_timeout)
                else:
                    await handle.terminate(reason=reason or None, rpc_timeout=self._rpc_timeout)
            except RPCError as err:
                await self._raise_if_closed_meanwhile(err, handle, run_id)
                raise

    async def signal(
        self, principal: Principal, workflow_id: str, run_id: str, signal_name: str, payload: dict[str, JSON]
    ) -> None:
        async with self._temporal("signal run", workflow_id=workflow_id, run_id=run_id):
            handle, description = await self._describe(principal, workflow_id, run_id)
            self._ensure_open(description, run_id)
            try:
                await handle.signal(signal_name, payload, rpc_timeout=self._rpc_timeout)
            except RPCError as err:
                await self._raise_if_closed_meanwhile(err, handle, run_id)
                raise

    @staticmethod
    def _ensure_open(description: WorkflowExecutionDescription, run_id: str) -> None:
        status = description.raw_description.workflow_execution_info.status
        if status != RUNNING:
            raise Conflict(f"Workflow run {run_id} is already closed ({status_name(status)}).")

    async def _raise_if_closed_meanwhile(self, err: RPCError, handle: WorkflowHandle[Any, Any], run_id: str) -> None:
        """Temporal answers NOT_FOUND ("workflow execution already completed") when the run
        closed between our check and the call: that is a 409, not a 404."""
        if err.status != RPCStatusCode.NOT_FOUND:
            return
        with contextlib.suppress(RPCError):
            status = (
                await handle.describe(rpc_timeout=self._rpc_timeout)
            ).raw_description.workflow_execution_info.status
            if status != RUNNING:
                raise Conflict(f"Workflow run {run_id} is already closed ({status_name(status)}).") from err

    async def find_run(self, principal: Principal, run_id: str, workflow_id: str | None = None) -> RunRef:
        known = self._known.get(run_id)
        if known is not None and workflow_id in (None, known.workflow_id):
            # What find_run decides on (the run exists, and whose it is) never changes, so a known
            # run costs no Temporal call: workflows post many updates, each one a find_run.
            self._check_scope(principal, known.scope, workflow_id, run_id)
            return self._ref(run_id, known)
        async with self._temporal("find run", workflow_id=workflow_id, run_id=run_id):
            if workflow_id is not None:
                # Describe needs no visibility index, so a run started a moment ago is found too.
                await self._describe(principal, workflow_id, run_id)
            else:
                page = await self._list(f"RunId = {quote(run_id)}", 1, b"")
                if not page.executions:
                    raise _not_found(None, run_id)
                await self._summary(page.executions[0])
        known = self._known[run_id]
        self._check_scope(principal, known.scope, workflow_id, run_id)
        return self._ref(run_id, known)

    @staticmethod
    def _ref(run_id: str, known: _KnownRun) -> RunRef:
        return RunRef(workflow_id=known.workflow_id, run_id=run_id, closed=known.closed)

    async def is_closed(self, workflow_id: str, run_id: str) -> bool:
        known = self._known.get(run_id)
        if known is not None and known.closed and known.workflow_id == workflow_id:
            return True
        # Every open stream of a run asks this on each heartbeat: concurrent askers of one run share
        # one describe instead of sending Temporal a burst (1000 streams = 1 call, not 1000).
        key = (workflow_id, run_id)
        check = self._closed_checks.get(key)
        if check is None:
            check = asyncio.ensure_future(self._describe_closed(workflow_id, run_id))
            self._closed_checks[key] = check
            check.add_done_callback(lambda _: self._closed_checks.pop(key, None))
        return await asyncio.shield(check)

    async def _describe_closed(self, workflow_id: str, run_id: str) -> bool:
        async with self._temporal("describe run", workflow_id=workflow_id, run_id=run_id):
            handle = self._client.get_workflow_handle(workflow_id, run_id=run_id)
            description = await handle.describe(rpc_timeout=self._rpc_timeout)
        info = description.raw_description.workflow_execution_info
        closed = info.status != RUNNING
        self._remember(run_id, _KnownRun(workflow_id, RunScope.of(description.typed_search_attributes), closed))
        return closed

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._rpc_timeout.total_seconds()):
                await self._client.workflow_service.get_system_info(
                    GetSystemInfoRequest(), retry=False, timeout=self._rpc_timeout
                )
        except (RPCError, RuntimeError, TimeoutError, OSError) as err:
            raise BackendUnavailable(
                f"Temporal at {self._client.service_client.config.target_host} does not answer."
            ) from err

    async def close(self) -> None:
        # temporalio clients hold no resources that need an explicit close; forget what we cached.
        self._known.clear()
