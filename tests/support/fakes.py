"""In-memory backends and app settings for unit tests of the HTTP layer (integration tests use the
real backends)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

from backends.redis_updates import encode_update
from core.errors import Conflict, NotFound
from core.principals import Principal
from core.protocols import Action, RunFilters, RunPage, RunRef, UpdateEvent
from core.settings import Settings
from core.tokens import mint_token


def app_settings(secret: str, **overrides: Any) -> Settings:
    """The settings of an app on these fakes: HS256 tokens signed with `secret` (no key server),
    every response validated against the document, plus `overrides`."""
    return replace(
        Settings(), jwt_secret=secret, jwt_public_key=None, jwks_url=None, validate_responses=True, **overrides
    )


def bearer(secret: str, **claims: Any) -> dict[str, str]:
    """The Authorization header of a dev token signed with `secret` (user u1 of project p1 unless
    `claims` say otherwise)."""
    return {"Authorization": f"Bearer {mint_token(secret, **{'user': 'u1', 'project': 'p1', **claims})}"}


RUN_ID = "3f1c9a52-8b7e-4d21-9c55-0a6e2b7d41f8"
WORKFLOW_ID = "ingest-doc-7f3a2c"


def summary(status: str = "COMPLETED") -> dict[str, Any]:
    return {
        "status": status,
        "started_at": 1678886400,
        "closed_at": 1678886460 if status != "RUNNING" else None,
        "execution_duration": 60,
        "run_id": RUN_ID,
        "workflow_id": WORKFLOW_ID,
        "type": "StandardContentIngestion",
        "initiated_by": "user:123",
        "vertesia_workflow_type": "StandardContentIngestion",
        "visibility": "project",
        "interactive": False,
    }


class FakeRuns:
    def __init__(self, project: str = "p1", status: str = "COMPLETED", closed_at: float | None = None) -> None:
        self.project, self.status = project, status
        self.closed_at = closed_at  # what find_run says of the close time (None: it cannot tell)
        self.known: set[str] = set()  # runs resolved once, as the real backend remembers them
        # (run id, workflow id asked) found missing, as the real backend's not-found cache (which
        # forgets them after NOT_FOUND_CACHE_SECONDS; this one never does)
        self.missing: set[tuple[str, str | None]] = set()

    def _check(self, principal: Principal, workflow_id: str | None, run_id: str) -> None:
        if principal.project_id != self.project or run_id != RUN_ID or workflow_id not in (None, WORKFLOW_ID):
            raise NotFound(f"Workflow run {run_id} was not found.")  # the Temporal backend's words

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, Any]:
        self._check(principal, workflow_id, run_id)
        return {
            **summary(self.status),
            "input": {"documentId": "doc-1"},
            "result": {"success": True},
            "memo": {},
            "history": [],
            "pendingActivities": [],
            "error": None,
        }

    async def list_runs(
        self, principal: Principal, filters: RunFilters, *, conversations_only: bool = False
    ) -> RunPage:
        runs = [summary(self.status)] if principal.project_id == self.project else []
        return RunPage(runs=runs, next_page_token=None, has_more=False)

    async def apply_action(
        self, principal: Principal, workflow_id: str, run_id: str, action: Action, reason: str | None
    ) -> None:
        self._check(principal, workflow_id, run_id)
        if self.status != "RUNNING":
            raise Conflict(f"Workflow run {run_id} is already closed ({self.status}).")

    async def signal(
        self, principal: Principal, workflow_id: str, run_id: str, signal_name: str, payload: dict[str, Any]
    ) -> None:
        await self.apply_action(principal, workflow_id, run_id, "cancel", None)

    @staticmethod
    def _exists(run_id: str, workflow_id: str | None) -> bool:
        return run_id == RUN_ID and workflow_id in (None, WORKFLOW_ID)

    async def find_run(self, principal: Principal, run_id: str, workflow_id: str | None = None) -> RunRef:
        # As the real backend: a run that exists is remembered even when this caller may not see
        # it; a run id that does not exist under the workflow id asked is remembered as missing.
        if self._exists(run_id, workflow_id):
            self.known.add(run_id)
        else:
            self.missing.add((run_id, workflow_id))
        self._check(principal, workflow_id, run_id)
        closed = self.status != "RUNNING"
        return RunRef(
            workflow_id=WORKFLOW_ID, run_id=RUN_ID, closed=closed, closed_at=self.closed_at if closed else None
        )

    async def closed_status(self, workflow_id: str, run_id: str) -> str | None:
        return None if self.status == "RUNNING" else self.status

    def is_known(self, run_id: str, workflow_id: str | None = None) -> bool:
        if run_id in self.known and workflow_id in (None, WORKFLOW_ID):
            return True
        return (run_id, workflow_id) in self.missing

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FakeUpdateStream:
    def __init__(self, pending: deque[UpdateEvent]) -> None:
        self.pending, self.finished = pending, False

    async def next(self, wait_seconds: float) -> UpdateEvent | None:
        if self.pending:
            return self.pending.popleft()
        if self.finished:
            raise StopAsyncIteration
        return None

    def finish(self) -> None:
        self.finished = True

    async def aclose(self) -> None:
        self.pending.clear()


class FakeUpdates:
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        ts = 1678886400000 + len(self.stored)
        self.stored.append(b'{"timestamp":%d' % ts + encode_update(run_id, update))  # as Redis stores it
        return f"{ts}-0"

    async def read_since(self, run_id: str, since_ms: int) -> bytes:
        return b"[" + b",".join(self.stored) + b"]"

    async def open_stream(
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> FakeUpdateStream:
        replay = [] if skip_history and after_id is None and since_ms is None else self.stored
        return FakeUpdateStream(deque(("message", f"{1678886400000 + i}-0", data) for i, data in enumerate(replay)))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def fake_backends_factory(runs: FakeRuns | None = None, updates: FakeUpdates | None = None) -> Any:
    """A backends factory for `web.app.create_app` that answers with these fakes."""

    async def factory(settings: Settings) -> tuple[FakeRuns, FakeUpdates]:
        return runs or FakeRuns(), updates or FakeUpdates()

    return factory
