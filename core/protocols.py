"""The narrow interfaces handlers depend on.

Concrete adapters (`backends.temporal_runs`, `backends.redis_updates`) are built once at start-up
(the app's lifespan) and handed to every handler in its `handlers.deps.Deps`, so tests can inject
fakes and production can point the same code at any Temporal cluster and Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from core.principals import Principal

JSON = Any
Action = Literal["cancel", "terminate"]

# The runs of one listing page: the bounds and default the document states for `page_size`
# (ListRunsRequest). tests/unit/test_page_size_bounds.py fails when the two differ.
MIN_PAGE_SIZE = 1
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class RunFilters:
    """The seed's list inputs, already validated by the request schema (names as on the wire)."""

    document_id: str | None = None
    event_name: str | None = None
    rule_id: str | None = None
    start: str | None = None
    end: str | None = None
    search_term: str | None = None
    status: str | None = None
    initiated_by: str | None = None
    type: str | None = None
    query: str | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    next_page_token: str | None = None


@dataclass(frozen=True)
class RunPage:
    runs: list[dict[str, JSON]]  # WorkflowRunSummary objects, JSON-ready
    next_page_token: str | None
    has_more: bool


@dataclass(frozen=True)
class RunRef:
    """What the update and stream code needs to know about a run it serves."""

    workflow_id: str
    run_id: str
    closed: bool  # as last seen by this process (`RunsBackend.closed_status` asks Temporal)
    # When it closed (epoch seconds); None while open, or when the backend cannot tell.
    closed_at: float | None = None


class RunsBackend(Protocol):
    """Temporal-backed operations. Every method is scoped to `principal`: a run the principal may
    not see raises `NotFound`, exactly as a run that does not exist."""

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, JSON]: ...

    async def list_runs(
        self, principal: Principal, filters: RunFilters, *, conversations_only: bool = False
    ) -> RunPage: ...

    async def apply_action(
        self, principal: Principal, workflow_id: str, run_id: str, action: Action, reason: str | None
    ) -> None: ...

    async def signal(
        self, principal: Principal, workflow_id: str, run_id: str, signal_name: str, payload: dict[str, JSON]
    ) -> None: ...

    async def find_run(self, principal: Principal, run_id: str, workflow_id: str | None = None) -> RunRef:
        """Resolve a run by run id (and workflow id when known); `NotFound` if not visible. With a
        workflow id the run is described (strongly consistent); without one it is looked up in the
        listings, which may not show a run that started a moment ago (see `await_listed_run`)."""
        ...

    async def await_listed_run(
        self, principal: Principal, run_id: str, *, before_look_up: Callable[[], None]
    ) -> RunRef:
        """`find_run(principal, run_id)` for a run it just did not find: a run not listed yet (the
        listings lag behind a start) is looked up again, with backoff, for the backend's visibility
        window, whatever "not found" was remembered. `before_look_up` is called before each look-up
        that asks Temporal (the caller's rate limit: whatever it raises ends the wait). `NotFound`
        once the window is over (at once for a run that exists but is not the caller's, and when
        nothing lags); `TooManyRequests` when the process already holds as many waits as it may."""
        ...

    async def closed_status(self, workflow_id: str, run_id: str, *, fresh: bool = False) -> str | None:
        """The run's closed status ("COMPLETED", "FAILED", ...) once it is closed, None while it
        runs. Not scoped: for a run already found visible (`find_run`). Concurrent callers for one
        run share one Temporal call, a backend may reuse an "open" answer for a few seconds
        (Temporal: `OPEN_STATUS_REUSE_SECONDS`) unless `fresh` is asked, and a close once seen
        costs none."""
        ...

    def is_known(self, run_id: str, workflow_id: str | None = None) -> bool:
        """Whether `find_run(principal, run_id, workflow_id)`, with these same ids, will answer
        without asking Temporal (the rate limits charge update operations on other runs as
        Temporal work)."""
        ...

    async def ping(self) -> None:
        """Raise `BackendUnavailable` unless Temporal answers."""
        ...

    async def close(self) -> None: ...


UpdateEvent = tuple[str, str, bytes]  # (event, id, data); event is "message" or "truncated"
# Takes one live update `(id, data)` as it arrives, synchronously; False: not now, return it from
# `next` instead (see `UpdateStream.next`).
LiveSink = Callable[[str, bytes], bool]


class UpdateStream(Protocol):
    """One open stream of a run's updates: the stored ones after the cursor, then live ones, with
    no gap and no duplicate between the two."""

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        """The next event; None when nothing came within `wait_seconds` (time for a heartbeat).
        Raises `StopAsyncIteration` once the stream has ended.

        With a `sink`, live updates that arrive while this waits may be handed to it instead, as
        they arrive, without waking the caller (a thousand streams of a run then cost no task
        switch each per update); once the sink says "not now", that update and the ones after it
        are returned by `next` as usual, in order. A backend may ignore the sink."""
        ...

    def finish(self) -> None:
        """The run has closed: `next` returns what is still stored after the cursor, then ends."""
        ...

    async def aclose(self) -> None: ...


class UpdatesBackend(Protocol):
    """Redis-backed run updates: a bounded, ordered, resumable log per run."""

    async def append(self, run_id: str, update: dict[str, JSON]) -> str:
        """Store one update (`type`, `message`, optional `details`, `workstream_id`); the backend
        stamps `timestamp` and `workflow_run_id`. Returns the new entry's id (the SSE `id:`)."""
        ...

    async def read_since(self, run_id: str, since_ms: int) -> bytes:
        """The JSON array of stored updates strictly after `since_ms`, oldest first, as raw bytes
        (the stored JSON is passed through, never decoded)."""
        ...

    async def open_stream(
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> UpdateStream:
        """Subscribe and position the cursor: `after_id` (Last-Event-ID) > `since_ms` >
        `skip_history` (only what comes next) > everything stored. A backend that is down raises
        `BackendUnavailable` here, before any byte of the stream is sent."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class StreamSlots(Protocol):
    """Open-stream slots counted across every process and replica (`SHARED_STREAM_LIMITS`): each
    slot is a lease its process keeps alive, so the slots of a process that dies free themselves
    (`backends.redis_stream_slots`)."""

    async def acquire(self, owner: str, limit: int) -> str | None:
        """A new slot of `owner`'s, by id; None when `owner` already holds `limit` live slots.
        `BackendUnavailable` when the store cannot be reached (no slot is then held)."""
        ...

    def release(self, owner: str, slot_id: str) -> None:
        """Give the slot back without waiting for the store (a lost release ends with its lease);
        never raises, as it runs in `finally` blocks and finalisers."""
        ...

    async def close(self) -> None:
        """Stop keeping the leases alive and give back the slots still held."""
        ...
