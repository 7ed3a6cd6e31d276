"""When the API process runs Python's full garbage collection.

CPython collects its youngest generations often and cheaply, and runs a *full* collection, over
every tracked object, whenever the objects promoted to the oldest generation since the last one
outnumber a quarter of those already there. A process holding thousands of open streams keeps
about 120 tracked objects per stream, and each stream renews part of them (its wait's timer,
future and coroutines) at every heartbeat: renewed objects are promoted anew, so that rule fires
over and over although what it counts dies by reference counting. Measured on one process with
10,000 streams: a full collection every 10 s, each stopping the event loop, so every stream, for
about 1.2 s (the p99 of an update's delivery went from 166 ms to 479 ms).

A full pass is only needed for the reference cycles that lived long enough to reach the oldest
generation (a closed stream's, a request's caught mid-flight by a young collection), and what
those cost is memory. So `FullCollections` keeps CPython's young collections and takes the full
one over, with the same quarter measured on memory instead of on promotions: it runs once the
interpreter's allocated blocks (`sys.getallocatedblocks()`: small objects, garbage included) grew
by a quarter since the last pass (and by at least `min_growth` blocks), and at least every
`max_interval` seconds for garbage held outside those blocks. Renewed objects replace the ones
they succeed, so they do not grow it; garbage does. A pass costs time in proportion to what is
alive and comes once per a quarter of it in new garbage; the garbage waiting for it stays under a
quarter of the memory, and never older than `max_interval`.

`install` is called once per server process (`cli.main`); the transport's sweep (`web.transport`),
which runs every second or more often while connections are open, calls `tick`.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("workflow_runs.collector")

# CPython runs a full collection after this many young (generation 1) collections, and only when
# its quarter rule holds too. A count no process reaches leaves the decision to `FullCollections`.
_NEVER = 1 << 30

GROWTH = 0.25  # of the blocks held after the last pass
MIN_GROWTH_BLOCKS = 200_000  # about 20 MB of small objects: a small heap is not walked for less
MAX_INTERVAL_SECONDS = 600.0
CHECK_SECONDS = 1.0  # counting the blocks walks the allocator's pools: ~0.2 ms for 9 million


class FullCollections:
    """Runs `gc.collect()` (every generation) when due; see the module's docstring for when."""

    def __init__(
        self,
        *,
        growth: float = GROWTH,
        min_growth: int = MIN_GROWTH_BLOCKS,
        max_interval: float = MAX_INTERVAL_SECONDS,
        check_every: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[], int] = gc.collect,
        blocks: Callable[[], int] = sys.getallocatedblocks,
    ) -> None:
        self.growth = growth
        self.min_growth = min_growth
        self.max_interval = max_interval
        self.check_every = check_every
        self._clock = clock
        self._collect = collect
        self._blocks = blocks
        self.held = blocks()  # after the last pass (or at start)
        self.last = self.checked = clock()
        self.runs = 0

    @classmethod
    def install(cls) -> FullCollections:
        """Take full collections over for this process: CPython's own full pass no longer runs."""
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)
        return cls()

    def tick(self) -> None:
        """Called often (the transport's sweep): runs the pass if one is due, checked at most
        every `check_every` seconds."""
        now = self._clock()
        if now - self.checked < self.check_every:
            return
        self.checked = now
        if now - self.last >= self.max_interval:
            self.run("interval")
        elif self._blocks() - self.held >= max(self.held * self.growth, self.min_growth):
            self.run("growth")

    def run(self, reason: str) -> None:
        started = self._clock()
        found = self._collect()
        self.held = self._blocks()
        self.last = self.checked = self._clock()
        self.runs += 1
        log.debug("full garbage collection (%s): %d unreachable, %.3f s", reason, found, self.last - started)
