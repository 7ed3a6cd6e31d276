"""The HTTP layer on fake backends: authentication, the error body, routing, the served document."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import yaml

from core.settings import Settings
from core.tokens import mint_token
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, app_settings, fake_backends_factory
from web import middleware
from web.app import create_app, published_document
from web.errors import CHALLENGE_INVALID, CHALLENGE_NONE
from web.middleware import _request_ids

SECRET = "app-unit-test-secret-" + "x" * 48
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"

# One valid request per operation: (method, path, JSON body or None)
REQUESTS: dict[str, tuple[str, str, Any]] = {
    "getWorkflowRun": ("GET", RUN, None),
    "listWorkflowRuns": ("POST", "/api/v1/workflows/runs", {}),
    "applyWorkflowRunAction": ("POST", f"{RUN}/actions/cancel", {"reason": "r"}),
    "signalWorkflowRun": ("POST", f"{RUN}/signal/UserInput", {"message": "hi"}),
    "getWorkflowRunUpdates": ("GET", f"{RUN}/updates", None),
    "streamWorkflowRunUpdates": ("GET", f"{RUN}/stream", None),
    "postWorkflowRunUpdate": ("POST", f"/api/v1/workflows/runs/{RUN_ID}/updates", {"type": "PROGRESS"}),
    "listConversations": ("POST", "/api/v1/workflows/conversations", {}),
}


def settings() -> Settings:
    return app_settings(SECRET)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    app = create_app(settings(), fake_backends_factory(FakeRuns(status="COMPLETED")))
    with app.test_client() as test_client:
        yield test_client


def token(**kwargs: Any) -> str:
    return mint_token(SECRET, **{"user": "u1", "project": "p1", **kwargs})


def call(client: Any, operation: str, headers: dict[str, str] | None = None) -> Any:
    method, path, body = REQUESTS[operation]
    return client.request(method, path, json=body, headers=headers or {})


def assert_error_body(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    return body


BAD_TOKENS = {
    "missing": None,
    "malformed": "Bearer not.a.jwt",
    "not-bearer": "Basic dXNlcjpwYXNz",
    "wrong-signature": "Bearer " + jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, "x" * 64, algorithm="HS256"),
    "alg-none": "Bearer " + jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, "", algorithm="none"),
    "expired": "Bearer " + jwt.encode({"sub": "u1", "exp": int(time.time()) - 3600}, SECRET, algorithm="HS256"),
}


@pytest.mark.parametrize("operation", sorted(REQUESTS))
@pytest.mark.parametrize("bad", sorted(BAD_TOKENS))
def test_bad_tokens_get_401_with_the_error_body(client: Any, operation: str, bad: str) -> None:
    value = BAD_TOKENS[bad]
    response = call(client, operation, {"Authorization": value} if value else {})
    assert_error_body(response, 401)
    # RFC 6750: the bare challenge without a bearer token, `invalid_token` with a refused one.
    sent = value is not None and value.startswith("Bearer ")
    assert response.headers["www-authenticate"] == (CHALLENGE_INVALID if sent else CHALLENGE_NONE)


def test_the_documented_challenge_is_the_one_sent_for_a_refused_token(client: Any) -> None:
    header = published_document()["components"]["headers"]["WWWAuthenticate"]
    assert header["example"] == CHALLENGE_INVALID
    response = client.get(f"{RUN}/stream", params={"access_token": "not.a.jwt"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == CHALLENGE_INVALID


@pytest.mark.parametrize(
    ("method", "path", "body", "names"),
    [
        ("POST", "/api/v1/workflows/runs", {"page_size": 0}, "page_size"),
        ("POST", "/api/v1/workflows/runs", {"status": "sleeping"}, "status"),
        ("POST", "/api/v1/workflows/runs", {"unknown_filter": 1}, "unknown_filter"),
        ("POST", f"{RUN}/signal/UserInput", {"data": 1}, "message"),
        ("POST", f"{RUN}/actions/pause", {}, "action"),
        ("GET", f"/api/v1/workflows/runs/{WORKFLOW_ID}/not-a-uuid", None, "runId"),
        ("GET", f"{RUN}/updates?since=-1", None, "since"),
        ("POST", f"/api/v1/workflows/runs/{RUN_ID}/updates", {"type": "bad type!"}, "type"),
    ],
)
def test_malformed_requests_get_400_naming_the_problem(
    client: Any, method: str, path: str, body: Any, names: str
) -> None:
    response = client.request(method, path, json=body, headers={"Authorization": f"Bearer {token()}"})
    assert names in assert_error_body(response, 400)["message"]


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"{", b"[1,"])
def test_undecodable_bodies_are_400(client: Any, raw: bytes) -> None:
    response = client.post(
        "/api/v1/workflows/runs",
        content=raw,
        headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
    )
    assert_error_body(response, 400)


def test_wrong_content_type_is_415(client: Any) -> None:
    response = client.post(
        "/api/v1/workflows/runs",
        content=b"x",
        headers={"Authorization": f"Bearer {token()}", "Content-Type": "text/plain"},
    )
    assert_error_body(response, 415)


def test_unknown_route_and_method_are_json(client: Any) -> None:
    assert_error_body(client.get("/api/v1/nothing-here"), 404)
    response = client.delete(RUN, headers={"Authorization": f"Bearer {token()}"})
    assert_error_body(response, 405)


def test_missing_permission_is_403_and_other_project_is_404(client: Any) -> None:
    read_only = token(permissions=["workflow:read"])
    assert_error_body(call(client, "applyWorkflowRunAction", {"Authorization": f"Bearer {read_only}"}), 403)
    other = token(project="p2")
    assert_error_body(call(client, "getWorkflowRun", {"Authorization": f"Bearer {other}"}), 404)


def test_success_and_conflict_shapes(client: Any) -> None:
    auth = {"Authorization": f"Bearer {token()}"}
    run = call(client, "getWorkflowRun", auth)
    assert run.status_code == 200
    assert run.json()["closed_at"] == 1678886460
    assert_error_body(call(client, "applyWorkflowRunAction", auth), 409)


def test_request_id_is_echoed_or_made(client: Any) -> None:
    assert client.get("/health/live", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = {client.get("/health/live").headers["x-request-id"] for _ in range(3)}
    insane = client.get("/health/live", headers={"X-Request-ID": "a b"}).headers["x-request-id"]
    assert len(made | {insane}) == 4
    assert all(re.fullmatch("[0-9a-f]{32}", one) for one in made | {insane})


def test_a_forked_process_makes_request_ids_of_its_own() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, to the parent
        os.write(write, _request_ids.new().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    parent = _request_ids.new()
    assert len(child) == len(parent) == 32
    assert child[:16] != parent[:16]  # another prefix: the counters may meet, the ids do not


def test_published_document_is_3_1_without_internal_extensions(client: Any) -> None:
    for path in ("/api/v1/openapi.json", "/api/v1/openapi.yaml"):
        response = client.get(path)
        assert response.status_code == 200
        document = yaml.safe_load(response.text)  # JSON is YAML too
        assert document["openapi"].startswith("3.1")
        assert "x-bearerInfoFunc" not in response.text
        assert len([op for item in document["paths"].values() for op in item.values() if isinstance(op, dict)]) == 8


def test_swagger_ui_5_is_served_locally(client: Any) -> None:
    page = client.get("/api/v1/ui/")
    assert page.status_code == 200
    assert "/api/v1/openapi.json" in page.text
    assert "https://" not in page.text  # no CDN
    bundle = client.get("/api/v1/ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert len(bundle.content) > 500_000


def test_readiness_reflects_backends(client: Any) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"] == {"temporal": "ok", "redis": "ok"}


def test_json_null_body_is_not_an_absent_body(client: Any) -> None:
    response = client.post(
        "/api/v1/workflows/runs",
        content=b"null",
        headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
    )
    assert_error_body(response, 400)
    absent = client.post("/api/v1/workflows/runs", headers={"Authorization": f"Bearer {token()}"})
    assert absent.status_code == 200


def test_overlapping_seed_path_answers_405_with_allow_post(client: Any) -> None:
    response = client.get(f"/api/v1/workflows/runs/{RUN_ID}/updates", headers={"Authorization": f"Bearer {token()}"})
    assert_error_body(response, 405)
    assert response.headers["allow"] == "POST"


def test_a_non_ascii_access_token_is_no_token(client: Any) -> None:
    # Percent-encoded UTF-8 in `access_token` cannot be a JWT: 401, not a header that cannot be set.
    response = client.get(f"{RUN}/stream?access_token=%C5%93")
    body = assert_error_body(response, 401)
    assert body["errorCode"] == "unauthenticated"


@pytest.mark.parametrize("started", [False, True])
def test_an_error_in_a_middleware_is_the_json_500_with_the_request_id_or_a_closed_connection(
    started: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's own middlewares run ahead of Connexion's stack: an exception in one of them
    (inside the request id's) is answered as a handler's would be, with the JSON 500 and the
    request id, or, once an answer has begun, left to the server."""

    async def broken(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("a bug in a middleware")

    monkeypatch.setattr(middleware.MediaTypeCase, "__call__", broken)
    with create_app(app_settings(SECRET), fake_backends_factory(FakeRuns())).test_client() as client:
        if started:
            with pytest.raises(RuntimeError, match="a bug in a middleware"):
                client.get("/health/live")
            return
        response = client.get("/health/live", headers={"X-Request-ID": "req-500"})
    body = assert_error_body(response, 500)
    assert response.headers["x-request-id"] == "req-500" and "req-500" in body["message"]
    assert "a bug" not in response.text
