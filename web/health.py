"""Readiness: whether both backends answer, asked at most once a second however often it is polled.

`/health/ready` needs no token (load balancers and orchestrators poll it), so anybody can call it
as often as they like: each call used to ping Temporal and Redis. The answer is now shared: callers
arriving while a check is under way wait for that check, and a finished check is reused for
`max_age` seconds. A load balancer polling every few seconds sees no difference; a flood of
requests costs the backends one ping each a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from core.errors import BackendUnavailable
from handlers.deps import Deps
from web import errors

Checks = dict[str, str]  # backend name -> "ok" or the API's sentence for why not


class Readiness:
    def __init__(self, *, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self._last: tuple[float, Checks] | None = None
        self._pending: asyncio.Future[Checks] | None = None

    async def checks(self, deps: Deps) -> Checks:
        if self._last is not None and self.clock() - self._last[0] < self.max_age:
            return self._last[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._check(deps))
            self._pending.add_done_callback(self._done)
        # Shielded: one caller leaving must not cancel the check the others wait for.
        return await asyncio.shield(self._pending)

    def _done(self, future: asyncio.Future[Checks]) -> None:
        self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._last = (self.clock(), future.result())

    @staticmethod
    async def _check(deps: Deps) -> Checks:
        checks: Checks = {}
        for name, backend in (("temporal", deps.runs), ("redis", deps.updates)):
            try:
                await backend.ping()
                checks[name] = "ok"
            except BackendUnavailable as exc:
                checks[name] = errors.public_sentence(exc)  # the cause is the server log's, not the caller's
        return checks
