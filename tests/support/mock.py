"""Mock mode in the test process: the app `workflow-runs mock` serves (same Connexion app, same
in-memory backends seeded from the document's examples) under uvicorn in a thread, on a free port,
so HTTP tests (streams included) drive it exactly as they drive the live server. The test keeps
the backends, to add runs of its own, as a live test starts them through Temporal."""

from __future__ import annotations

import contextlib
import copy
import secrets
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import uvicorn

from backends.memory import MemoryRun, MemoryRuns, MemoryUpdates, mock_backends, seed
from backends.redis_updates import encode_update
from core.settings import Settings
from core.tokens import mint_token
from web.app import begin_shutdown, create_app, published_document

START_DEADLINE = 60.0


@dataclass(frozen=True)
class MockApi:
    base_url: str
    jwt_secret: str
    runs: MemoryRuns
    updates: MemoryUpdates

    def token(self, project: str = "p1", user: str = "u1", **kwargs: Any) -> str:
        return mint_token(self.jwt_secret, user=user, project=project, **kwargs)

    def add_copy(
        self, status: str, *, project: str = "p1", user: str = "u1", interactive: bool, **changes: Any
    ) -> MemoryRun:
        """A new run (fresh ids) of `project`, started by `user`, copied from the seeded run of
        that status and kind, with `changes` to its details; the updates stored for the seeded run
        are stored for the copy too."""
        seeded = seed(published_document())
        model = next(r for r in seeded.runs if r.status == status and bool(r.details.get("interactive")) == interactive)
        details = copy.deepcopy(model.details) | {
            "run_id": str(uuid.uuid4()),
            "workflow_id": f"{model.workflow_id}-{secrets.token_hex(4)}",
            "initiated_by": f"user:{user}",
            **changes,
        }
        run = self.runs.add(replace(model, details=details, project_id=project, attributes=dict(model.attributes)))
        for message in seeded.updates.get(model.run_id, []):
            fields = {k: v for k, v in message.items() if k not in ("timestamp", "workflow_run_id")}
            self.updates.store(run.run_id, encode_update(run.run_id, fields))
        return run


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def mock_settings(secret: str) -> Settings:
    """What the mock serves with in tests: as `workflow-runs mock` (responses validated), plus the
    live tests' settings (heartbeat every second, rate limits off: one server for many tests)."""
    return replace(
        Settings(),
        jwt_secret=secret,
        jwt_public_key=None,
        jwks_url=None,
        validate_responses=True,
        sse_heartbeat_seconds=1,
        rate_limit_temporal_per_second=0,
        rate_limit_updates_per_second=0,
    )


@contextlib.contextmanager
def running_mock_api() -> Iterator[MockApi]:
    secret = secrets.token_urlsafe(32)
    settings = mock_settings(secret)
    runs, updates = mock_backends(published_document(), settings)

    async def backends(settings: Settings) -> tuple[MemoryRuns, MemoryUpdates]:
        return runs, updates

    app = create_app(settings, backends)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, ws="none", log_config=None, lifespan="on", timeout_graceful_shutdown=1)
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(START_DEADLINE), "the mock server did not start"
        port = listener.getsockname()[1]
        yield MockApi(f"http://127.0.0.1:{port}/api/v1", secret, runs, updates)
    finally:
        begin_shutdown(app)  # open streams end now, as under `workflow-runs mock`
        server.should_exit = True
        thread.join(START_DEADLINE)
        listener.close()
