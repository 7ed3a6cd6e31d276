"""The runs backend over Temporal: details and history, listing, cancel and terminate, signals.

Every operation is scoped to the caller: a run is visible when its `ProjectId` search attribute is
the caller's project and, for a private run, when the caller started it or holds
`workflow:superadmin`. Anything else answers `NotFound`, exactly as a missing run does.

Every Temporal call carries an RPC timeout and each operation an overall deadline; Temporal not
answering (connection refused, UNAVAILABLE, deadline exceeded) becomes `BackendUnavailable`, and
Temporal refusing what the caller sent (INVALID_ARGUMENT) becomes `InvalidInput`. Temporal's own
words go to the log, never into the answer.

Run details render at most `max_history_bytes` of history: the history is read page by page and
rendered as it comes, and reading stops at the first event that does not fit.

With a codec server (TEMPORAL_CODEC_ENDPOINT: the runs' workers encode their payloads, e.g. encrypt
them), every payload shown is decoded by it first, in batches (`backends.codec_client`): one request
for what a describe holds (memo, pending activities' details and failures), one per page of history,
one per listing page (its memos); a signal's payload is encoded by it before it is sent. The codec
server not answering is `BackendUnavailable` (backend `codec`). The client's own data converter stays
plain: through it, each payload would be a request of its own, and a failure would read as an
undecodable placeholder rather than a 503. Without a codec server none of this runs.

Update operations look runs up by id (`find_run`) many times: what is learnt is kept (`_known`), and
so is, for a short while, that a run does not exist (`_missing`), or is not the run of the workflow
id asked. Streams ask whether their run has closed (`closed_status`): concurrent askers
of one run share one describe, an "open" answer is reused by every poll of the run for
`OPEN_STATUS_REUSE_SECONDS`, and a close, once seen, is answered from memory.

A look-up by run id alone lists `RunId = ...`, and Temporal's listings (its visibility store,
Elasticsearch in production) show a run a moment after it starts; a describe, which needs the
workflow id, does not lag. So a post that names no workflow id and finds nothing may be early
rather than wrong: `await_listed_run` looks again, with backoff, for `visibility_wait_seconds`
(VISIBILITY_WAIT_SECONDS), past the remembered "not found", with at most
`max_visibility_waits` (MAX_VISIBILITY_WAITS_PER_PROCESS) such waits at once
(docs/decisions/0015-visibility-lag.md).

Every call to Temporal is recorded in the metrics (`core.metrics.backend_call_done`, backend
`temporal`) by call: `describe`, `list`, `history` (one per history read: the time spent waiting
for its pages), `cancel`, `terminate`, `signal` (with a codec server, its encoding too) and `ping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import (
    DescribeWorkflowExecutionRequest,
    DescribeWorkflowExecutionResponse,
    GetSystemInfoRequest,
    ListWorkflowExecutionsRequest,
    ListWorkflowExecutionsResponse,
)
from temporalio.client import Client, WorkflowHandle, WorkflowHistoryEventFilterType
from temporalio.common import TypedSearchAttributes
from temporalio.converter import DataConverter
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from backends.codec_client import (
    CodecClient,
    RemoteCodec,
    apply_encoded_failure_attributes,
    decode_in_place,
    decoded_events,
)
from backends.page_tokens import PageTokens, page_token_key
from backends.run_view import (
    HistoryView,
    RunScope,
    decode_memo,
    is_open,
    pending_activity,
    status_name,
    summary,
)
from backends.visibility_query import build_query, page_size_of, quote
from core import temporal_connection
from core.errors import BackendUnavailable, Conflict, Forbidden, InvalidInput, NotFound, TooManyRequests
from core.metrics import backend_call_done
from core.principals import Principal
from core.protocols import JSON, Action, RunFilters, RunPage, RunRef
from core.search_attributes import decode_read
from core.settings import Settings

log = logging.getLogger(__name__)

HISTORY_PAGE_SIZE = 1000
MAX_HISTORY_BYTES = 4 * 1024 * 1024
SEED_SUMMARY_FIELDS = ("status", "started_at", "closed_at", "execution_duration", "run_id", "workflow_id", "type")
RUN_CACHE_SIZE = 10_000
MISSING_CACHE_SIZE = 10_000
# How long a describe that found a run open answers its streams' polls (`closed_status`). Streams
# poll at staggered times, each every heartbeat: without reuse, 10 000 streams over 1 000 runs send
# Temporal one describe per stream per heartbeat. With it, every stream of a run shares one describe
# per window, at the price of bounded staleness: a stream learns of a close at most this much later
# than its own describe would have told it (its `end` frame comes that much later; nothing is lost).
OPEN_STATUS_REUSE_SECONDS = 5.0
# The pauses between look-ups of a run not listed yet: doubling from the first to the longest (a
# visibility store typically refreshes every second), the last one cut to end with the window.
VISIBILITY_FIRST_PAUSE = 0.1
VISIBILITY_LONGEST_PAUSE = 1.0
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
METRICS_BACKEND = "temporal"
FAILURE_STATUSES = frozenset(
    {
        WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_FAILED,
        WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
    }
)


@dataclass(frozen=True)
class _KnownRun:
    """What is known of a run, kept so that repeated look-ups by run id stay cheap. Its ids and
    scope never change, nor does a close; "open" is only true as of `seen_at` (monotonic clock)."""

    # Its ids, whether it is closed and when (what `find_run` answers: made once, as every post of
    # a run asks for it).
    ref: RunRef
    scope: RunScope
    seen_at: float
    final_status: str | None  # e.g. "COMPLETED", for a closed run

    @property
    def workflow_id(self) -> str:
        return self.ref.workflow_id

    @property
    def closed(self) -> bool:
        return self.ref.closed


def _final_status(info: WorkflowExecutionInfo) -> str | None:
    """The run's closed status by name (`UNKNOWN` for one the API does not know); None while it is
    open."""
    return None if is_open(info) else status_name(info.status)


def _closed_at(info: WorkflowExecutionInfo) -> float | None:
    if is_open(info):
        return None
    # Temporal sets close_time on every closed run; should one lack it, count from now.
    return float(info.close_time.ToMicroseconds()) / 1e6 if info.HasField("close_time") else time.time()


def _failed(exc: BaseException) -> bool:
    """Whether a call ended by `exc` failed for the metrics: Temporal could not answer (the codes
    that become `BackendUnavailable`, no connection, a timeout), as opposed to answering no
    (NOT_FOUND, INVALID_ARGUMENT, ...)."""
    return not isinstance(exc, RPCError) or exc.status in UNAVAILABLE_CODES


@contextlib.contextmanager
def _call(call: str) -> Iterator[None]:
    """Record the block as one Temporal call in the metrics. A call cancelled by our side (the
    operation's deadline, a caller gone) is not one Temporal answered or failed: not recorded."""
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        backend_call_done(METRICS_BACKEND, call, started, failed=_failed(exc))
        raise
    backend_call_done(METRICS_BACKEND, call, started, failed=False)


async def _timed_history(events: AsyncIterable[HistoryEvent]) -> AsyncGenerator[HistoryEvent, None]:
    """`events`, the time spent waiting for them (Temporal's pages, not our rendering between
    them) recorded as one `history` call when the read ends, however it ends."""
    iterator = aiter(events)
    waited, failed = 0.0, False
    try:
        while True:
            started = time.perf_counter()
            try:
                event = await anext(iterator)
            except StopAsyncIteration:
                break
            except Exception as exc:
                failed = _failed(exc)
                raise
            finally:
                waited += time.perf_counter() - started
            yield event
    finally:
        backend_call_done(METRICS_BACKEND, "history", time.perf_counter() - waited, failed=failed)


def _not_found(run_id: str) -> NotFound:
    # Built from the run id alone: a missing run and another project's run read the same, whichever
    # operation (details, action, signal, updates) was asked.
    return NotFound(f"Workflow run {run_id} was not found.")


class TemporalRunsBackend:
    """`core.protocols.RunsBackend` over a Temporal client."""

    def __init__(
        self,
        client: Client,
        *,
        timeout_seconds: float = 10.0,
        cache_size: int = RUN_CACHE_SIZE,
        page_tokens: PageTokens | None = None,
        max_history_bytes: int = MAX_HISTORY_BYTES,
        not_found_seconds: float = 2.0,
        open_status_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        codec: CodecClient | None = None,
        visibility_wait_seconds: float = 5.0,
        max_visibility_waits: int = 100,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        # The codec server's client (closed by `close`), and a client of the same connection whose
        # converter encodes through it, for signals.
        self._codec = codec
        self._encoding_client = (
            None
            if codec is None
            else Client(
                client.service_client,
                namespace=client.namespace,
                data_converter=DataConverter(payload_codec=RemoteCodec(codec)),
            )
        )
        self._rpc_timeout = timedelta(seconds=timeout_seconds)
        # A whole operation may page through a long history: give it a few RPCs' worth of time.
        self._deadline = timeout_seconds * 3
        self._known: OrderedDict[str, _KnownRun] = OrderedDict()
        self._cache_size = cache_size
        # Status describes in flight, by (workflow id, run id): see `closed_status`.
        self._status_checks: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        # Runs a describe found open, by (workflow id, run id), until the clock passes the value
        # (`OPEN_STATUS_REUSE_SECONDS` after that describe was sent), oldest first: `closed_status`.
        self._open_until: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Without a key from the settings (`connect`), tokens work within this backend only.
        self._page_tokens = page_tokens or PageTokens(secrets.token_bytes(32))
        self._max_history_bytes = max_history_bytes
        # "Not found" answers of find_run, by (run id, workflow id asked), until the clock passes the
        # value: random run ids, and known run ids under a wrong workflow id, cost Temporal one call
        # per lifetime, not one per request.
        self._missing: OrderedDict[tuple[str, str | None], float] = OrderedDict()
        self._not_found_seconds = not_found_seconds
        # How long a run seen open is taken to be open without asking again. With the post-after-close
        # window here, a run seen open at T closed at T or later, so a post before T + window is
        # within its window whatever happened since: the policy holds without a call per post.
        self._open_status_seconds = open_status_seconds
        self._clock = clock
        # How long a run may take to be listed after it starts (`await_listed_run`), and how many
        # requests may wait for that at once: each one polls Temporal while it waits.
        self._visibility_wait_seconds = visibility_wait_seconds
        self._max_visibility_waits = max_visibility_waits
        self._visibility_waits = 0
        self._sleep = sleep

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
        return cls(
            client,
            timeout_seconds=timeout,
            page_tokens=PageTokens(page_token_key(settings)),
            max_history_bytes=settings.max_history_bytes,
            not_found_seconds=settings.not_found_cache_seconds,
            open_status_seconds=settings.post_after_close_seconds,
            codec=codec_client(settings),
            visibility_wait_seconds=settings.visibility_wait_seconds,
            max_visibility_waits=settings.max_visibility_waits_per_process,
        )

    # -- codec -------------------------------------------------------------------------------

    async def _decoded(self, *messages: Any) -> None:
        """Decode, in place and in one request, every payload of `messages` (call with a codec)."""
        assert self._codec is not None
        await decode_in_place(self._codec, messages)
        for message in messages:
            apply_encoded_failure_attributes(message)

    async def _history(self, events: AsyncIterable[HistoryEvent]) -> AsyncIterator[HistoryEvent]:
        """`events`, decoded by the codec server a page at a time."""
        assert self._codec is not None
        async for event in decoded_events(events, self._codec, batch_events=HISTORY_PAGE_SIZE):
            apply_encoded_failure_attributes(event)
            yield event

    # -- error translation -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _temporal(self, what: str, *, run_id: str = "") -> AsyncIterator[None]:
        """Bound the block by the operation deadline and translate Temporal's errors. With a
        `run_id`, NOT_FOUND and INVALID_ARGUMENT (a malformed id) mean the run does not exist."""
        try:
            async with asyncio.timeout(self._deadline):
                yield
        except RPCError as err:
            if err.status in UNAVAILABLE_CODES:
                log.warning("Temporal could not %s: %s %s", what, err.status.name, err.message)
                raise BackendUnavailable(
                    f"Temporal could not {what}: {err.status.name} {err.message}", backend="temporal"
                ) from err
            if run_id and err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                raise _not_found(run_id) from err
            if err.status == RPCStatusCode.INVALID_ARGUMENT:
                # Caused by the input (e.g. `query` names an attribute the namespace does not have):
                # the caller's to fix, in our words; Temporal's are for the log.
                log.info("Temporal refused to %s: %s", what, err.message)
                raise InvalidInput(
                    "Temporal refused this listing's filters: check `query` (an unknown search attribute,"
                    " or a value of the wrong type for its attribute)."
                ) from err
            raise
        except TimeoutError as err:
            log.warning("Temporal did not answer in time (%s)", what)
            raise BackendUnavailable(f"Temporal did not answer in time ({what}).", backend="temporal") from err
        except RuntimeError as err:
            if "connect" not in str(err).lower():
                raise
            log.warning("Temporal is unreachable (%s): %s", what, err)
            raise BackendUnavailable(f"Temporal is unreachable ({what}): {err}", backend="temporal") from err

    # -- scope and cache ---------------------------------------------------------------------

    def _remember(self, run_id: str, workflow_id: str, scope: RunScope, info: WorkflowExecutionInfo) -> None:
        before = self._known.get(run_id)
        if before is not None and before.closed and before.workflow_id == workflow_id:
            known = before  # a close is final (a listing may still show the run open for a moment)
        else:
            ref = RunRef(workflow_id=workflow_id, run_id=run_id, closed=not is_open(info), closed_at=_closed_at(info))
            known = _KnownRun(ref, scope, self._clock(), _final_status(info))
        self._known[run_id] = known
        self._known.move_to_end(run_id)
        while len(self._known) > self._cache_size:
            self._known.popitem(last=False)

    def _fresh(self, known: _KnownRun) -> bool:
        """Whether `known` can answer without Temporal: a close is final, "open" ages."""
        return known.closed or self._clock() - known.seen_at < self._open_status_seconds

    def _remember_missing(self, key: tuple[str, str | None]) -> None:
        if self._not_found_seconds <= 0:
            return
        self._missing[key] = self._clock() + self._not_found_seconds
        self._missing.move_to_end(key)
        while len(self._missing) > MISSING_CACHE_SIZE:
            self._missing.popitem(last=False)

    def _known_missing(self, key: tuple[str, str | None]) -> bool:
        until = self._missing.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._missing[key]
        return False

    def _check_scope(self, principal: Principal, scope: RunScope, run_id: str) -> None:
        if not scope.visible_to(principal.project_id, principal.ref, principal.superadmin):
            raise _not_found(run_id)

    async def _describe_raw(self, workflow_id: str, run_id: str) -> DescribeWorkflowExecutionResponse:
        """Temporal's own answer to a describe. Not the SDK's `handle.describe()`: its
        `WorkflowExecutionDescription` cannot be built for a status the SDK's client enum lacks
        (temporalio 1.35 raises ValueError for a PAUSED run), and this API shows every status."""
        with _call("describe"):
            return await self._client.workflow_service.describe_workflow_execution(
                DescribeWorkflowExecutionRequest(
                    namespace=self._client.namespace,
                    execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
                ),
                retry=True,
                timeout=self._rpc_timeout,
            )

    async def _describe(
        self, principal: Principal, workflow_id: str, run_id: str
    ) -> tuple[WorkflowHandle[Any, Any], WorkflowExecutionInfo]:
        """Describe exactly this run and check the caller may see it (call inside `_temporal`)."""
        handle, described, _, _ = await self._describe_scoped(principal, workflow_id, run_id)
        return handle, described.workflow_execution_info

    async def _describe_scoped(
        self, principal: Principal, workflow_id: str, run_id: str
    ) -> tuple[WorkflowHandle[Any, Any], DescribeWorkflowExecutionResponse, TypedSearchAttributes, RunScope]:
        """`_describe`, Temporal's whole answer, the run's search attributes and its scope as read
        from them. The attributes are decoded once per request: decoding them twice took about 7%
        of a run-details request's CPU (profiled)."""
        handle = self._client.get_workflow_handle(workflow_id, run_id=run_id)
        described = await self._describe_raw(workflow_id, run_id)
        info = described.workflow_execution_info
        if info.execution.run_id != run_id or info.execution.workflow_id != workflow_id:
            raise _not_found(run_id)
        attributes = decode_read(info.search_attributes)
        scope = RunScope.of(attributes)
        self._remember(run_id, workflow_id, scope, info)
        self._check_scope(principal, scope, run_id)
        return handle, described, attributes, scope

    # -- RunsBackend -------------------------------------------------------------------------

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, JSON]:
        converter = self._client.data_converter
        view = HistoryView(converter, max_bytes=self._max_history_bytes)
        async with self._temporal("describe run", run_id=run_id):
            handle, raw, attributes, scope = await self._describe_scoped(principal, workflow_id, run_id)
            info = raw.workflow_execution_info
            if self._codec is not None:
                for pending in raw.pending_activities:
                    # Never shown, and up to 2 MB each: sending them to the codec server would only
                    # risk its size bounds (lastFailure, which is shown, stays).
                    pending.ClearField("heartbeat_details")
                await self._decoded(info.memo, *raw.pending_activities)
            events: AsyncIterable[HistoryEvent] = _timed_history(
                handle.fetch_history_events(page_size=HISTORY_PAGE_SIZE, rpc_timeout=self._rpc_timeout)
            )
            if self._codec is not None:
                events = self._history(events)
            async for event in events:
                if not await view.add(event):
                    break  # no further page is fetched
            if view.truncated and not is_open(info):
                # The result or failure is in the close event, which was left out: read it alone.
                async for event in _timed_history(
                    handle.fetch_history_events(
                        event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT, rpc_timeout=self._rpc_timeout
                    )
                ):
                    if self._codec is not None:
                        await self._decoded(event)
                    await view.read_close_event(event)
        memo = await decode_memo(converter, info.memo.fields)
        base = summary(info, attributes, memo, scope=scope)
        run: dict[str, JSON] = {key: base[key] for key in SEED_SUMMARY_FIELDS}  # the seed's order first
        run.update(
            input=view.input,
            result=view.result if info.status == COMPLETED else None,
            memo=memo,
            history=view.events,
            pendingActivities=[pending_activity(p) for p in raw.pending_activities],
            error=(view.error or f"Workflow run {status_name(info.status).lower()}")
            if info.status in FAILURE_STATUSES
            else None,
        )
        run.update({key: value for key, value in base.items() if key not in run})
        if view.truncated:
            # Event ids count from 1 without gaps: what was not rendered is the rest of the history
            # (as long as the description says it is; a running run may have grown since).
            run["history_truncated"] = True
            run["history_events_omitted"] = max(1, int(info.history_length) - len(view.events))
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
        token = self._page_tokens.decode(filters.next_page_token, query) if filters.next_page_token else b""
        async with self._temporal("list runs"):
            page = await self._list(query, page_size, token)
            next_token = page.next_page_token or b""
            # Temporal may hand out a token for a page that turns out empty: look one run ahead
            # so that `has_more` is true exactly when another page exists.
            has_more = bool(next_token) and bool((await self._list(query, 1, next_token)).executions)
        if self._codec is not None:
            # The page's memos in one request; a page whose runs have no memo asks nothing.
            await self._decoded(*(info.memo for info in page.executions))
        runs = [await self._summary(info) for info in page.executions]
        return RunPage(
            runs=runs,
            next_page_token=self._page_tokens.encode(next_token, query) if has_more else None,
            has_more=has_more,
        )

    async def _list(self, query: str, page_size: int, token: bytes) -> ListWorkflowExecutionsResponse:
        with _call("list"):
            return await self._client.workflow_service.list_workflow_executions(
                ListWorkflowExecutionsRequest(
                    namespace=self._client.namespace, page_size=page_size, next_page_token=token, query=query
                ),
                retry=True,
                timeout=self._rpc_timeout,
            )

    async def _summary(self, info: WorkflowExecutionInfo) -> dict[str, JSON]:
        attributes = decode_read(info.search_attributes)
        scope = RunScope.of(attributes)
        self._remember(info.execution.run_id, info.execution.workflow_id, scope, info)
        memo = await decode_memo(self._client.data_converter, info.memo.fields)
        return summary(info, attributes, memo, scope=scope)

    async def apply_action(
        self, principal: Principal, workflow_id: str, run_id: str, action: Action, reason: str | None
    ) -> None:
        if action not in ("cancel", "terminate"):
            raise InvalidInput("action must be cancel or terminate.")
        async with self._temporal(f"{action} run", run_id=run_id):
            handle, info = await self._describe(principal, workflow_id, run_id)
            self._ensure_open(info, run_id)
            try:
                with _call(action):
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
        async with self._temporal("signal run", run_id=run_id):
            handle, info = await self._describe(principal, workflow_id, run_id)
            self._ensure_open(info, run_id)
            if self._encoding_client is not None:  # the payload is encoded by the codec server
                handle = self._encoding_client.get_workflow_handle(workflow_id, run_id=run_id)
            try:
                with _call("signal"):
                    await handle.signal(signal_name, payload, rpc_timeout=self._rpc_timeout)
            except RPCError as err:
                await self._raise_if_closed_meanwhile(err, handle, run_id)
                raise

    @staticmethod
    def _ensure_open(info: WorkflowExecutionInfo, run_id: str) -> None:
        if not is_open(info):
            raise Conflict(f"Workflow run {run_id} is already closed ({status_name(info.status)}).")

    async def _raise_if_closed_meanwhile(self, err: RPCError, handle: WorkflowHandle[Any, Any], run_id: str) -> None:
        """Temporal answers NOT_FOUND ("workflow execution already completed") when the run
        closed between our check and the call: that is a 409, not a 404."""
        if err.status != RPCStatusCode.NOT_FOUND:
            return
        with contextlib.suppress(RPCError):
            info = (await self._describe_raw(handle.id, run_id)).workflow_execution_info
            if not is_open(info):
                raise Conflict(f"Workflow run {run_id} is already closed ({status_name(info.status)}).") from err

    async def find_run(self, principal: Principal, run_id: str, workflow_id: str | None = None) -> RunRef:
        known = self._known.get(run_id)
        if known is not None and workflow_id in (None, known.workflow_id):
            # The run exists and whose it is never change, so a known run costs no Temporal call
            # (workflows post many updates, each one a find_run), except to learn, now and then,
            # whether an open run has closed since.
            if not self._fresh(known):
                known = await self._refresh(run_id, known)
            self._check_scope(principal, known.scope, run_id)
            return known.ref
        key = (run_id, workflow_id)
        if self._known_missing(key):
            raise _not_found(run_id)
        try:
            await self._look_up(principal, run_id, workflow_id)
        except NotFound:
            if not self._known_as(run_id, workflow_id):  # missing, rather than another caller's run
                # (a run id known under another workflow id is missing under this one: without this,
                # every such look-up would ask Temporal again, while `is_known` says it would not)
                self._remember_missing(key)
            raise
        self._missing.pop(key, None)
        known = self._known[run_id]
        self._check_scope(principal, known.scope, run_id)
        return known.ref

    async def _look_up(self, principal: Principal, run_id: str, workflow_id: str | None) -> None:
        """Ask Temporal for the run (it is remembered); NotFound when it is not there."""
        async with self._temporal("find run", run_id=run_id):
            if workflow_id is not None:
                # Describe needs no visibility index, so a run started a moment ago is found too.
                await self._describe(principal, workflow_id, run_id)
            else:
                page = await self._list(f"RunId = {quote(run_id)}", 1, b"")
                if not page.executions:
                    raise _not_found(run_id)
                info = page.executions[0]
                # Its scope is all a look-up needs: its memo is not decoded (nor sent to a codec server).
                scope = RunScope.of(decode_read(info.search_attributes))
                self._remember(info.execution.run_id, info.execution.workflow_id, scope, info)

    async def await_listed_run(
        self, principal: Principal, run_id: str, *, before_look_up: Callable[[], None]
    ) -> RunRef:
        if run_id not in self._known:  # a run already known exists: no listing lag to wait out
            if self._visibility_wait_seconds <= 0:
                raise _not_found(run_id)
            if self._visibility_waits >= self._max_visibility_waits:
                raise TooManyRequests(
                    f"This server is already waiting for {self._visibility_waits} runs to appear in Temporal's"
                    " listings; retry in 1 s, or name the run's workflow with `workflow_id`.",
                    retry_after=1,
                )
            self._visibility_waits += 1
            try:
                await self._wait_until_listed(principal, run_id, before_look_up)
            finally:
                self._visibility_waits -= 1
        # Known now: answered from what was learnt, with the caller's scope checked as always.
        return await self.find_run(principal, run_id)

    async def _wait_until_listed(self, principal: Principal, run_id: str, before_look_up: Callable[[], None]) -> None:
        """List the run again, pausing longer each time, until it is listed (it is then known) or
        the window is over: `NotFound` then, remembered as any other."""
        deadline = self._clock() + self._visibility_wait_seconds
        pause = VISIBILITY_FIRST_PAUSE
        while (left := deadline - self._clock()) > 0:
            await self._sleep(min(pause, left))
            pause = min(pause * 2, VISIBILITY_LONGEST_PAUSE)
            if run_id in self._known:
                return  # another request found it meanwhile: nothing to ask
            before_look_up()
            try:
                await self._look_up(principal, run_id, None)
            except NotFound:
                continue
            self._missing.pop((run_id, None), None)
            return
        self._remember_missing((run_id, None))
        raise _not_found(run_id)

    async def _refresh(self, run_id: str, known: _KnownRun) -> _KnownRun:
        """`known` as Temporal describes it now. While Temporal does not answer, what was known
        stands: runs already known keep taking updates through a Temporal outage."""
        try:
            await self._described_status(known.workflow_id, run_id)
        except BackendUnavailable:
            return known
        except NotFound:
            self._known.pop(run_id, None)  # gone (e.g. past the namespace's retention)
            raise
        return self._known.get(run_id, known)

    def _known_as(self, run_id: str, workflow_id: str | None) -> bool:
        """Whether the run is known, and (when one is given) under this workflow id."""
        known = self._known.get(run_id)
        return known is not None and workflow_id in (None, known.workflow_id)

    def is_known(self, run_id: str, workflow_id: str | None = None) -> bool:
        """Whether `find_run(principal, run_id, workflow_id)` will answer without calling Temporal:
        the run is known under that workflow id (closed, or seen open recently), or that pair was
        just found missing. Mirrors `find_run`'s own tests, in the same order."""
        known = self._known.get(run_id)
        if known is not None and workflow_id in (None, known.workflow_id):
            return self._fresh(known)
        until = self._missing.get((run_id, workflow_id))
        return until is not None and self._clock() < until

    async def closed_status(self, workflow_id: str, run_id: str, *, fresh: bool = False) -> str | None:
        known = self._known.get(run_id)
        if known is not None and known.closed and known.workflow_id == workflow_id:
            return known.final_status  # a close is final: no call, however many streams ask
        if not fresh and self._recently_open((workflow_id, run_id)):
            return None  # a describe found it open less than OPEN_STATUS_REUSE_SECONDS ago
        return await self._described_status(workflow_id, run_id)

    def _recently_open(self, key: tuple[str, str]) -> bool:
        until = self._open_until.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._open_until[key]
        return False

    def _remember_open(self, key: tuple[str, str], asked_at: float) -> None:
        """Reuse an "open" answer until `OPEN_STATUS_REUSE_SECONDS` after its describe was sent
        (not answered: the run may have closed while the answer travelled)."""
        self._open_until[key] = asked_at + OPEN_STATUS_REUSE_SECONDS
        self._open_until.move_to_end(key)
        # Entries come in about the order they expire: drop the expired ones at the front (any
        # other goes when it is next looked up, or as the cap pushes it out), then any beyond the cap.
        now = self._clock()
        while self._open_until and next(iter(self._open_until.values())) <= now:
            self._open_until.popitem(last=False)
        while len(self._open_until) > self._cache_size:
            self._open_until.popitem(last=False)

    async def _described_status(self, workflow_id: str, run_id: str) -> str | None:
        """The run's closed status as Temporal describes it now, or None while it is open. Every
        open stream of a run asks on each poll: concurrent askers of one run share one describe
        instead of sending Temporal a burst (1000 streams = 1 call, not 1000), and an "open"
        answer is remembered so that `closed_status` reuses it, across time, for
        `OPEN_STATUS_REUSE_SECONDS` (streams poll at staggered times, so sharing in flight alone
        still costs one describe per stream per heartbeat). `_refresh` (`find_run`) asks here too
        but never takes a reused answer: the post-after-close window, which may be shorter, bounds
        its staleness. A describe that fails is not remembered: the next poll asks again."""
        key = (workflow_id, run_id)
        check = self._status_checks.get(key)
        if check is None:
            check = asyncio.ensure_future(self._describe_status(workflow_id, run_id))
            self._status_checks[key] = check
            check.add_done_callback(lambda _: self._status_checks.pop(key, None))
        return await asyncio.shield(check)

    async def _describe_status(self, workflow_id: str, run_id: str) -> str | None:
        asked_at = self._clock()
        async with self._temporal("describe run", run_id=run_id):
            info = (await self._describe_raw(workflow_id, run_id)).workflow_execution_info
        self._remember(run_id, workflow_id, RunScope.of(decode_read(info.search_attributes)), info)
        status = _final_status(info)
        if status is None:
            self._remember_open((workflow_id, run_id), asked_at)
        else:
            self._open_until.pop((workflow_id, run_id), None)  # `_known` answers from now on
        return status

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._rpc_timeout.total_seconds()):
                with _call("ping"):
                    await self._client.workflow_service.get_system_info(
                        GetSystemInfoRequest(), retry=False, timeout=self._rpc_timeout
                    )
        except (RPCError, RuntimeError, TimeoutError, OSError) as err:
            target = self._client.service_client.config.target_host
            log.warning("Temporal at %s does not answer: %r", target, err)
            raise BackendUnavailable(f"Temporal at {target} does not answer.", backend="temporal") from err

    async def close(self) -> None:
        # temporalio clients hold no resources that need an explicit close; forget what we cached.
        self._known.clear()
        self._missing.clear()
        self._open_until.clear()
        if self._codec is not None:
            await self._codec.aclose()


def codec_client(settings: Settings) -> CodecClient | None:
    """The codec server's client the settings name (TEMPORAL_CODEC_ENDPOINT), or None."""
    if settings.temporal_codec_endpoint is None:
        return None
    return CodecClient(
        settings.temporal_codec_endpoint,
        settings.temporal_codec_auth,
        settings.temporal_namespace,
        timeout_seconds=settings.codec_timeout_seconds,
        max_response_bytes=settings.codec_max_response_bytes,
    )
