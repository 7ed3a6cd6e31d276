"""Run updates: get the stored ones, stream them (SSE), post one (operations of the Updates tag).

Thin, like every handler: check the permission, charge the caller's rate limits (the updates
bucket, and the Temporal one for a run this process has not resolved yet under the ids asked, and
for every stream opening, which asks for the run's status: `server.rate_limit`), check that the
run is visible (`find_run` raises `NotFound` otherwise), then call the updates
backend. Stored updates are JSON bytes already, so they are answered as they are, never decoded
and re-encoded.
"""

from __future__ import annotations

import math
import time
from typing import Any

from connexion import request
from starlette.responses import Response, StreamingResponse

from backends.errors import BackendUnavailable, Conflict, InvalidInput
from backends.protocol import RunsBackend
from server import sse
from server.context import Backends, backends, principal_of
from server.permissions import ACT_ON_RUN, READ_RUN, require

MAX_MS = 2**64 - 1
SUCCESS = b'{"success":true}'
CLOSED_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELED", "TERMINATED", "CONTINUED_AS_NEW", "TIMED_OUT"})


async def get_workflow_run_updates(
    workflow_id: str, run_id: str, token_info: dict[str, Any], since: int = 0
) -> Response:
    return Response(
        await read_updates(backends(), token_info, workflow_id, run_id, since), media_type="application/json"
    )


async def read_updates(
    context: Backends, token_info: dict[str, Any], workflow_id: str, run_id: str, since: int
) -> bytes:
    """The body of getWorkflowRunUpdates (shared with `server.fast_lane`)."""
    principal = require(principal_of(token_info), READ_RUN)
    context.rates.charge_updates(principal, run_known=context.runs.is_known(run_id, workflow_id))
    await context.runs.find_run(principal, run_id, workflow_id)
    # One join, one copy: the stored part may be MAX_UPDATE_BYTES_PER_RUN (8 MiB) large.
    return b"".join((b'{"messages":', await context.updates.read_since(run_id, _since_ms(since)), b"}"))


async def stream_workflow_run_updates(  # noqa: PLR0917  # Connexion's names for the operation's parameters
    workflow_id: str,
    run_id: str,
    token_info: dict[str, Any],
    since: int | None = None,
    skip_history: bool = False,
    access_token: str | None = None,
) -> StreamingResponse:
    del access_token  # verified by the security layer, exactly like the Authorization header
    context = backends()
    principal = require(principal_of(token_info), READ_RUN)
    runs, settings = context.runs, context.settings
    if sse.SHUTDOWN.is_set:
        # uvicorn still answers on open keep-alive connections for a moment after SIGTERM.
        raise BackendUnavailable("This server is shutting down.", retry_after=1, backend="server")
    # Both taken before any backend call, so a caller over a limit costs nothing. The slot is
    # released by the response once it is over, or below if the stream cannot start. The Temporal
    # bucket is charged whether or not the run is known: the status is asked at every opening.
    context.rates.charge_stream_open(principal)
    slot = context.streams.acquire(principal)
    try:
        await runs.find_run(principal, run_id, workflow_id)
        last_event_id = (request.headers.get("last-event-id") or "").strip() or None
        stream = await context.updates.open_stream(
            run_id,
            after_id=last_event_id,
            since_ms=None if since is None else _since_ms(since),
            skip_history=bool(skip_history),
        )
    except BaseException:
        slot.release()
        raise

    async def closed_status() -> str | None:
        return await _closed_status(runs, workflow_id, run_id)

    try:
        status_at_open = await closed_status()
    except BaseException:
        slot.release()
        await stream.aclose()
        raise
    frames = sse.update_frames(
        stream,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        retry_ms=settings.sse_retry_ms,
        closed_status=closed_status,
        status_at_open=status_at_open,
        expires_at=_token_end(token_info, settings.jwt_leeway_seconds),
    )
    return sse.event_stream_response(frames, send_timeout=settings.sse_send_timeout_seconds, slot=slot, stream=stream)


async def post_workflow_run_update(run_id: str, body: dict[str, Any] | None, token_info: dict[str, Any]) -> Response:
    return Response(await append_update(backends(), token_info, run_id, body or {}), media_type="application/json")


async def append_update(context: Backends, token_info: dict[str, Any], run_id: str, update: dict[str, Any]) -> bytes:
    """The body of postWorkflowRunUpdate (shared with `server.fast_lane`)."""
    principal = require(principal_of(token_info), ACT_ON_RUN)
    context.rates.charge_updates(principal, run_known=context.runs.is_known(run_id))
    run = await context.runs.find_run(principal, run_id)
    # A run takes updates while it is open and for a while after it closed (a late activity's
    # final update still lands), not forever: every past run could be filled otherwise.
    window = context.settings.post_after_close_seconds
    if run.closed and run.closed_at is not None and time.time() > run.closed_at + window:
        raise Conflict(
            f"Workflow run {run_id} is closed: updates are accepted until {window} seconds after a run closes."
        )
    await context.updates.append(run_id, update)
    return SUCCESS


async def _closed_status(runs: RunsBackend, workflow_id: str, run_id: str) -> str | None:
    """The run's final status once it is closed; None while it runs (or while its status is not
    final yet as far as the description says: the next poll asks again). One describe, shared by
    every stream of the run polling at that moment, never the run's history; the run was found
    visible to the caller (`find_run`) as the stream opened, and whose run it is never changes."""
    status = await runs.closed_status(workflow_id, run_id)
    return status if status in CLOSED_STATUSES else None


def _token_end(token_info: dict[str, Any], leeway_seconds: float) -> float | None:
    """When the stream's token stops being accepted (epoch seconds): its `exp` plus the leeway
    every request gets; None for a token without `exp` (it never expires)."""
    claims = token_info.get("claims")
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp) + leeway_seconds


def _since_ms(value: int | float) -> int:
    """Epoch milliseconds from the `since` parameter, clamped to what a stream id can hold."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidInput("`since` must be a number of milliseconds since the epoch.")
    if value <= 0:
        return 0
    return MAX_MS if value >= MAX_MS else int(value)
