"""Per-caller rate limits: token buckets, so that one caller cannot slow the others down.

A caller is the token's principal (`Principal.ref`) within its project, as for the stream limits.
Each caller has two buckets, each refilled continuously at its rate up to its burst:

- `temporal`: operations that reach Temporal (run details, listings of runs and conversations,
  actions, signals, stream openings: a stream asks for its run's status as it opens), and reads
  and posts of updates of a run this process has not resolved yet under the ids asked (resolving
  it asks Temporal), and each further look-up of a post waiting for its run to be listed
  (`charge_temporal`, called by the runs backend before each one: docs/decisions/0015-visibility-lag.md).
  Temporal's own limit is per namespace: without this one caller's flood would be everyone's 503.
- `updates`: reading, posting and opening a stream of a run's updates (Redis work).

A request is charged before any backend call; if a bucket it needs is empty it is refused with
`TooManyRequests` (429) and `Retry-After`, the whole seconds until a token is there (at least 1), and
takes nothing from the other bucket. A rate of 0 turns a bucket off. Refusals are counted by bucket
(`workflow_runs_rate_limit_refusals_total`, `core.metrics`).

Cost and memory: O(1) per request, no timer, `time.monotonic`. Buckets live in one insertion-ordered
table per kind, the most recently used last. A bucket left idle long enough to be full again is the
same as no bucket, so a new caller's arrival drops up to two such buckets from the front of the
table; and the table never holds more than `max_callers` buckets: beyond that the least recently
used one is forgotten, whatever it holds (its caller, idle the longest, starts again with a full
bucket).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from core import metrics
from core.errors import TooManyRequests
from core.principals import Principal
from core.settings import Settings

Caller = tuple[str | None, str]  # (project id, principal ref)

MAX_CALLERS = 50_000  # buckets kept per kind (a few hundred bytes each)
SWEEP = 2  # idle full buckets dropped, at most, when a new caller arrives


def caller_of(principal: Principal) -> Caller:
    return (principal.project_id, principal.ref)


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class TokenBuckets:
    """One token bucket per caller: `rate` tokens a second, at most `burst` held."""

    def __init__(self, name: str, *, rate: float, burst: int, what: str, max_callers: int = MAX_CALLERS) -> None:
        self.name = name
        self.rate = max(rate, 0.0)
        self.burst = max(burst, 1)
        self.what = what  # the operations it limits, for the 429 message
        self.max_callers = max(max_callers, 1)
        self._buckets: OrderedDict[Caller, _Bucket] = OrderedDict()
        self._refusals = metrics.rate_limit_refusals(name)  # workflow_runs_rate_limit_refusals_total

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def refilled(self, caller: Caller, now: float) -> _Bucket:
        """The caller's bucket, refilled up to `now` and marked most recently used."""
        buckets = self._buckets
        bucket = buckets.get(caller)
        if bucket is None:
            self._make_room(now)
            bucket = buckets[caller] = _Bucket(float(self.burst), now)
            return bucket
        buckets.move_to_end(caller)
        if now > bucket.at:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket

    def wait_for(self, bucket: _Bucket) -> float:
        """Seconds until `bucket` holds a whole token (0 when it does)."""
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def refused(self, wait: float) -> TooManyRequests:
        """The refusal of a request that needs a token now, counted in the metrics."""
        self._refusals.inc()
        retry_after = max(1, math.ceil(wait))
        return TooManyRequests(
            f"Too many requests: each caller may make {self.rate:g} {self.what} a second "
            f"(bursts of {self.burst}); retry in {retry_after} s.",
            retry_after=retry_after,
        )

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(SWEEP):
            if not buckets:
                return
            caller, oldest = next(iter(buckets.items()))
            if oldest.tokens + (now - oldest.at) * self.rate < self.burst:
                break  # the least recently used is not full yet; the next arrival looks again
            del buckets[caller]
        while len(buckets) >= self.max_callers:
            buckets.popitem(last=False)


class RateLimits:
    """The two buckets of every caller of one app (built from its settings; see `handlers.deps.Deps`)."""

    def __init__(
        self, temporal: TokenBuckets, updates: TokenBuckets, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.temporal = temporal
        self.updates = updates
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> RateLimits:
        return cls(
            TokenBuckets(
                "temporal",
                rate=settings.rate_limit_temporal_per_second,
                burst=settings.rate_limit_temporal_burst,
                what="run reads, listings, actions, signals and stream openings",
            ),
            TokenBuckets(
                "updates",
                rate=settings.rate_limit_updates_per_second,
                burst=settings.rate_limit_updates_burst,
                what="update reads, posts and stream openings",
            ),
            clock=clock,
        )

    def charge_stream_open(self, principal: Principal) -> None:
        """One stream opening: an update operation that always reaches Temporal (the run's status
        is asked as the stream opens, whether or not the run is known)."""
        self.charge_updates(principal, run_known=False)

    def charge_temporal(self, principal: Principal) -> None:
        """One operation that reaches Temporal; `TooManyRequests` when the caller is over its rate."""
        if self.temporal.enabled:
            self._charge(caller_of(principal), (self.temporal,))

    def charge_updates(self, principal: Principal, *, run_known: bool) -> None:
        """One update operation, plus one Temporal operation when the run is not known to this
        process yet (resolving it asks Temporal). Nothing is taken unless every bucket has a token."""
        needed = (self.updates,) if run_known else (self.updates, self.temporal)
        kinds = tuple(kind for kind in needed if kind.enabled)
        if kinds:
            self._charge(caller_of(principal), kinds)

    def _charge(self, caller: Caller, kinds: tuple[TokenBuckets, ...]) -> None:
        now = self.clock()
        buckets = [kind.refilled(caller, now) for kind in kinds]
        wait, short = 0.0, None
        for kind, bucket in zip(kinds, buckets, strict=True):
            kind_wait = kind.wait_for(bucket)
            if kind_wait > wait:
                wait, short = kind_wait, kind
        if short is not None:
            raise short.refused(wait)
        for bucket in buckets:
            bucket.tokens -= 1.0
