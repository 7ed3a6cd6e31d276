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
    children = [stack.start_temporal(data_dir, port=temporal_port), stack.start_redis(data_dir, port=redis_port)]
    with stack.running(children):
        yield Services(
            temporal_address=f"127.0.0.1:{temporal_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            data_dir=data_dir,
            jwt_secret=secrets.token_urlsafe(32),
        )
