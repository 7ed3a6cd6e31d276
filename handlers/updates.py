"""Run updates: get the stored ones, stream them (SSE), post one (operations of the Updates tag).

Thin, like every handler: check the permission, charge the caller's rate limits (the updates
bucket, and the Temporal one for a run this process has not resolved yet under the ids asked, and
for every stream opening, which asks for the run's status: `handlers.rate_limits`), check that the
run is visible (`find_run` raises `NotFound` otherwise), then call the updates
backend. Stored updates are JSON bytes already, so they are answered as they are, never decoded
and re-encoded.

A post names its run by run id, and by workflow id too when the poster sends `workflow_id`: the
run is then described, which sees a run the moment it starts. Without it the run is found in
Temporal's listings, which show a run a moment after it starts, so a run not found there is waited
for (`RunsBackend.await_listed_run`, VISIBILITY_WAIT_SECONDS), each further look-up taken from the
caller's Temporal bucket (docs/decisions/0015-visibility-lag.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from core.errors import BackendUnavailable, Conflict, InvalidInput, NotFound
from core.principals import ACT_ON_RUN, READ_RUN, Principal, require
from core.protocols import RunRef, RunsBackend, UpdateStream
from handlers.deps import Deps
from handlers.stream_limits import StreamSlot

MAX_MS = 2**64 - 1
SUCCESS = b'{"success":true}'
CLOSED_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELED", "TERMINATED", "CONTINUED_AS_NEW", "TIMED_OUT"})


@dataclass(frozen=True)
class OpenedStream:
    """The answer of streamWorkflowRunUpdates: an open stream of the run's updates, which the HTTP
    layer sends as Server-Sent Events (`web.sse`). Whoever receives it owns `stream` and `slot`
    and must close and release them, however the response ends."""

    stream: UpdateStream
    slot: StreamSlot
    # The run's final status once it is closed, None while it runs (polled during the stream).
    closed_status: Callable[[], Awaitable[str | None]]
    status_at_open: str | None
    # When the caller's token stops being accepted (epoch seconds, leeway included); None: never.
    expires_at: float | None


async def get_workflow_run_updates(
    deps: Deps, principal: Principal, *, workflow_id: str, run_id: str, since: int = 0
) -> bytes:
    require(principal, READ_RUN)
    deps.rates.charge_updates(principal, run_known=deps.runs.is_known(run_id, workflow_id))
    await deps.runs.find_run(principal, run_id, workflow_id)
    # One join, one copy: the stored part may be MAX_UPDATE_BYTES_PER_RUN (8 MiB) large.
    return b"".join((b'{"messages":', await deps.updates.read_since(run_id, _since_ms(since)), b"}"))


async def stream_workflow_run_updates(  # the operation's parameters, by name
    deps: Deps,
    principal: Principal,
    *,
    workflow_id: str,
    run_id: str,
    since: int | None = None,
    skip_history: bool = False,
    last_event_id: str | None = None,
) -> OpenedStream:
    # `access_token` is the security layer's (verified exactly like the Authorization header).
    require(principal, READ_RUN)
    runs = deps.runs
    if deps.shutdown.is_set:
        # uvicorn still answers on open keep-alive connections for a moment after SIGTERM.
        raise BackendUnavailable("This server is shutting down.", retry_after=1, backend="server")
    # Both taken before any backend call, so a caller over a limit costs nothing. The slot is
    # released by the response once it is over, or below if the stream cannot start. The Temporal
    # bucket is charged whether or not the run is known: the status is asked at every opening.
    deps.rates.charge_stream_open(principal)
    slot = await deps.streams.take(principal)
    try:
        await runs.find_run(principal, run_id, workflow_id)
        stream = await deps.updates.open_stream(
            run_id,
            after_id=(last_event_id or "").strip() or None,
            since_ms=None if since is None else _since_ms(since),
            skip_history=bool(skip_history),
        )
    except BaseException:
        slot.release()
        raise

    async def closed_status() -> str | None:
        return await _closed_status(runs, workflow_id, run_id)

    try:
        # Asked afresh, not from the answer the run's other streams share: a stream opens only
        # while Temporal answers (503 otherwise), and starts from its run's status now.
        status_at_open = await _closed_status(runs, workflow_id, run_id, fresh=True)
    except BaseException:
        slot.release()
        await stream.aclose()
        raise
    expires_at = principal.expires_at
    return OpenedStream(
        stream=stream,
        slot=slot,
        closed_status=closed_status,
        status_at_open=status_at_open,
        expires_at=None if expires_at is None else expires_at + deps.settings.jwt_leeway_seconds,
    )


async def post_workflow_run_update(
    deps: Deps, principal: Principal, *, run_id: str, body: dict[str, Any], workflow_id: str | None = None
) -> bytes:
    require(principal, ACT_ON_RUN)
    deps.rates.charge_updates(principal, run_known=deps.runs.is_known(run_id, workflow_id))
    run = await _posted_run(deps, principal, run_id, workflow_id)
    # A run takes updates while it is open and for a while after it closed (a late activity's
    # final update still lands), not forever: every past run could be filled otherwise.
    window = deps.settings.post_after_close_seconds
    if run.closed and run.closed_at is not None and time.time() > run.closed_at + window:
        raise Conflict(
            f"Workflow run {run_id} is closed: updates are accepted until {window} seconds after a run closes."
        )
    await deps.updates.append(run_id, body)
    return SUCCESS


async def _posted_run(deps: Deps, principal: Principal, run_id: str, workflow_id: str | None) -> RunRef:
    """The run a post is for. A "not found" is final when the workflow id was given (a describe
    does not lag); without it the run may just not be listed yet, and is waited for."""
    try:
        return await deps.runs.find_run(principal, run_id, workflow_id)
    except NotFound:
        if workflow_id is not None:
            raise
    rates = deps.rates
    return await deps.runs.await_listed_run(principal, run_id, before_look_up=lambda: rates.charge_temporal(principal))


async def _closed_status(runs: RunsBackend, workflow_id: str, run_id: str, *, fresh: bool = False) -> str | None:
    """The run's final status once it is closed; None while it runs (or while its status is not
    final yet as far as the description says: the next poll asks again). One describe, shared by
    every stream of the run polling at that moment or within a few seconds after
    (`OPEN_STATUS_REUSE_SECONDS`), never the run's history; the run was found
    visible to the caller (`find_run`) as the stream opened, and whose run it is never changes."""
    status = await runs.closed_status(workflow_id, run_id, fresh=fresh)
    return status if status in CLOSED_STATUSES else None


def _since_ms(value: int | float) -> int:
    """Epoch milliseconds from the `since` parameter, clamped to what a stream id can hold."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidInput("`since` must be a number of milliseconds since the epoch.")
    if value <= 0:
        return 0
    return MAX_MS if value >= MAX_MS else int(value)
