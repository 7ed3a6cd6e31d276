"""Readiness is asked of the backends at most once per `max_age`, however many callers poll it."""

from __future__ import annotations

import asyncio

from core.errors import BackendUnavailable
from core.settings import Settings
from handlers.deps import Deps
from tests.support.fakes import FakeRuns, FakeUpdates
from web.errors import public_sentence
from web.health import Readiness


class CountingRuns(FakeRuns):
    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False

    async def ping(self) -> None:
        self.pings += 1
        await self.gate.wait()
        if self.down:
            raise BackendUnavailable("connection refused by 10.0.0.7:7233", backend="temporal")


def backends(runs: FakeRuns) -> Deps:
    return Deps(runs=runs, updates=FakeUpdates(), settings=Settings())


async def test_concurrent_callers_share_one_check() -> None:
    runs = CountingRuns()
    runs.gate.clear()
    readiness = Readiness(max_age=1.0, clock=lambda: 0.0)
    waiting = [asyncio.ensure_future(readiness.checks(backends(runs))) for _ in range(50)]
    await asyncio.sleep(0)  # let every caller reach the shared check
    runs.gate.set()
    answers = await asyncio.gather(*waiting)
    assert runs.pings == 1
    assert all(answer == {"temporal": "ok", "redis": "ok"} for answer in answers)


async def test_a_result_is_reused_until_it_is_max_age_old() -> None:
    now = [100.0]
    runs = CountingRuns()
    readiness = Readiness(max_age=1.0, clock=lambda: now[0])
    context = backends(runs)
    await readiness.checks(context)
    now[0] = 100.9
    await readiness.checks(context)
    assert runs.pings == 1
    now[0] = 101.0
    runs.down = True
    checks = await readiness.checks(context)
    assert runs.pings == 2
    # The API's own sentence, never the backend's text.
    assert checks["temporal"] == public_sentence(BackendUnavailable("x", backend="temporal"))
    assert "10.0.0.7" not in checks["temporal"]


async def test_a_caller_leaving_does_not_cancel_the_check_others_wait_for() -> None:
    runs = CountingRuns()
    runs.gate.clear()
    readiness = Readiness(clock=lambda: 0.0)
    context = backends(runs)
    leaving = asyncio.ensure_future(readiness.checks(context))
    staying = asyncio.ensure_future(readiness.checks(context))
    await asyncio.sleep(0)
    leaving.cancel()
    runs.gate.set()
    assert await staying == {"temporal": "ok", "redis": "ok"}
    assert runs.pings == 1
