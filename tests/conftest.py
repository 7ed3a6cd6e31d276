"""Session fixtures: the real embedded services, started once per test session on free ports.

Tests that need them carry the `services` marker; unit tests use none of this.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import stack


@dataclass(frozen=True)
class Services:
    temporal_address: str
    redis_url: str
    data_dir: Path
    jwt_secret: str


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """A real Temporal dev server and a real Redis for the whole session."""
    data_dir = tmp_path_factory.mktemp("stack")
    temporal_port, redis_port = stack.free_port(), stack.free_port()
    children: list[stack.Child] = []
    with stack.running(children):
        children.append(stack.start_temporal(data_dir, port=temporal_port))
        children.append(stack.start_redis(data_dir, port=redis_port))
        yield Services(
            temporal_address=f"127.0.0.1:{temporal_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            data_dir=data_dir,
            jwt_secret=secrets.token_urlsafe(32),
        )


@dataclass(frozen=True)
class LiveApi:
    """The real server (`workflow-runs serve`) and sample worker, as separate processes."""

    base_url: str
    services: Services
    task_queue: str

    def token(self, project: str = "p1", user: str = "u1", **kwargs: object) -> str:
        from server.auth import mint_token

        return mint_token(self.services.jwt_secret, user=user, project=project, **kwargs)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        return live_env(self.services, self.base_url, self.task_queue)


def live_env(services: Services, base_url: str, task_queue: str) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "TEMPORAL_ADDRESS": services.temporal_address,
        "REDIS_URL": services.redis_url,
        "JWT_SECRET": services.jwt_secret,
        "API_URL": base_url,
        "TEMPORAL_TASK_QUEUE": task_queue,
        "VALIDATE_RESPONSES": "1",
        "DATA_DIR": str(services.data_dir),
        "SSE_HEARTBEAT_SECONDS": "1",
        # One API process serves the whole session with the same few tokens: per-caller rate limits
        # would make tests depend on each other's pace. test_hostile.py proves them on a process of its own.
        "RATE_LIMIT_TEMPORAL_PER_SECOND": "0",
        "RATE_LIMIT_UPDATES_PER_SECOND": "0",
    }


@pytest.fixture(scope="session")
def live_api(services: Services) -> Iterator[LiveApi]:
    """`workflow-runs serve` + `workflow-runs worker` on the session's real services."""
    import sys

    port = stack.free_port()
    base_url = f"http://127.0.0.1:{port}/api/v1"
    task_queue = f"live-{secrets.token_hex(4)}"
    env = {**live_env(services, base_url, task_queue), "PORT": str(port)}
    cli = [sys.executable, "-m", "server.cli"]
    logs = services.data_dir / "logs"
    children: list[stack.Child] = []
    with stack.running(children):
        children.append(stack.spawn(f"api-{port}", [*cli, "serve"], logs, env))
        children.append(stack.spawn(f"worker-{port}", [*cli, "worker"], logs, env))
        stack.wait_for_port("127.0.0.1", port, 60, children[0].proc)
        yield LiveApi(base_url=base_url, services=services, task_queue=task_queue)
