"""The in-memory backends: mock mode's (`workflow-runs mock`) and the unit tests' one
implementation of `core.protocols` (`RunsBackend`, `UpdatesBackend`, `UpdateStream`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.memory.runs import MemoryRun, MemoryRuns
from backends.memory.seed import MOCK_PROJECT, Seed, seed
from backends.memory.updates import MemoryUpdates, MemoryUpdateStream
from backends.page_tokens import PageTokens, page_token_key
from backends.redis_updates import encode_update
from core.settings import Settings

__all__ = [
    "MOCK_PROJECT",
    "MemoryRun",
    "MemoryRuns",
    "MemoryUpdateStream",
    "MemoryUpdates",
    "Seed",
    "mock_backends",
    "seed",
]


def mock_backends(
    document: Mapping[str, Any], settings: Settings, *, project: str = MOCK_PROJECT
) -> tuple[MemoryRuns, MemoryUpdates]:
    """Mock mode's backends: the runs and updates of `document`'s examples (`backends.memory.seed`),
    with the settings' page-token key, not-found cache time and bytes bound per run, as the real
    backends take them."""
    start = seed(document, project=project)
    runs = MemoryRuns(
        start.runs,
        page_tokens=PageTokens(page_token_key(settings)),
        not_found_seconds=settings.not_found_cache_seconds,
    )
    updates = MemoryUpdates(max_bytes=settings.max_update_bytes_per_run)
    for run_id, messages in start.updates.items():
        for message in messages:
            fields = {name: value for name, value in message.items() if name not in ("timestamp", "workflow_run_id")}
            updates.store(run_id, encode_update(run_id, fields), at_ms=int(message["timestamp"]))
    return runs, updates
