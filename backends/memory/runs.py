"""Workflow runs in memory: the `RunsBackend` of mock mode and of the unit tests.

It answers as `backends.temporal_runs` does, in its words: the same scope rule (the caller's
project; a private run only for whoever started it, or `workflow:superadmin`), `NotFound` for a run
the caller may not see exactly as for one that does not exist, `Conflict` for an action or a
signal on a closed run (`RUNNING` and `PAUSED` are open, an `UNKNOWN` status is open until it has
a close time, every other status is closed: `backends.run_view.is_open`'s rule), listings validated
and filtered by the same rules (`build_query` refuses what it refuses; the filters and the
`query` grammar are then evaluated here, `backends.memory.query`), signed page tokens. It also
keeps, as the real backend does, which runs it has resolved (`known`) and which ids it found
missing (`missing`), so `is_known` and the rate limits behave the same.

What grows with requests is bounded as in the real backend (`backends.temporal_runs`, whose
bounds are imported, not copied):

- `known`: the run ids resolved, least recently used dropped past `RUN_CACHE_SIZE` (10,000).
- `missing`: the (run id, workflow id asked) pairs found missing, each forgotten
  `not_found_seconds` (NOT_FOUND_CACHE_SECONDS) after it was found, the oldest dropped past
  `MISSING_CACHE_SIZE` (10,000); nothing is kept when NOT_FOUND_CACHE_SECONDS is 0. Mirrored, not
  shared: the real backend keeps this logic in private methods.
- page tokens: nothing is kept; a token carries its offset, signed with the query it belongs to.
- the runs: only the seeded (or added) ones; no request creates a run.
- waits for a run to be listed (`await_listed_run`): none. Here a run is listed as soon as it
  exists, so there is no lag to wait out: the answer is `find_run`'s, at once.
- a run's history, which each signal lengthens: as Temporal's default limits bound it, a run whose
  history reaches `HISTORY_COUNT_LIMIT` (51,200) events or `HISTORY_SIZE_LIMIT` (50 MiB, counted
  here as the events' JSON) is terminated with Temporal's reason, and takes no more signals.

State changes are what a real run would show: cancel and terminate close the run at once as
`CANCELED` / `TERMINATED` (with their history events), a signal is appended to the history.
There is no worker: nothing runs, nothing else changes.
"""

from __future__ import annotations

import copy
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from backends.memory.query import STATUS_CODES, Value, compile_query
from backends.page_tokens import PageTokens
from backends.temporal_runs import MISSING_CACHE_SIZE, RUN_CACHE_SIZE
from backends.visibility_query import build_query, confine_custom_query, page_size_of, parse_time, status_value
from core.errors import Conflict, Forbidden, InvalidInput, NotFound
from core.principals import Principal
from core.protocols import JSON, Action, RunFilters, RunPage, RunRef

RUNNING = "RUNNING"
OPEN_STATUSES = frozenset({RUNNING, "PAUSED"})
UNKNOWN = "UNKNOWN"  # a status the API does not know: closed once it has a close time
# The statuses whose details carry `error`, and the one that carries `result` (as Temporal's backend).
FAILURE_STATUSES = frozenset({"FAILED", "TIMED_OUT"})
COMPLETED = "COMPLETED"
SUMMARY_FIELDS = (
    "status",
    "started_at",
    "closed_at",
    "execution_duration",
    "run_id",
    "workflow_id",
    "type",
    "initiated_by",
    "vertesia_workflow_type",
    "visibility",
    "interactive",
    "interaction_name",
    "activity_state",
    "topic",
)
CLOSE_EVENTS = {"CANCELED": "CANCELED", "TERMINATED": "TERMINATED"}  # action status -> event suffix
NANOS = 1_000_000_000
# A status this API does not know is one Temporal added after it: numbered after every known one.
UNKNOWN_STATUS_CODE = max(STATUS_CODES.values()) + 1
# Temporal's default history limits (limit.historyCount.error, limit.historySize.error): a run
# whose history reaches either is terminated, with Temporal's reason.
HISTORY_COUNT_LIMIT = 51_200
HISTORY_SIZE_LIMIT = 50 * 1024 * 1024
HISTORY_LIMIT_REASON = "Workflow history size / count exceeds limit."


def not_found(run_id: str) -> NotFound:
    return NotFound(f"Workflow run {run_id} was not found.")  # the Temporal backend's words


def already_closed(run_id: str, status: str) -> Conflict:
    return Conflict(f"Workflow run {run_id} is already closed ({status}).")  # the Temporal backend's words


@dataclass
class MemoryRun:
    """One run: its details (`WorkflowRun`, as `get_run` answers them) and what scopes it."""

    details: dict[str, JSON]
    project_id: str
    # Search attributes that are not part of the answer (DocumentId, EventName, RuleId, ...).
    attributes: dict[str, JSON] = field(default_factory=dict)
    # What `find_run` says of the close time (epoch seconds); None: it cannot tell.
    closed_at: float | None = None
    # The history's size as JSON, kept as events are recorded (None: not counted yet). Not copied
    # by `dataclasses.replace`, which may give the copy other details.
    history_bytes: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def run_id(self) -> str:
        return str(self.details["run_id"])

    @property
    def workflow_id(self) -> str:
        return str(self.details["workflow_id"])

    @property
    def status(self) -> str:
        return str(self.details["status"])

    @property
    def closed(self) -> bool:
        if self.status == UNKNOWN:
            return self.details.get("closed_at") is not None
        return self.status not in OPEN_STATUSES

    def visible_to(self, principal: Principal) -> bool:
        if principal.project_id is None or principal.project_id != self.project_id:
            return False
        private = self.details.get("visibility") == "private"
        return principal.superadmin or not private or self.details.get("initiated_by") == principal.ref

    def view(self, now: float) -> dict[str, JSON]:
        """The details as of `now` (a running run's duration grows)."""
        details = copy.deepcopy(self.details)
        if not self.closed:
            details["execution_duration"] = max(0, int(now) - int(details["started_at"]))
        return details

    def summary(self, now: float) -> dict[str, JSON]:
        details = self.view(now)
        return {name: details[name] for name in SUMMARY_FIELDS if name in details}

    def search_attributes(self) -> dict[str, Value]:
        """The run as Temporal's visibility store holds it, by the names of its query language
        (`backends.memory.query.ATTRIBUTE_TYPES`): times and the duration in nanoseconds, the status
        as its number; the duration and history length are NULL until the run closes, as there."""
        d = self.details
        closed_at = d.get("closed_at") if self.closed else None
        started = int(d["started_at"]) * NANOS
        status = "".join(part.capitalize() for part in self.status.split("_"))
        duration = d.get("execution_duration")

        def text(value: JSON) -> str | None:
            return None if value is None else str(value)

        return {
            "WorkflowId": self.workflow_id,
            "RunId": self.run_id,
            "RootWorkflowId": self.workflow_id,  # a top-level run is its own root
            "RootRunId": self.run_id,
            "WorkflowType": text(d.get("type")),
            "VertesiaWorkflowType": text(d.get("vertesia_workflow_type")),
            "ExecutionStatus": STATUS_CODES.get(status, UNKNOWN_STATUS_CODE),
            "StartTime": started,
            "ExecutionTime": started,
            "CloseTime": None if closed_at is None else int(closed_at) * NANOS,
            "ExecutionDuration": None if closed_at is None or duration is None else int(duration) * NANOS,
            "HistoryLength": None if closed_at is None else len(d.get("history") or []),
            "InteractionName": text(d.get("interaction_name")),
            "DocumentId": text(self.attributes.get("document_id")),
            "EventName": text(self.attributes.get("event_name")),
            "RuleId": text(self.attributes.get("rule_id")),
            "TaskQueue": text(self.attributes.get("task_queue")),
        }


class MemoryRuns:
    """`core.protocols.RunsBackend` over runs kept in this process's memory."""

    def __init__(
        self,
        runs: list[MemoryRun] | None = None,
        *,
        page_tokens: PageTokens | None = None,
        clock: Callable[[], float] = time.time,
        not_found_seconds: float = 2.0,
        cache_size: int = RUN_CACHE_SIZE,
        cache_clock: Callable[[], float] = time.monotonic,
        history_limits: tuple[int, int] = (HISTORY_COUNT_LIMIT, HISTORY_SIZE_LIMIT),
    ) -> None:
        self._runs: dict[str, MemoryRun] = {}
        self._page_tokens = page_tokens or PageTokens(secrets.token_bytes(32))
        self._clock = clock  # the runs' times (epoch seconds)
        # Run ids resolved once, least recently used first, as the real backend's `_known`.
        self.known: OrderedDict[str, None] = OrderedDict()
        self._cache_size = cache_size
        # (run id, workflow id asked) found missing -> when it is forgotten (`cache_clock`), as the
        # real backend's `_missing`: a random run id is remembered for a while, not forever.
        self.missing: OrderedDict[tuple[str, str | None], float] = OrderedDict()
        self._not_found_seconds = not_found_seconds
        self._cache_clock = cache_clock
        self._history_count_limit, self._history_size_limit = history_limits  # events, JSON bytes
        for run in runs or []:
            self.add(run)

    def add(self, run: MemoryRun) -> MemoryRun:
        """Keep `run` (replacing one of the same run id)."""
        self._runs[run.run_id] = run
        return run

    def run(self, run_id: str) -> MemoryRun | None:
        return self._runs.get(run_id)

    def runs(self) -> list[MemoryRun]:
        return list(self._runs.values())

    def _visible(self, principal: Principal, workflow_id: str | None, run_id: str) -> MemoryRun:
        run = self._runs.get(run_id)
        if run is None or workflow_id not in (None, run.workflow_id) or not run.visible_to(principal):
            raise not_found(run_id)
        return run

    # -- RunsBackend -------------------------------------------------------------------------

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, JSON]:
        run = self._visible(principal, workflow_id, run_id)
        self._remember(run_id)
        return run.view(self._clock())

    async def list_runs(
        self, principal: Principal, filters: RunFilters, *, conversations_only: bool = False
    ) -> RunPage:
        if principal.project_id is None:
            raise Forbidden("The token has no project; workflow runs belong to a project.")
        # The real query, built for its refusals (and the page token's binding); evaluated here.
        query = build_query(
            filters,
            project_id=principal.project_id,
            principal_ref=principal.ref,
            superadmin=principal.superadmin,
            conversations_only=conversations_only,
        )
        page_size = page_size_of(filters.page_size)
        offset = 0
        if filters.next_page_token:
            offset = int.from_bytes(self._page_tokens.decode(filters.next_page_token, query), "big")
        # Compiled before any run is looked at: what Temporal refuses is refused, whatever the runs.
        custom = _given(filters.query)
        matches = compile_query(confine_custom_query(custom)) if custom is not None else None
        selected = [
            run
            for run in self._runs.values()
            if run.visible_to(principal)
            and (not conversations_only or bool(run.details.get("interactive")))
            and _matches(run, filters)
            and (matches is None or matches(run.search_attributes()))
        ]
        # Open runs first, then the most recently started (Temporal's listing order).
        selected.sort(key=lambda run: (run.closed, -int(run.details["started_at"]), run.run_id))
        page = selected[offset : offset + page_size]
        for run in page:
            self._remember(run.run_id)
        has_more = offset + page_size < len(selected)
        token = self._page_tokens.encode((offset + page_size).to_bytes(8, "big"), query) if has_more else None
        now = self._clock()
        return RunPage(runs=[run.summary(now) for run in page], next_page_token=token, has_more=has_more)

    async def apply_action(
        self, principal: Principal, workflow_id: str, run_id: str, action: Action, reason: str | None
    ) -> None:
        if action not in ("cancel", "terminate"):
            raise InvalidInput("action must be cancel or terminate.")
        run = self._visible(principal, workflow_id, run_id)
        if run.closed:
            raise already_closed(run_id, run.status)
        now = int(self._clock())
        if action == "cancel":
            self._record(run, "EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED", now, reason=reason or "")
            self._close(run, "CANCELED", "EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED", now)
        else:
            self._close(run, "TERMINATED", "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED", now, reason=reason or "")

    async def signal(
        self, principal: Principal, workflow_id: str, run_id: str, signal_name: str, payload: dict[str, JSON]
    ) -> None:
        run = self._visible(principal, workflow_id, run_id)
        if run.closed:
            raise already_closed(run_id, run.status)
        signal = {"name": signal_name, "input": [copy.deepcopy(payload)]}
        now = int(self._clock())
        self._record(run, "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED", now, signal=signal)
        # Signals are what makes a mock run's history grow: bounded as Temporal bounds it.
        events = len(run.details["history"])
        if events + 1 >= self._history_count_limit or (run.history_bytes or 0) >= self._history_size_limit:
            self._close(run, "TERMINATED", "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED", now, reason=HISTORY_LIMIT_REASON)

    async def find_run(self, principal: Principal, run_id: str, workflow_id: str | None = None) -> RunRef:
        # As the real backend: a run that exists is remembered even when this caller may not see
        # it; a run id that does not exist under the workflow id asked is remembered as missing.
        run = self._runs.get(run_id)
        key = (run_id, workflow_id)
        if run is not None and workflow_id in (None, run.workflow_id):
            if run_id not in self.known:  # a look-up of a known run asks nothing and learns nothing
                self._remember(run_id)
            self.missing.pop(key, None)
        elif not self.is_known(run_id, workflow_id):  # a remembered miss is not asked again
            self._remember_missing(key)
        run = self._visible(principal, workflow_id, run_id)
        return RunRef(
            workflow_id=run.workflow_id,
            run_id=run_id,
            closed=run.closed,
            closed_at=run.closed_at if run.closed else None,
        )

    async def await_listed_run(
        self, principal: Principal, run_id: str, *, before_look_up: Callable[[], None]
    ) -> RunRef:
        # Nothing lags here: a run that is not found now never will be (no request creates one).
        return await self.find_run(principal, run_id)

    async def closed_status(self, workflow_id: str, run_id: str, *, fresh: bool = False) -> str | None:
        del fresh  # in memory every answer is fresh
        run = self._runs.get(run_id)
        if run is None or run.workflow_id != workflow_id:
            raise not_found(run_id)
        return None if not run.closed else run.status

    def is_known(self, run_id: str, workflow_id: str | None = None) -> bool:
        run = self._runs.get(run_id)
        if run_id in self.known and run is not None and workflow_id in (None, run.workflow_id):
            return True
        until = self.missing.get((run_id, workflow_id))
        return until is not None and self._cache_clock() < until

    # -- what is remembered (the real backend's bounds) --------------------------------------

    def _remember(self, run_id: str) -> None:
        self.known[run_id] = None
        self.known.move_to_end(run_id)
        while len(self.known) > self._cache_size:
            self.known.popitem(last=False)

    def _remember_missing(self, key: tuple[str, str | None]) -> None:
        """As `TemporalRunsBackend._remember_missing`, with expired entries also dropped here
        (there, a look-up drops its own expired entry; here nothing looks them up again)."""
        if self._not_found_seconds <= 0:
            return
        now = self._cache_clock()
        self.missing[key] = now + self._not_found_seconds
        self.missing.move_to_end(key)
        while self.missing and (len(self.missing) > MISSING_CACHE_SIZE or next(iter(self.missing.values())) <= now):
            self.missing.popitem(last=False)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        # As the real backend: what was remembered is forgotten.
        self.known.clear()
        self.missing.clear()

    # -- state changes -----------------------------------------------------------------------

    @staticmethod
    def _record(run: MemoryRun, event_type: str, now: int, **extra: JSON) -> None:
        history: list[dict[str, JSON]] = run.details.setdefault("history", [])
        if run.history_bytes is None:
            run.history_bytes = len(orjson.dumps(history))
        # Event ids increase along the history: the next is the last one's successor.
        event_id = int(history[-1].get("event_id", 0)) + 1 if history else 1
        event = {
            "event_id": event_id,
            "event_time": now,
            "event_type": event_type,
            "task_id": str(event_id),
            "attempt": 0,
        } | extra
        history.append(event)
        run.history_bytes += len(orjson.dumps(event)) + 1

    def _close(self, run: MemoryRun, status: str, event_type: str, now: int, **extra: JSON) -> None:
        self._record(run, event_type, now, **extra)
        details = run.details
        started = int(details["started_at"])
        details.update(
            status=status,
            closed_at=now,
            execution_duration=max(0, now - started),
            result=None,
            error=None,
            pendingActivities=[],
        )
        run.closed_at = float(now)


def _matches(run: MemoryRun, filters: RunFilters) -> bool:
    """Whether the run passes the listing's filters other than `query` (already validated by
    `build_query`)."""
    d = run.details
    checks = [
        _equal(run.attributes.get(name), getattr(filters, name)) for name in ("document_id", "event_name", "rule_id")
    ]
    checks.append(_equal(d.get("initiated_by"), filters.initiated_by))
    kind = _given(filters.type)
    checks.append(kind is None or kind in (d.get("type"), d.get("vertesia_workflow_type")))
    status = _given(filters.status)
    checks.append(status is None or status_value(status).lower() == run.status.replace("_", "").lower())
    started = datetime.fromtimestamp(int(d["started_at"]), UTC)
    start, end = _given(filters.start), _given(filters.end)
    checks.append(start is None or started >= parse_time("start", start))
    checks.append(end is None or started <= parse_time("end", end, end_of_day=True))
    checks.append(_search_term_matches(d, _given(filters.search_term)))
    return all(checks)


def _equal(value: JSON, wanted: str | None) -> bool:
    wanted = _given(wanted)
    return wanted is None or value == wanted


def _search_term_matches(details: dict[str, JSON], term: str | None) -> bool:
    """`search_term` as `build_query` writes it: an exact type, workflow or run id, or a prefix of
    the types or the workflow id."""
    if term is None:
        return True
    term = term.strip()
    names = (details.get("type"), details.get("vertesia_workflow_type"), details.get("workflow_id"))
    if term in (*names, details.get("run_id")):
        return True
    return any(isinstance(name, str) and name.startswith(term) for name in names)


def _given(value: str | None) -> str | None:
    """A filter value as `build_query` reads it: None when absent or blank."""
    return value if value is not None and value.strip() else None
