"""When the API process runs Python's full garbage collection.

CPython collects its youngest generations often and cheaply, and runs a *full* collection, over
every tracked object, whenever the objects promoted to the oldest generation since the last one
outnumber a quarter of those already there. A process holding thousands of open streams keeps
about 120 tracked objects per stream, and each stream renews part of them (its wait's timer,
future and coroutines) at every heartbeat: renewed objects are promoted anew, so that rule fires
over and over although what it counts dies by reference counting. Measured on one process with
10,000 streams: a full collection every 10 s, each stopping the event loop, so every stream, for
about 1.2 s (the p99 of an update's delivery went from 166 ms to 479 ms over a minute).

A full pass is only needed for the reference cycles that lived long enough to reach the oldest
generation (a closed stream's, a request's caught mid-flight by a young collection), and what
those cost is memory. So `FullCollections` keeps CPython's young collections and takes the full
one over, with the same quarter measured on memory instead of on promotions. It runs a pass once,
since the last one, the interpreter's allocations (`sys.getallocatedblocks()`: every object, one
count each, garbage included) grew by a quarter and by at least `min_growth`, or the process's
resident memory grew by a quarter and by at least `min_rss_growth` bytes (a few cycles holding
large buffers: one allocation each, but megabytes), or `max_interval` seconds passed. Renewed
objects replace the ones they succeed, so they grow neither; garbage does. A pass costs time in
proportion to what is alive and comes once per a quarter of it in new garbage.

`install` is called once per server process (`cli.main`), before the loop runs; `start` then
checks every `check_every` seconds on the server's loop, whether or not connections are open.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger("workflow_runs.collector")

# CPython runs a full collection after this many young (generation 1) collections, and only when
# its quarter rule holds too. A count no process reaches leaves the decision to `FullCollections`.
_NEVER = 1 << 30

GROWTH = 0.25  # of the allocations, or of the resident memory, after the last pass
MIN_GROWTH_BLOCKS = 200_000  # a small heap is not walked for less
MIN_RSS_GROWTH_BYTES = 64 << 20
MAX_INTERVAL_SECONDS = 600.0
CHECK_SECONDS = 1.0  # counting the allocations walks the allocator's pools: ~0.2 ms for 9 million

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's resident memory (Linux `/proc`); 0 where there is none to read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _full_passes() -> int:
    return int(gc.get_stats()[2]["collections"])


class FullCollections:
    """Runs `gc.collect()` (every generation) when due; see the module's docstring for when."""

    def __init__(
        self,
        *,
        growth: float = GROWTH,
        min_growth: int = MIN_GROWTH_BLOCKS,
        min_rss_growth: int = MIN_RSS_GROWTH_BYTES,
        max_interval: float = MAX_INTERVAL_SECONDS,
        check_every: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[], int] = gc.collect,
        blocks: Callable[[], int] = sys.getallocatedblocks,
        rss: Callable[[], int] = resident_bytes,
        passes: Callable[[], int] = _full_passes,
    ) -> None:
        self.growth = growth
        self.min_growth = min_growth
        self.min_rss_growth = min_rss_growth
        self.max_interval = max_interval
        self.check_every = check_every
        self._clock = clock
        self._collect = collect
        self._blocks = blocks
        self._rss = rss
        self._passes = passes
        self.held, self.resident = blocks(), rss()  # after the last pass (or at start)
        self.last = clock()
        self.runs = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def install(cls) -> FullCollections:
        """Take full collections over for this process: CPython's own full pass no longer runs."""
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)
        return cls()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Check every `check_every` seconds on `loop` until `stop`."""
        self.stop()
        self._timer = loop.call_later(self.check_every, self._check, loop)

    @property
    def checking(self) -> bool:
        """Started and not stopped."""
        return self._timer is not None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.tick()
        finally:
            self._timer = loop.call_later(self.check_every, self._check, loop)

    def due(self) -> str | None:
        """Why a pass is due now, or None."""
        if self._clock() - self.last >= self.max_interval:
            return "interval"
        if self._blocks() - self.held >= max(self.held * self.growth, self.min_growth):
            return "allocations"
        if self._rss() - self.resident >= max(self.resident * self.growth, self.min_rss_growth):
            return "resident memory"
        return None

    def tick(self) -> None:
        reason = self.due()
        if reason is not None:
            self.run(reason)

    def run(self, reason: str) -> None:
        started, before = self._clock(), self._passes()
        found = self._collect()
        if self._passes() == before:
            # Another thread was collecting: nothing was walked, so the pass is still owed.
            log.debug("full garbage collection (%s) skipped: a collection was under way", reason)
            return
        self.held, self.resident = self._blocks(), self._rss()
        self.last = self._clock()
        self.runs += 1
        log.debug("full garbage collection (%s): %d unreachable, %.3f s", reason, found, self.last - started)
