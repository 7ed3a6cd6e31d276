"""Temporal's listings as a production visibility store shows them: late.

The dev server's SQLite visibility lists a run the moment it starts; Elasticsearch, in production,
a moment (up to a few seconds) later. `LaggingRunsBackend` is the real runs backend on the real
dev server whose listings (`_list`, every ListWorkflowExecutions it sends) leave out each run that
started less than `lag` seconds ago, by this machine's clock, which the dev server shares. Describes
are left alone, as Temporal's are strongly consistent.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from temporalio.api.workflowservice.v1 import ListWorkflowExecutionsResponse

from backends.redis_updates import RedisUpdatesBackend
from backends.temporal_runs import TemporalRunsBackend
from core.settings import Settings


class LaggingRunsBackend(TemporalRunsBackend):
    """`TemporalRunsBackend` whose listings lag `lag` seconds behind a run's start."""

    def __init__(self, *args: Any, lag: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lag = lag
        self.listings: Counter[str] = Counter()  # the queries sent, with how many times

    async def _list(self, query: str, page_size: int, token: bytes) -> ListWorkflowExecutionsResponse:
        page = await super()._list(query, page_size, token)
        self.listings[query] += 1
        # Read after the answer: a run shown is one the dev server had `lag` seconds ago or more.
        until = time.time() - self.lag
        shown = [info for info in page.executions if info.start_time.ToMicroseconds() / 1e6 <= until]
        return ListWorkflowExecutionsResponse(executions=shown, next_page_token=page.next_page_token)


def lagging_backends(lag: float, runs: list[LaggingRunsBackend] | None = None) -> Any:
    """A backends factory for `web.app.create_app`: the lagging runs backend (appended to `runs`,
    for the test to look at) and the real Redis one."""

    async def factory(settings: Settings) -> tuple[LaggingRunsBackend, RedisUpdatesBackend]:
        backend = await LaggingRunsBackend.connect(settings)
        assert isinstance(backend, LaggingRunsBackend)
        backend.lag = lag
        if runs is not None:
            runs.append(backend)
        return backend, await RedisUpdatesBackend.from_url(settings.redis_url, settings)

    return factory
