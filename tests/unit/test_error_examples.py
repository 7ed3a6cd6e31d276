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
RUN_TEMPLATE = "/workflows/runs/{workflowId}/{runId}"
REQUEST_ID = "9b2f0c1e7d4a4f3e"  # the 503 example's


class DownRuns(FakeRuns):
    async def get_run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise BackendUnavailable("connect: connection refused 10.0.0.7:7233", backend="temporal")


class BrokenRuns(FakeRuns):
    """A bug below the handler: what the server answers is the documented 500's example."""

    async def get_run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("a bug, whose words must not reach the client")


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
    # The overlapping seed paths: a GET of `/workflows/runs/{runId}/updates` (see SeedPathOverlap).
    "MethodNotAllowedError": Request("GET", f"/api/v1/workflows/runs/{WORKFLOW_ID}/updates"),
    "InternalServerError": Request("GET", RUN, headers={"X-Request-ID": REQUEST_ID}, runs=BrokenRuns()),
}


def error_examples() -> dict[str, dict[str, Any]]:
    examples: dict[str, dict[str, Any]] = published_document()["components"]["examples"]
    return {name: example["value"] for name, example in examples.items() if name.endswith("Error")}


def test_every_error_example_has_a_request_that_produces_it() -> None:
    assert set(error_examples()) == set(REQUESTS) | {"TooManyRequestsError"}


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "connexion"])
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_server_answers_each_error_example_as_written(name: str, fast_lane: bool) -> None:
    request = REQUESTS[name]
    settings = app_settings(SECRET, max_body_bytes=1_048_576, fast_lane=fast_lane)
    app = create_app(settings, fake_backends_factory(request.runs, FakeUpdates()))
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


def operations() -> list[tuple[str, dict[str, Any]]]:
    document = published_document()
    return [
        (f"{method.upper()} {path}", operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


@pytest.mark.parametrize(("name", "operation"), operations(), ids=[name for name, _ in operations()])
def test_every_operation_documents_the_500(name: str, operation: dict[str, Any]) -> None:
    assert operation["responses"]["500"] == {"$ref": "#/components/responses/InternalServerError"}


def test_the_405_is_documented_where_the_server_answers_it_with_its_allow_header() -> None:
    """Only a GET can reach the overlapping path through a documented operation: getWorkflowRun's
    template with `runId` = `updates`. The header the server sends is the one documented."""
    paths = published_document()["paths"]
    assert paths[RUN_TEMPLATE]["get"]["responses"]["405"] == {"$ref": "#/components/responses/MethodNotAllowed"}
    assert all("405" not in operation["responses"] for name, operation in operations() if name != f"GET {RUN_TEMPLATE}")
    allow = published_document()["components"]["headers"]["Allow"]["schema"]["const"]
    app = create_app(app_settings(SECRET), fake_backends_factory(FakeRuns(), FakeUpdates()))
    with app.test_client() as client:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            response = client.request(method, f"/api/v1/workflows/runs/{RUN_ID}/updates", headers=bearer(SECRET))
            assert (response.status_code, response.headers["allow"]) == (405, allow), method
        # The three-segment path is getWorkflowRunUpdates, untouched by the overlap.
        assert client.get(f"{RUN}/updates", headers=bearer(SECRET)).status_code == 200
