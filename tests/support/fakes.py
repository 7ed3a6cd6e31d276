"""The in-memory backends (`backends.memory`) configured for unit tests of the HTTP layer: one run
(`RUN_ID` of `WORKFLOW_ID`, project p1, in the status a test asks for), and app settings and tokens
to match. Integration tests use the real backends, or mock mode's seeding of the same backends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from backends.memory import MemoryRun, MemoryRuns, MemoryUpdates
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


def the_run(project: str = "p1", status: str = "COMPLETED", closed_at: float | None = None) -> MemoryRun:
    """The one run of `FakeRuns`: `closed_at` is what `find_run` says of its close time (None: it
    cannot tell, so the post-after-close window never applies)."""
    details = {
        **summary(status),
        "input": {"documentId": "doc-1"},
        "result": {"success": True},
        "memo": {},
        "history": [],
        "pendingActivities": [],
        "error": None,
    }
    return MemoryRun(details=details, project_id=project, closed_at=closed_at)


class FakeRuns(MemoryRuns):
    """The memory runs backend holding `the_run(project, status, closed_at)`."""

    def __init__(
        self,
        project: str = "p1",
        status: str = "COMPLETED",
        closed_at: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__([the_run(project, status, closed_at)], clock=clock)


class FakeUpdates(MemoryUpdates):
    """The memory updates backend; `stored` is what `RUN_ID` holds."""

    @property
    def stored(self) -> list[bytes]:
        return self.stored_updates(RUN_ID)


def fake_backends_factory(runs: MemoryRuns | None = None, updates: MemoryUpdates | None = None) -> Any:
    """A backends factory for `web.app.create_app` that answers with these backends."""

    async def factory(settings: Settings) -> tuple[MemoryRuns, MemoryUpdates]:
        return runs or FakeRuns(), updates or FakeUpdates()

    return factory
