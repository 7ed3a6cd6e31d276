"""The real stack the integration and browser tests run against: an embedded Temporal and Redis
(`Services`), and the API and sample worker as separate processes (`LiveApi`), as the CLI starts
them. The session fixtures in `tests/conftest.py` start them once; tests that need processes of
their own (other settings, restarts, replicas, `serve --workers N`) start them with the same
functions."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cli import stack
from core.tokens import mint_token
from tests.support.waits import wait_for
from tests.support.workers import log_size, started, worker_pids

CLI = (sys.executable, "-m", "cli.main")
START_DEADLINE = 60.0  # seconds for a process to accept connections


@dataclass(frozen=True)
class Services:
    temporal_address: str
    redis_url: str
    data_dir: Path
    jwt_secret: str

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"


@dataclass(frozen=True)
class LiveApi:
    """The real server (`workflow-runs serve`) and sample worker, as separate processes."""

    base_url: str
    services: Services
    task_queue: str

    def token(self, project: str = "p1", user: str = "u1", **kwargs: object) -> str:
        return mint_token(self.services.jwt_secret, user=user, project=project, **kwargs)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        return live_env(self.services, self.base_url, self.task_queue)


def live_env(services: Services, base_url: str, task_queue: str) -> dict[str, str]:
    """The environment of an API or worker process (or a CLI call) on `services`."""
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


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api/v1"


def start_api(
    children: list[stack.Child], name: str, port: int, env: Mapping[str, str], log_dir: Path, *, workers: int = 1
) -> stack.Child:
    """`workflow-runs serve` on `port` (`--workers N` when `workers` > 1); returns once it accepts
    connections, with every worker serving. The child joins `children` before the wait, so
    `stack.running(children)` stops it whatever happens next."""
    argv = [*CLI, "serve"] if workers == 1 else [*CLI, "serve", "--workers", str(workers)]
    offset = log_size(log_dir / f"{name}.log")  # `stack.spawn` appends to a log of the same name
    child = stack.spawn(name, argv, log_dir, {**env, "PORT": str(port)})
    children.append(child)
    stack.wait_for_port("127.0.0.1", port, START_DEADLINE, child.proc)
    if workers > 1:
        wait_for_workers(child, workers, offset)
    return child


def wait_for_workers(child: stack.Child, workers: int, offset: int = 0) -> None:
    """Wait until the `workers` workers of `serve --workers` have each logged their start-up: the
    parent binds the port first, so until then a connection may wait for a worker that is still
    building its app, or fail with it."""

    def all_started() -> bool:
        if child.proc.poll() is not None:
            raise AssertionError(f"{child.name} exited ({child.proc.returncode}); see {child.log_path}")
        return started(child.log_path, offset) >= workers

    wait_for(all_started, START_DEADLINE)
    assert len(worker_pids(child.proc.pid)) == workers


def start_worker(children: list[stack.Child], name: str, env: Mapping[str, str], log_dir: Path) -> stack.Child:
    """`workflow-runs worker` (it polls `TEMPORAL_TASK_QUEUE` and posts updates to `API_URL`)."""
    child = stack.spawn(name, [*CLI, "worker"], log_dir, dict(env))
    children.append(child)
    return child


@contextlib.contextmanager
def running_services(data_dir: Path) -> Iterator[Services]:
    """A real Temporal dev server and a real Redis on free ports, stopped when the block exits."""
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


@contextlib.contextmanager
def running_live_api(services: Services, *, workers: int = 1) -> Iterator[LiveApi]:
    """An API process (`serve --workers N` when `workers` > 1) and a sample worker on `services`,
    with a task queue of their own."""
    port = stack.free_port()
    live = LiveApi(base_url=api_url(port), services=services, task_queue=f"live-{secrets.token_hex(4)}")
    children: list[stack.Child] = []
    with stack.running(children):
        start_api(children, f"api-{port}", port, live.env(), services.logs, workers=workers)
        start_worker(children, f"worker-{port}", live.env(), services.logs)
        yield live
