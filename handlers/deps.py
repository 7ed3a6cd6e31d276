"""What every handler is given besides its principal and its parameters: `Deps`.

One `Deps` per app, built by the app's lifespan from the settings and the backends it connected,
and passed to every handler call by the HTTP layer (Connexion's endpoint and the fast lane alike).
It carries the app's per-caller state too: the rate limits (`handlers.rate_limits`), the stream
limits (`handlers.stream_limits`) and the stop signal open streams watch (`core.shutdown`). One
app, one set, so tests that build several apps in one process keep them apart. `stream_slots`,
when the app gives one (`SHARED_STREAM_LIMITS=1`), counts each caller's open streams across every
process too; the app owns it and closes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

from core.protocols import RunsBackend, StreamSlots, UpdatesBackend
from core.settings import Settings
from core.shutdown import ServerShutdown
from handlers.rate_limits import RateLimits
from handlers.stream_limits import StreamLimiter


@dataclass(frozen=True)
class Deps:
    runs: RunsBackend
    updates: UpdatesBackend
    settings: Settings
    shutdown: ServerShutdown = field(default_factory=ServerShutdown)
    stream_slots: StreamSlots | None = None
    # The rate limits' clock (tests pass their own, to refill buckets without waiting).
    clock: InitVar[Callable[[], float]] = time.monotonic
    rates: RateLimits = field(init=False)
    streams: StreamLimiter = field(init=False)

    def __post_init__(self, clock: Callable[[], float]) -> None:
        settings = self.settings
        object.__setattr__(self, "rates", RateLimits.from_settings(settings, clock=clock))
        object.__setattr__(
            self,
            "streams",
            StreamLimiter(
                per_principal=settings.max_streams_per_principal,
                per_process=settings.max_streams_per_process,
                shared=self.stream_slots,
            ),
        )
