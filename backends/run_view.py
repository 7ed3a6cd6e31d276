"""Turn what Temporal says about a run into the API's JSON shapes (the document's `WorkflowRun` and its parts).

Times are integer epoch seconds; payloads are decoded with the client's data converter (a payload
that cannot be decoded is shown as a short placeholder rather than failing the whole answer).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType, PendingActivityState, WorkflowExecutionStatus
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflow.v1 import PendingActivityInfo, WorkflowExecutionInfo
from temporalio.common import TypedSearchAttributes
from temporalio.converter import DataConverter

from backends.visibility_query import UNKNOWN_INITIATOR
from core.search_attributes import (
    INITIATED_BY,
    INTERACTION_NAME,
    IS_CONVERSATION,
    PROJECT_ID,
    VERTESIA_WORKFLOW_TYPE,
    VISIBILITY,
)

JSON = Any
JSON_PLAIN = b"json/plain"  # the payload encoding of JSON values (temporalio's default converter)

STATUS_PREFIX = "WORKFLOW_EXECUTION_STATUS_"
ACTIVITY_STATE_PREFIX = "PENDING_ACTIVITY_STATE_"
ACTIVITY_STATES = frozenset({"working", "idle"})
RUNNING = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
PAUSED = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_PAUSED
# Paused runs are open: they take actions, signals and updates, and their streams stay open.
OPEN_STATUSES = frozenset({int(RUNNING), int(PAUSED)})
# The values of the document's `WorkflowRunStatus` (a unit test holds the two equal). A status
# Temporal reports that is not among them (one a newer Temporal added) is answered as UNKNOWN_STATUS,
# which the document lists, rather than failing the answer's validation with a 500.
DOCUMENTED_STATUSES = frozenset(
    {"RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELED", "TERMINATED", "CONTINUED_AS_NEW", "TIMED_OUT"}
)
UNKNOWN_STATUS = "UNKNOWN"
# The protobuf enum wrappers resolve every member through `__getattr__` and every `Name()` through
# the descriptor: read them once, as plain ints and strings.
_EV: Any = SimpleNamespace(**dict(EventType.items()))
_EVENT_NAMES: dict[int, str] = {int(value): name for name, value in EventType.items()}
_STATUS_NAMES: dict[int, str] = {
    int(value): name.removeprefix(STATUS_PREFIX) for name, value in WorkflowExecutionStatus.items()
}
_ACTIVITY_STATE_NAMES: dict[int, str] = {
    int(value): name.removeprefix(ACTIVITY_STATE_PREFIX) for name, value in PendingActivityState.items()
}


def status_name(status: int) -> str:
    """`WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW` -> `CONTINUED_AS_NEW`; `UNKNOWN` for a status
    the document does not list (or this SDK cannot name)."""
    name = _STATUS_NAMES.get(status)
    return name if name in DOCUMENTED_STATUSES else UNKNOWN_STATUS


def is_open(info: WorkflowExecutionInfo) -> bool:
    """Whether the run is open: RUNNING or PAUSED; for a status the API does not know, open unless
    Temporal gave it a close time (which it sets on every closed run)."""
    if info.status in OPEN_STATUSES:
        return True
    return status_name(info.status) == UNKNOWN_STATUS and not info.HasField("close_time")


def seconds(stamp: Timestamp) -> int:
    return int(stamp.seconds)


def _optional_seconds(message: Any, name: str) -> int | None:
    return seconds(getattr(message, name)) if message.HasField(name) else None


def jsonable(value: Any) -> JSON:
    """A decoded payload as JSON-ready data (bytes as base64, unknown objects as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


async def decode_payloads(converter: DataConverter, payloads: Iterable[Payload]) -> list[JSON]:
    out: list[JSON] = []
    for payload in payloads:
        if converter.payload_codec is None and payload.metadata.get("encoding") == JSON_PLAIN:
            # What the default converter would do (json.loads), without its dispatch: a run's
            # history is mostly JSON payloads, and decoding them was ~5% of a details request.
            try:
                out.append(orjson.loads(payload.data))
                continue
            except orjson.JSONDecodeError:
                pass  # e.g. NaN, which Python's json reads: the converter decides
        try:
            decoded = await converter.decode([payload])
            out.append(jsonable(decoded[0]))
        except Exception:  # a payload of an encoding or codec this server does not have
            encoding = payload.metadata.get("encoding", b"").decode("utf-8", "replace")
            out.append(f"<undecodable payload ({encoding or 'unknown encoding'}, {len(payload.data)} bytes)>")
    return out


async def decode_memo(converter: DataConverter, fields: Mapping[str, Payload]) -> dict[str, JSON]:
    names = sorted(fields)
    values = await decode_payloads(converter, [fields[name] for name in names])
    return dict(zip(names, values, strict=True))


def failure_message(failure: Failure) -> str:
    """The failure's own message, or the first message down its cause chain."""
    current: Failure | None = failure
    while current is not None:
        if current.message:
            return str(current.message)
        current = current.cause if current.HasField("cause") else None
    return "failed"


@dataclass(frozen=True)
class RunScope:
    """The search attributes that decide who may see a run."""

    project_id: str | None
    initiated_by: str
    visibility: str
    conversation: bool

    @classmethod
    def of(cls, attributes: TypedSearchAttributes) -> RunScope:
        return cls(
            project_id=attributes.get(PROJECT_ID),
            initiated_by=attributes.get(INITIATED_BY) or UNKNOWN_INITIATOR,
            visibility=attributes.get(VISIBILITY) or "project",
            conversation=bool(attributes.get(IS_CONVERSATION)),
        )

    def visible_to(self, project_id: str | None, principal_ref: str, superadmin: bool) -> bool:
        if project_id is None or self.project_id != project_id:
            return False
        return superadmin or self.visibility != "private" or self.initiated_by == principal_ref


def summary(
    info: WorkflowExecutionInfo,
    attributes: TypedSearchAttributes,
    memo: Mapping[str, JSON],
    *,
    now: float | None = None,
    scope: RunScope | None = None,
) -> dict[str, JSON]:
    """A WorkflowRunSummary: what listings show for each run (`scope`: `RunScope.of(attributes)`,
    when the caller has it already)."""
    running = is_open(info)
    started = seconds(info.start_time)
    closed = None if running or not info.HasField("close_time") else seconds(info.close_time)
    end = closed if closed is not None else int(now if now is not None else time.time())
    if scope is None:
        scope = RunScope.of(attributes)
    run: dict[str, JSON] = {
        "status": status_name(info.status),
        "started_at": started,
        "closed_at": closed,
        "execution_duration": max(0, end - started),
        "run_id": info.execution.run_id,
        "workflow_id": info.execution.workflow_id,
        "type": info.type.name,
        "initiated_by": scope.initiated_by,
        "vertesia_workflow_type": attributes.get(VERTESIA_WORKFLOW_TYPE) or info.type.name,
        "visibility": scope.visibility,
        "interactive": scope.conversation,
    }
    interaction = attributes.get(INTERACTION_NAME)
    if interaction:
        run["interaction_name"] = interaction
    state = memo.get("activity_state")
    if isinstance(state, str) and state in ACTIVITY_STATES:
        run["activity_state"] = state
    topic = memo.get("topic")
    if isinstance(topic, str) and topic:
        run["topic"] = topic
    return run


def pending_activity(info: PendingActivityInfo) -> dict[str, JSON]:
    state = _ACTIVITY_STATE_NAMES.get(info.state)
    if state is None:
        state = PendingActivityState.Name(info.state).removeprefix(ACTIVITY_STATE_PREFIX)
    if info.paused or state == "PAUSE_REQUESTED":
        state = "PAUSED"
    return {
        "activityId": info.activity_id,
        "activityType": info.activity_type.name,
        "state": state,
        "attempt": int(info.attempt),
        "maximumAttempts": int(info.maximum_attempts),
        "lastFailure": failure_message(info.last_failure) if info.HasField("last_failure") else None,
        "lastStartedTime": _optional_seconds(info, "last_started_time"),
        "lastHeartbeatTime": _optional_seconds(info, "last_heartbeat_time"),
    }


@dataclass
class _ActivityIndex:
    """What later activity events need from their scheduled and started events."""

    scheduled: dict[int, tuple[str, str, list[JSON]]] = field(default_factory=dict)  # id -> name, id, input
    started_by_scheduled: dict[int, int] = field(default_factory=dict)
    # The `activity` objects already rendered for an activity that has not started yet: they get
    # its `startedEventId` once its started event comes (the history is rendered in one pass).
    waiting_for_start: dict[int, list[dict[str, JSON]]] = field(default_factory=dict)


_ACTIVITY_ATTRIBUTES = {
    _EV.EVENT_TYPE_ACTIVITY_TASK_STARTED: "activity_task_started_event_attributes",
    _EV.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    _EV.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    _EV.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
    _EV.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED: "activity_task_cancel_requested_event_attributes",
    _EV.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
}
# Room kept, in the size count, for the `"startedEventId":"<id>"` an activity object may get later.
_STARTED_ID_ROOM = len(',"startedEventId":""') + 20


def json_size(value: JSON) -> int:
    """The length of `value` serialised as compact JSON."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # an integer beyond 64 bits (decoded by the standard library): rare
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


class HistoryView:
    """Renders a run's history events in the seed's shape, one event at a time, oldest first, and
    what the run details take from them (input, result, error).

    With `max_bytes`, the rendered events stay within that many bytes of JSON: `add` refuses the
    event that would not fit, and the caller stops reading the history there (`truncated`)."""

    def __init__(self, converter: DataConverter, *, max_bytes: int | None = None) -> None:
        self.converter = converter
        self.input: JSON = None
        self.result: JSON = None
        self.error: str | None = None
        self.events: list[dict[str, JSON]] = []
        self.truncated = False
        self._max_bytes = max_bytes
        self._size = 2  # the array's brackets
        self._index = _ActivityIndex()

    async def _first(self, payloads: Payloads) -> JSON:
        values = await decode_payloads(self.converter, payloads.payloads)
        return values[0] if values else None

    async def add(self, event: HistoryEvent) -> bool:
        """Render the next event; False when it does not fit (it and every later event are left out)."""
        if self.truncated:
            return False
        out = await self._event(event, self._index)
        size = json_size(out) + 1  # and the comma before it
        activity = out.get("activity")
        if isinstance(activity, dict) and "startedEventId" not in activity:
            size += _STARTED_ID_ROOM
        if self._max_bytes is not None and self._size + size > self._max_bytes:
            self.truncated = True
            return False
        self._size += size
        self.events.append(out)
        return True

    async def render(self, events: Iterable[HistoryEvent]) -> list[dict[str, JSON]]:
        """Every event of `events` that fits."""
        for event in events:
            if not await self.add(event):
                break
        return self.events

    async def read_close_event(self, event: HistoryEvent) -> None:
        """Take the run's result or failure from its close event, when the rendered history stopped
        before it (the event itself is not rendered)."""
        await self._event(event, _ActivityIndex())

    @staticmethod
    def _activity(index: _ActivityIndex, scheduled_id: int) -> dict[str, JSON]:
        name, activity_id, decoded = index.scheduled.get(scheduled_id, ("", "", []))
        activity: dict[str, JSON] = {
            "name": name,
            "id": activity_id,
            "input": decoded,
            "scheduledEventId": str(scheduled_id),
        }
        started = index.started_by_scheduled.get(scheduled_id)
        if started is not None:  # absent until the activity started (or while it is retrying)
            activity["startedEventId"] = str(started)
        else:
            index.waiting_for_start.setdefault(scheduled_id, []).append(activity)
        return activity

    @staticmethod
    def _started(index: _ActivityIndex, scheduled_id: int, started_id: int) -> None:
        index.started_by_scheduled[scheduled_id] = started_id
        for activity in index.waiting_for_start.pop(scheduled_id, ()):
            activity["startedEventId"] = str(started_id)

    async def _event(self, event: HistoryEvent, index: _ActivityIndex) -> dict[str, JSON]:
        kind = event.event_type
        out: dict[str, JSON] = {
            "event_id": int(event.event_id),
            "event_time": seconds(event.event_time),
            "event_type": _EVENT_NAMES[kind] if kind in _EVENT_NAMES else EventType.Name(kind),
            "task_id": str(event.task_id),
            "attempt": 0,
        }
        if kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            self.input = await self._first(event.workflow_execution_started_event_attributes.input)
        elif kind == _EV.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            decoded = await decode_payloads(self.converter, attrs.input.payloads)
            index.scheduled[event.event_id] = (attrs.activity_type.name, attrs.activity_id, decoded)
            out["activity"] = self._activity(index, event.event_id)
        elif kind in _ACTIVITY_ATTRIBUTES:
            await self._activity_event(event, out, index)
        elif kind == _EV.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            out["attempt"] = int(event.workflow_task_scheduled_event_attributes.attempt)
        else:
            await self._workflow_event(event, out)
        return out

    async def _activity_event(self, event: HistoryEvent, out: dict[str, JSON], index: _ActivityIndex) -> None:
        kind = event.event_type
        attrs: Any = getattr(event, _ACTIVITY_ATTRIBUTES[kind])
        if kind == _EV.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            self._started(index, int(attrs.scheduled_event_id), int(event.event_id))
        out["activity"] = self._activity(index, int(attrs.scheduled_event_id))
        if kind == _EV.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            out["attempt"] = int(attrs.attempt)
        elif kind == _EV.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            out["result"] = await decode_payloads(self.converter, attrs.result.payloads)
        elif kind in (_EV.EVENT_TYPE_ACTIVITY_TASK_FAILED, _EV.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT):
            out["error"] = failure_message(attrs.failure)

    async def _workflow_event(self, event: HistoryEvent, out: dict[str, JSON]) -> None:
        kind = event.event_type
        if kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            payloads = event.workflow_execution_completed_event_attributes.result
            out["result"] = await decode_payloads(self.converter, payloads.payloads)
            self.result = out["result"][0] if out["result"] else None
        elif kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
            out["error"] = self.error = failure_message(event.workflow_execution_failed_event_attributes.failure)
        elif kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT:
            out["error"] = self.error = "Workflow execution timed out"
        elif kind == _EV.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            out["error"] = failure_message(event.workflow_task_failed_event_attributes.failure)
        elif kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attrs = event.workflow_execution_signaled_event_attributes
            out["signal"] = {
                "name": attrs.signal_name,
                "input": await decode_payloads(self.converter, attrs.input.payloads),
            }
        elif kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED:
            out["reason"] = event.workflow_execution_cancel_requested_event_attributes.cause
        elif kind == _EV.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            out["reason"] = event.workflow_execution_terminated_event_attributes.reason
