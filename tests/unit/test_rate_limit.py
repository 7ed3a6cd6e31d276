"""Per-caller rate limits (handlers/rate_limits.py): the buckets on their own, then every operation
through the whole app on fake backends, with and without the fast lane.

Time is a fake clock handed to the app's backends: buckets refill when the test moves it, never
while the test runs, so every count below is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from core.errors import TooManyRequests
from core.principals import Principal
from core.protocols import LiveSink, UpdateEvent
from core.settings import Settings
from core.tokens import mint_token
from handlers.deps import Deps
from handlers.rate_limits import RateLimits, TokenBuckets
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, fake_backends_factory, the_run
from web.app import create_app

SECRET = "rate-limit-unit-test-secret-" + "x" * 40
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
OTHER_RUN_ID = "0b9f3c1e-5d2a-4f6b-8e7c-1a2b3c4d5e6f"

# Every operation: (operationId, method, path, JSON body), and which bucket it takes from (a stream
# opening takes from both: it asks Temporal for the run's status whether or not the run is known).
TEMPORAL_OPERATIONS = [
    ("getWorkflowRun", "GET", RUN, None),
    ("listWorkflowRuns", "POST", "/api/v1/workflows/runs", {}),
    ("applyWorkflowRunAction", "POST", f"{RUN}/actions/cancel", {}),
    ("signalWorkflowRun", "POST", f"{RUN}/signal/approve", {"message": "go"}),
    ("listConversations", "POST", "/api/v1/workflows/conversations", {}),
]
UPDATE_OPERATIONS = [
    ("getWorkflowRunUpdates", "GET", f"{RUN}/updates", None),
    ("postWorkflowRunUpdate", "POST", f"/api/v1/workflows/runs/{RUN_ID}/updates", {"message": "m"}),
    ("streamWorkflowRunUpdates", "GET", f"{RUN}/stream", None),
]
OPERATIONS = TEMPORAL_OPERATIONS + UPDATE_OPERATIONS
BOTH_BUCKETS = [UPDATE_OPERATIONS[2]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingRuns(FakeRuns):
    """Counts the calls that would reach Temporal."""

    def __init__(self, status: str = "RUNNING") -> None:
        super().__init__(status=status)
        self.calls = 0

    async def get_run(self, principal: Principal, workflow_id: str, run_id: str) -> dict[str, Any]:
        self.calls += 1
        return await super().get_run(principal, workflow_id, run_id)

    async def list_runs(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().list_runs(*args, **kwargs)

    async def apply_action(self, *args: Any) -> None:
        self.calls += 1
        await super().apply_action(*args)
        self.add(the_run(status="RUNNING"))  # open again: the buckets alone decide the next answer

    async def signal(self, *args: Any) -> None:
        self.calls += 1
        await super().signal(*args)

    async def find_run(self, principal: Principal, run_id: str, workflow_id: str | None = None) -> Any:
        if not self.is_known(run_id, workflow_id):
            self.calls += 1  # the real backend asks Temporal only for what it has not seen
        return await super().find_run(principal, run_id, workflow_id)

    async def closed_status(self, workflow_id: str, run_id: str, *, fresh: bool = False) -> str | None:
        self.calls += 1  # a describe (shared by the run's concurrent askers)
        return await super().closed_status(workflow_id, run_id, fresh=fresh)


class EndedStream:
    """A stream that the hub ends at once (so that a test client gets the whole response)."""

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        raise StopAsyncIteration

    def finish(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class CountingUpdates(FakeUpdates):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        self.calls += 1
        return await super().append(run_id, update)

    async def read_since(self, run_id: str, since_ms: int) -> bytes:
        self.calls += 1
        return await super().read_since(run_id, since_ms)

    async def open_stream(  # type: ignore[override]
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> EndedStream:
        self.calls += 1
        return EndedStream()


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "jwt_secret": SECRET,
        "jwt_public_key": None,
        "jwks_url": None,
        "validate_responses": True,
        "rate_limit_temporal_per_second": 1,
        "rate_limit_temporal_burst": 3,
        "rate_limit_updates_per_second": 2,
        "rate_limit_updates_burst": 5,
    }
    return replace(Settings(), **{**values, **overrides})


class App:
    def __init__(self, client: Any, clock: Clock, runs: CountingRuns, updates: CountingUpdates) -> None:
        self.client, self.clock, self.runs, self.updates = client, clock, runs, updates

    @property
    def deps(self) -> Deps:
        """What the app's lifespan built (the test client keeps the lifespan's state)."""
        deps: Deps = self.client.app_state["deps"]
        return deps

    def call(
        self, operation: tuple[str, str, str, Any], *, user: str = "u1", project: str = "p1", kind: str = "user"
    ) -> Any:
        _, method, path, body = operation
        headers = {"Authorization": f"Bearer {mint_token(SECRET, user=user, project=project, kind=kind)}"}
        return self.client.request(method, path, json=body, headers=headers)

    @property
    def backend_calls(self) -> int:
        return self.runs.calls + self.updates.calls


def app_of(*, status: str = "RUNNING", **overrides: Any) -> Iterator[App]:
    runs, updates, clock = CountingRuns(status), CountingUpdates(), Clock()
    factory = fake_backends_factory(runs, updates)
    with create_app(settings(**overrides), factory, clock=clock).test_client() as client:
        yield App(client, clock, runs, updates)


@pytest.fixture(params=[True, False], ids=["fast-lane", "connexion"])
def app(request: pytest.FixtureRequest) -> Iterator[App]:
    """The same app with and without the fast lane: both paths must charge."""
    yield from app_of(fast_lane=request.param)


def assert_429(response: Any, retry_after: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["retry-after"] == str(retry_after)
    body = response.json()
    assert body["status"] == 429 and body["error"] == "Too Many Requests"
    assert body["errorCode"] == "too_many_requests"
    assert "a second" in body["message"]


# -- through the app ------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op[0] for op in OPERATIONS])
def test_every_operation_answers_429_beyond_its_bucket_without_reaching_a_backend(
    app: App, operation: tuple[str, str, str, Any]
) -> None:
    burst = 3 if operation in TEMPORAL_OPERATIONS + BOTH_BUCKETS else 5
    answers = [app.call(operation).status_code for _ in range(burst)]
    assert all(status < 400 for status in answers), answers
    calls = app.backend_calls
    refused = app.call(operation)
    assert_429(refused, retry_after=1)  # one token comes back within the second (rate 1/s or 2/s)
    assert app.backend_calls == calls  # charged before any backend call

    app.clock.now += 1.0  # a second later, one token is back (two for updates): served again
    assert app.call(operation).status_code < 400


def test_update_operations_on_a_run_this_process_has_not_seen_also_take_from_the_temporal_bucket(
    app: App,
) -> None:
    post = UPDATE_OPERATIONS[1]
    get_run = TEMPORAL_OPERATIONS[0]
    # The first post resolves the run (a Temporal call): it takes from both buckets.
    assert app.call(post).status_code == 200
    assert [app.call(get_run).status_code for _ in range(2)] == [200, 200]
    assert_429(app.call(get_run), retry_after=1)  # 1 + 2 = the temporal burst of 3
    # The run is known now: posts only take from the updates bucket, Temporal's being empty.
    assert [app.call(post).status_code for _ in range(4)] == [200] * 4
    # A run it does not know needs a Temporal token: refused before anything is asked (the flood
    # of random run ids that used to push Temporal into its namespace rate limit).
    calls = app.backend_calls
    unknown = (post[0], post[1], f"/api/v1/workflows/runs/{OTHER_RUN_ID}/updates", post[3])
    app.clock.now += 0.5  # one update token back (2/s), still no Temporal one (1/s)
    assert_429(app.call(unknown), retry_after=1)
    assert app.backend_calls == calls
    # ... and, refused, it took nothing from the updates bucket either.
    assert app.call(post).status_code == 200


def test_a_known_run_id_under_another_workflow_id_takes_from_the_temporal_bucket(app: App) -> None:
    read = UPDATE_OPERATIONS[0]
    get_run = TEMPORAL_OPERATIONS[0]
    assert app.call(read).status_code == 200  # resolves the run: one Temporal token of 3
    assert app.runs.is_known(RUN_ID, WORKFLOW_ID)

    def under(workflow_id: str) -> tuple[str, str, str, Any]:
        return (read[0], read[1], f"/api/v1/workflows/runs/{workflow_id}/{RUN_ID}/updates", None)

    # The run id is known, but not under these workflow ids: each look-up asks Temporal, so each
    # takes a Temporal token (the flood that used to get 404s at the updates rate, never a 429).
    assert [app.call(under(f"random-{i}")).status_code for i in range(2)] == [404, 404]
    calls = app.backend_calls
    assert_429(app.call(under("random-2")), retry_after=1)
    assert app.backend_calls == calls
    # An answer that was just "not found" is remembered: asking again costs Temporal nothing, and
    # takes nothing from its bucket (still empty: run details are refused).
    assert app.call(under("random-0")).status_code == 404
    assert app.backend_calls == calls
    assert_429(app.call(get_run), retry_after=1)


@pytest.mark.parametrize("status", ["RUNNING", "COMPLETED"])
def test_every_stream_opening_takes_from_the_temporal_bucket_even_for_a_known_run(status: str) -> None:
    for app in app_of(status=status):
        stream = UPDATE_OPERATIONS[2]
        assert app.call(UPDATE_OPERATIONS[0]).status_code == 200  # the run is known from here on
        assert [app.call(stream).status_code for _ in range(2)] == [200, 200]  # 1 + 2 = the burst of 3
        calls = app.backend_calls
        refused = app.call(stream)
        assert_429(refused, retry_after=1)
        assert "stream openings" in refused.json()["message"]
        assert app.backend_calls == calls
        assert app.deps.streams.open_streams == 0
        # The updates bucket (5) still had tokens: a read of the known run is served.
        assert app.call(UPDATE_OPERATIONS[0]).status_code == 200


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "connexion"])
def test_one_caller_over_its_rates_does_not_limit_the_others(fast_lane: bool) -> None:
    for app in app_of(fast_lane=fast_lane, rate_limit_temporal_burst=8, rate_limit_updates_burst=8):
        # The greedy caller empties both of its buckets...
        greedy = [app.call(op, user="greedy").status_code for op in OPERATIONS for _ in range(10)]
        assert greedy.count(429) >= 2 * len(OPERATIONS) and set(greedy) <= {200, 429}
        assert_429(app.call(OPERATIONS[0], user="greedy"), retry_after=1)
        assert_429(app.call(UPDATE_OPERATIONS[1], user="greedy"), retry_after=1)
        # ... while every other caller, at the same moment, is served in full: another user, the
        # same user id in another project, an API key with the same id.
        for user, project, kind in (("polite", "p1", "user"), ("greedy", "p2", "user"), ("greedy", "p1", "apikey")):
            served = [app.call(op, user=user, project=project, kind=kind).status_code for op in OPERATIONS]
            # (the fake's run is in p1: from p2 it is 404, listings are empty)
            assert set(served) == ({200, 404} if project == "p2" else {200}), (user, project, kind, served)


def test_a_stream_refused_by_the_rate_holds_no_stream_place() -> None:
    for app in app_of(rate_limit_updates_burst=1):
        stream = UPDATE_OPERATIONS[2]
        assert app.call(stream).status_code == 200
        assert_429(app.call(stream), retry_after=1)
        assert app.deps.streams.open_streams == 0
        app.clock.now += 1.0
        assert app.call(stream).status_code == 200


def test_a_rate_of_zero_turns_a_bucket_off() -> None:
    for app in app_of(rate_limit_temporal_per_second=0, rate_limit_updates_per_second=0):
        for operation in OPERATIONS:
            assert all(app.call(operation).status_code == 200 for _ in range(20)), operation[0]


# -- the buckets ----------------------------------------------------------------------------------


def limits(temporal: tuple[float, int] = (1.0, 2), updates: tuple[float, int] = (10.0, 20)) -> RateLimits:
    clock = Clock()
    return RateLimits(
        TokenBuckets("temporal", rate=temporal[0], burst=temporal[1], what="calls"),
        TokenBuckets("updates", rate=updates[0], burst=updates[1], what="calls"),
        clock=clock,
    )


ALICE = Principal(user_id="alice", project_id="p1")


def test_retry_after_is_the_whole_seconds_until_a_token_at_least_one() -> None:
    rates = limits(temporal=(0.25, 1))  # one token every 4 s
    rates.charge_temporal(ALICE)
    with pytest.raises(TooManyRequests) as refused:
        rates.charge_temporal(ALICE)
    assert refused.value.retry_after == 4
    rates.clock.now += 3.5  # type: ignore[attr-defined]
    with pytest.raises(TooManyRequests) as refused:
        rates.charge_temporal(ALICE)
    assert refused.value.retry_after == 1  # half a second left: rounded up, never 0
    rates.clock.now += 0.5  # type: ignore[attr-defined]
    rates.charge_temporal(ALICE)


def test_a_bucket_refills_up_to_its_burst_only() -> None:
    rates = limits(temporal=(1.0, 2))
    rates.clock.now += 3600  # type: ignore[attr-defined]  # idle for an hour: still two tokens
    rates.charge_temporal(ALICE)
    rates.charge_temporal(ALICE)
    with pytest.raises(TooManyRequests):
        rates.charge_temporal(ALICE)


def test_callers_are_principals_within_their_project() -> None:
    rates = limits(temporal=(1.0, 1))
    for principal in (
        ALICE,
        Principal(user_id="alice", project_id="p2"),
        Principal(user_id="alice", kind="apikey", project_id="p1"),
        Principal(user_id="bob", project_id="p1"),
    ):
        rates.charge_temporal(principal)
    with pytest.raises(TooManyRequests):
        rates.charge_temporal(ALICE)


def test_a_stream_opening_takes_from_both_buckets() -> None:
    rates = limits(temporal=(1.0, 1), updates=(1.0, 2))
    rates.charge_stream_open(ALICE)
    with pytest.raises(TooManyRequests):
        rates.charge_stream_open(ALICE)  # no Temporal token left...
    rates.charge_updates(ALICE, run_known=True)  # ...while one update token is
    with pytest.raises(TooManyRequests):
        rates.charge_updates(ALICE, run_known=True)


def test_a_refused_charge_takes_nothing_from_either_bucket() -> None:
    rates = limits(temporal=(1.0, 1), updates=(1.0, 1))
    rates.charge_temporal(ALICE)  # the temporal bucket is empty
    with pytest.raises(TooManyRequests):
        rates.charge_updates(ALICE, run_known=False)
    rates.charge_updates(ALICE, run_known=True)  # the updates token was still there
    with pytest.raises(TooManyRequests):
        rates.charge_updates(ALICE, run_known=True)


def test_idle_full_buckets_are_dropped_as_new_callers_arrive() -> None:
    rates = limits(temporal=(1.0, 2))
    table = rates.temporal
    for i in range(10):
        rates.charge_temporal(Principal(user_id=f"u{i}", project_id="p1"))
    assert len(table) == 10
    rates.clock.now += 1.5  # type: ignore[attr-defined]  # everyone is full again (1 + 1.5 >= 2)
    for i in range(5):
        rates.charge_temporal(Principal(user_id=f"new{i}", project_id="p1"))
    assert len(table) == 10 + 5 - 2 * 5  # each arrival dropped two idle full buckets
    # A caller whose bucket was dropped starts full, as it would have been: nothing changes for it.
    rates.charge_temporal(Principal(user_id="u0", project_id="p1"))
    rates.charge_temporal(Principal(user_id="u0", project_id="p1"))


def test_buckets_that_are_not_full_are_kept() -> None:
    rates = limits(temporal=(1.0, 60))
    for i in range(10):
        rates.charge_temporal(Principal(user_id=f"u{i}", project_id="p1"))
    rates.clock.now += 0.5  # type: ignore[attr-defined]
    rates.charge_temporal(Principal(user_id="new", project_id="p1"))
    assert len(rates.temporal) == 11  # nobody is back to 60 tokens: nothing may be forgotten


def test_the_table_never_holds_more_than_its_cap() -> None:
    buckets = TokenBuckets("temporal", rate=1.0, burst=60, what="calls", max_callers=100)
    rates = RateLimits(buckets, TokenBuckets("updates", rate=0, burst=1, what="calls"), clock=Clock())
    for i in range(1000):
        rates.charge_temporal(Principal(user_id=f"u{i}", project_id="p1"))
    assert len(buckets) == 100
    # The least recently used were forgotten; the most recent are still counted.
    for _ in range(59):
        rates.charge_temporal(Principal(user_id="u999", project_id="p1"))
    with pytest.raises(TooManyRequests):
        rates.charge_temporal(Principal(user_id="u999", project_id="p1"))


def test_a_rate_of_zero_keeps_no_table() -> None:
    rates = limits(temporal=(0.0, 1), updates=(0.0, 1))
    for _ in range(100):
        rates.charge_temporal(ALICE)
        rates.charge_updates(ALICE, run_known=False)
    assert len(rates.temporal) == 0 and len(rates.updates) == 0
