"""When the API process runs Python's full garbage collection.

CPython collects its youngest generations often and cheaply, and runs a *full* collection, over
every tracked object, whenever the objects promoted to the oldest generation since the last one
outnumber a quarter of those already there. A process holding thousands of open streams keeps
about 120 tracked objects per stream, and each stream renews part of them (its wait's timer,
future and coroutines) at every heartbeat: renewed objects are promoted anew, so that rule fires
over and over although what it counts dies by reference counting. Measured on one process with
10,000 streams: a full collection every 10 s, each stopping the event loop, so every stream, for
about 1.2 s (the p99 of an update's delivery went from 166 ms to 479 ms).

A full pass is only needed for reference cycles among objects that lived long enough to reach the
oldest generation, which here are mostly those of connections that closed (a closed stream leaves
about 46 such objects). So `FullCollections` keeps CPython's young collections and takes the full
one over: it runs once as many connections have closed since the last one as were open then or
are open now (at least `min_closed`), and at least every `max_interval` seconds for cycles built
elsewhere. A full pass costs time in proportion to what is alive, paid once per as many closes; the
cycles left waiting stay about what the open connections hold, and never older than
`max_interval`. Counting from the last pass keeps a mass disconnect (every client of a load
balancer gone at once) to one pass, not one per `min_closed` closes while the heap still holds
the streams being torn down.

The transport (`web.transport`) tells it of each closed connection and, on its sweep, asks it
whether the interval has passed; `install` is called once per server process (`cli.main`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("workflow_runs.collector")

# CPython runs a full collection after this many young (generation 1) collections, and only when
# the quarter rule above holds too. A count no process reaches leaves the decision to us.
_NEVER = 1 << 30

MIN_CLOSED = 1_000  # closes before a full pass, whatever few connections are open
MAX_INTERVAL_SECONDS = 600.0


class FullCollections:
    """Runs `gc.collect()` (every generation) when due; see the module's docstring for when."""

    def __init__(
        self,
        *,
        min_closed: int = MIN_CLOSED,
        max_interval: float = MAX_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[], int] = gc.collect,
    ) -> None:
        self.min_closed = min_closed
        self.max_interval = max_interval
        self._clock = clock
        self._collect = collect
        self.closed = 0  # connections closed since the last full pass
        self.open_then = 0  # connections open at the last full pass
        self.last = clock()
        self.runs = 0

    @classmethod
    def install(cls) -> FullCollections:
        """Take full collections over for this process: CPython's own full pass no longer runs."""
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)
        return cls()

    def connection_closed(self, open_connections: int) -> None:
        self.closed += 1
        if self.closed >= max(open_connections, self.open_then, self.min_closed):
            self.run("closed connections", open_connections)

    def tick(self, open_connections: int) -> None:
        """Called now and then (the transport's sweep): the pass that `max_interval` owes."""
        if self._clock() - self.last >= self.max_interval:
            self.run("interval", open_connections)

    def run(self, reason: str, open_connections: int) -> None:
        started = self._clock()
        found = self._collect()
        self.last = self._clock()
        self.closed = 0
        self.open_then = open_connections
        self.runs += 1
        log.debug("full garbage collection (%s): %d unreachable, %.3f s", reason, found, self.last - started)
