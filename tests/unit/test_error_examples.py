"""Every error example of the document is a body the server really sends: for each one, a request
that produces it (on the fake backends, whose messages are the real backends' words) must get the
same status, `error`, `errorCode` and `message`, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from core.errors import BackendUnavailable, TooManyRequests
from core.principals import Principal
from handlers.stream_limits import StreamLimiter
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, app_settings, bearer, fake_backends_factory
from web import errors
from web.app import create_app, published_document

SECRET = "error-examples-unit-test-secret-" + "x" * 40
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
POST = f"/api/v1/workflows/runs/{RUN_ID}/updates"
REQUEST_ID = "9b2f0c1e7d4a4f3e"  # the 503 example's


class DownRuns(FakeRuns):
    async def get_run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise BackendUnavailable("connect: connection refused 10.0.0.7:7233", backend="temporal")


@dataclass
class Request:
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    runs: FakeRuns = field(default_factory=lambda: FakeRuns(status="RUNNING"))


REQUESTS = {
    "BadRequestError": Request("POST", "/api/v1/workflows/runs", json={"page_size": 0}),
    "UnauthorizedError": Request("GET", RUN, headers={"Authorization": "Bearer not.a.jwt"}),
    "ForbiddenError": Request("POST", f"{RUN}/actions/cancel", json={}, headers=bearer(SECRET, permissions=["x"])),
    # A run of another project is "not found", exactly as a run that does not exist.
    "NotFoundError": Request("GET", RUN, runs=FakeRuns(project="another-project")),
    "ConflictError": Request("POST", f"{RUN}/actions/cancel", json={}, runs=FakeRuns(status="COMPLETED")),
    "PayloadTooLargeError": Request("POST", POST, json={"message": "m" * 70_000}),
    "UnsupportedMediaTypeError": Request("POST", POST, content=b"{}", headers={"Content-Type": "text/plain"}),
    "ServiceUnavailableError": Request("GET", RUN, headers={"X-Request-ID": REQUEST_ID}, runs=DownRuns()),
}


def error_examples() -> dict[str, dict[str, Any]]:
    examples: dict[str, dict[str, Any]] = published_document()["components"]["examples"]
    return {name: example["value"] for name, example in examples.items() if name.endswith("Error")}


def test_every_error_example_has_a_request_that_produces_it() -> None:
    assert set(error_examples()) == set(REQUESTS) | {"TooManyRequestsError"}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_server_answers_each_error_example_as_written(name: str) -> None:
    request = REQUESTS[name]
    app = create_app(app_settings(SECRET, max_body_bytes=1_048_576), fake_backends_factory(request.runs, FakeUpdates()))
    with app.test_client() as client:
        response = client.request(
            request.method,
            request.path,
            json=request.json,
            content=request.content,
            headers={**bearer(SECRET), **request.headers},
        )
    assert response.json() == error_examples()[name]
    assert response.status_code == error_examples()[name]["status"]


def test_the_stream_limit_example_is_the_limiter_s_answer() -> None:
    """429 for a caller at its stream limit: the limiter's error through the error renderer (1000
    streams are too many to hold open in a unit test)."""
    limiter = StreamLimiter(per_principal=1000, per_process=10_000)
    alice = Principal(user_id="alice", project_id="p1")
    held = [limiter.acquire(alice) for _ in range(1000)]  # held: a dropped slot releases itself
    with pytest.raises(TooManyRequests) as refused:
        limiter.acquire(alice)
    assert len(held) == limiter.open_streams
    response = errors.domain_error_response(refused.value)
    assert orjson.loads(response.body) == error_examples()["TooManyRequestsError"]
