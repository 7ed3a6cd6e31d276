"""How handlers reach the request's principal and the backends.

Handlers declare a `token_info` parameter (Connexion fills it from `server.auth.decode_token`) and
call `backends()` for the adapters the lifespan built; nothing else is global. (The fast lane,
outside Connexion, reads the same two from the request's lifespan state and passes them in.)

`Backends` also carries the app's per-caller state, built from its settings with it: the rate
limits (`server.rate_limit`) and the stream limits (`server.sse.StreamLimiter`). One app, one set;
so tests that build several apps in one process keep them apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from connexion import request

from backends.protocol import Principal, RunsBackend, UpdatesBackend
from server.rate_limit import RateLimits
from server.settings import Settings
from server.sse import StreamLimiter


@dataclass(frozen=True)
class Backends:
    runs: RunsBackend
    updates: UpdatesBackend
    settings: Settings
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
                per_principal=settings.max_streams_per_principal, per_process=settings.max_streams_per_process
            ),
        )


def backends() -> Backends:
    state_backends: Backends = request.state.backends
    return state_backends


def principal_of(token_info: dict[str, Any]) -> Principal:
    principal: Principal = token_info["principal"]
    return principal
