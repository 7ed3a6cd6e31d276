"""Session fixtures: the real embedded services, started once per test session on free ports.

Tests that need them carry the `services` marker; unit tests use none of this. What the fixtures
start, and how, is in `tests/support/live.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.live import LiveApi, Services, running_live_api, running_services


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """A real Temporal dev server and a real Redis for the whole session."""
    with running_services(tmp_path_factory.mktemp("stack")) as started:
        yield started


@pytest.fixture(scope="session")
def live_api(services: Services) -> Iterator[LiveApi]:
    """`workflow-runs serve` + `workflow-runs worker` on the session's real services."""
    with running_live_api(services) as live:
        yield live
