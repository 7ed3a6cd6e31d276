"""The fast lane answers exactly as Connexion does (web/fast_lane.py).

Every request here goes to two apps on the same fake backends, one with the lane (the default) and
one without (`FAST_LANE=0`): status, JSON body and the headers a client acts on must be the same.
Hand-picked requests cover each reason the lane hands a request on, and Schemathesis adds generated
ones for the three JSON operations (a stream never ends by itself: its requests are hand-picked, on
a closed run, whose stream ends once it has sent what is stored). A counter on Connexion's routing
proves the lane really serves the plainly valid requests rather than passing everything on; a real
uvicorn server shows a stream the lane serves writing straight to its connection and giving its
place back when its client leaves.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import jwt
import orjson
import pytest
import schemathesis
import uvicorn
from connexion.json_schema import resolve_refs
from connexion.middleware.routing import RoutingMiddleware
from hypothesis import HealthCheck, settings

from backends.memory.updates import MemoryUpdateStream
from core.errors import BackendUnavailable, PayloadTooLarge
from core.protocols import LiveSink, UpdateEvent
from core.settings import Settings
from core.tokens import mint_token
from handlers import HANDLERS
from handlers.deps import Deps
from tests.support import fakes
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, fake_backends_factory
from web import fast_lane
from web.abortable import AbortableHttpToolsProtocol
from web.app import create_app, published_document
from web.auth import TokenVerifier
from web.direct_write import DirectWriteHttpToolsProtocol
from web.fast_lane import FastLane, LaneUnsupported, lane_routes
from web.operations import compile_operations

SECRET = "fast-lane-unit-test-secret-" + "x" * 40
POST = f"/api/v1/workflows/runs/{RUN_ID}/updates"
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
GET = f"{RUN}/updates"
STREAM = f"{RUN}/stream"
HEADERS_COMPARED = (
    "content-type",
    "www-authenticate",
    "retry-after",
    "allow",
    "cache-control",
    "x-accel-buffering",
    "connection",
)


class Updates(FakeUpdates):
    """Fails like the real backend: 413 for a long message, 503 when Redis is "down"."""

    async def append(self, run_id: str, update: dict[str, Any]) -> str:
        if len(update.get("message", "")) > 100:
            raise PayloadTooLarge("The message exceeds 100 bytes.")
        if update.get("type") == "REDIS_DOWN":
            raise BackendUnavailable("Redis did not answer: Connection refused", retry_after=5)
        return await super().append(run_id, update)


def app_settings(fast_lane: bool) -> Settings:
    return fakes.app_settings(SECRET, fast_lane=fast_lane, max_body_bytes=4096)


UPDATES = Updates()
# A running run's duration grows with the clock: both apps read a stopped one, so that two answers
# a second apart are still the same answer.
STOPPED_CLOCK = time.time()
FAST = create_app(
    app_settings(True), fake_backends_factory(FakeRuns(status="RUNNING", clock=lambda: STOPPED_CLOCK), UPDATES)
)
CONNEXION = create_app(
    app_settings(False), fake_backends_factory(FakeRuns(status="RUNNING", clock=lambda: STOPPED_CLOCK), UPDATES)
)


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[Any, Any]]:
    with FAST.test_client() as fast, CONNEXION.test_client() as connexion:
        yield fast, connexion


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths that reached Connexion's routing (that the lane did not answer)."""
    seen: list[str] = []
    original = RoutingMiddleware.__call__

    async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(RoutingMiddleware, "__call__", counting)
    return seen


def lane_of(app: Any, settings: Settings) -> FastLane:
    """The lane alone, in front of `app`, on the bundled document."""
    operations = compile_operations(resolve_refs(copy.deepcopy(published_document())), HANDLERS)
    return FastLane(app, lane_routes(operations, "/api/v1"), settings.max_body_bytes, validate_responses=False)


def token(**kwargs: Any) -> str:
    return mint_token(SECRET, **{"user": "u1", "project": "p1", **kwargs})


def auth(**kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(**kwargs)}"}


def post(body: bytes, **headers: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "url": POST,
        "content": body,
        "headers": {"Content-Type": "application/json", **auth(), **headers},
    }


def chunked(parts: list[bytes], **headers: str) -> dict[str, Any]:
    """A POST whose body is sent with `Transfer-Encoding: chunked` (httpx streams a list), no
    Content-Length."""
    return {**post(b"", **headers), "content": parts}


def get(query: str = "", **headers: str) -> dict[str, Any]:
    return {"method": "GET", "url": GET + query, "headers": {**auth(), **headers}}


def answer(client: Any, request: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    # A 5xx message carries the request id: the same one on both paths, so the answers compare.
    headers = httpx.Headers(request.get("headers") or {})  # keeps repeated headers
    if "x-request-id" not in headers:
        headers["X-Request-ID"] = "parity"
    response = client.request(**{**request, "headers": headers})
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = response.content
    return response.status_code, body, {h: response.headers.get(h) for h in HEADERS_COMPARED}


def assert_same(clients: tuple[Any, Any], request: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    fast, connexion = clients
    seen = answer(fast, request)
    assert seen == answer(connexion, request), request
    assert seen[0] != 500, seen
    return seen


SERVED = {
    "post": post(b'{"type":"PROGRESS","message":"one of ten","details":{"n":1},"workstream_id":"w"}'),
    "post empty object": post(b"{}"),
    "post with api version": post(b"{}", **{"x-api-version": "20260803"}),
    "get": get(),
    "get since": get("?since=1678886400000"),
    "get since zero": get("?since=0"),
    "post Application/JSON": post(b"{}", **{"Content-Type": "Application/JSON"}),
    "run details": {**get(), "url": RUN},
    "run details with api version": {**get(**{"x-api-version": "1"}), "url": RUN},
    "post chunked": chunked([b'{"type":"PROGRESS",', b'"message":"sent in chunks"}']),
}

HANDED_ON = {
    "post null body": post(b"null"),
    "post array body": post(b"[]"),
    "post invalid JSON": post(b'{"type":'),
    "post not UTF-8": post(b'{"message":"\xff"}'),
    "post NaN": post(b'{"details":NaN}'),
    "post unknown field": post(b'{"colour":"red"}'),
    "post bad type": post(b'{"type":"has space"}'),
    "post empty body": post(b""),
    "post chunked, empty": chunked([]),
    "post chunked invalid JSON": chunked([b'{"type":']),
    "post chunked array": chunked([b"[", b"]"]),
    "post text/plain": post(b"{}", **{"Content-Type": "text/plain"}),
    "post json with charset": post(b"{}", **{"Content-Type": "application/json; charset=utf-8"}),
    "post JSON with charset": post(b'{"type":"X"}', **{"Content-Type": "application/JSON; charset=utf-8"}),
    "post query parameter": {**post(b"{}"), "url": POST + "?since=1"},
    "post api version too long": post(b"{}", **{"x-api-version": "x" * 33}),
    "post body over the limit": post(b'{"details":"' + b"x" * 5000 + b'"}'),
    "post malformed run id": {**post(b"{}"), "url": "/api/v1/workflows/runs/not-a-uuid/updates"},
    "get malformed run id": {**get(), "url": f"/api/v1/workflows/runs/{WORKFLOW_ID}/nope/updates"},
    "get workflow id too long": {**get(), "url": f"/api/v1/workflows/runs/{'w' * 1001}/{RUN_ID}/updates"},
    "get since negative": get("?since=-1"),
    "get since not a number": get("?since=abc"),
    "get since empty": get("?since="),
    "get since over int64": get("?since=99999999999999999999"),
    "get since twice": get("?since=1&since=2"),
    "get unknown parameter": get("?limit=5"),
    "get access_token parameter": get("?access_token=abc"),
    "post lower-case scheme": post(b"{}", Authorization=f"bearer {token()}"),
    "get two spaces after Bearer": get(Authorization=f"Bearer  {token()}"),
    "run details with a query": {**get(), "url": RUN + "?since=0"},
    "run details malformed run id": {**get(), "url": f"/api/v1/workflows/runs/{WORKFLOW_ID}/nope"},
    "run details of the updates path": {**get(), "url": f"/api/v1/workflows/runs/{RUN_ID}/updates"},
    "run details with a content type": {**get(**{"Content-Type": "application/json"}), "url": RUN},
    "get workflow id of a newline": {**get(), "url": f"/api/v1/workflows/runs/%0A/{RUN_ID}/updates"},
    "run details, trailing newline": {**get(), "url": f"{RUN}%0A"},
    "get with a body over the limit": {**get(), "content": b"x" * 5000},
    "get with a small body": {**get(), "content": b"{}"},
    "get repeated header": {**get(), "headers": [("x-api-version", "1"), ("x-api-version", "2"), *auth().items()]},
}

DOMAIN_ERRORS = {
    "post unknown run": {**post(b"{}"), "url": "/api/v1/workflows/runs/00000000-0000-4000-8000-000000000000/updates"},
    "get other workflow": {**get(), "url": f"/api/v1/workflows/runs/other-workflow/{RUN_ID}/updates"},
    "post other project": post(b"{}", Authorization=f"Bearer {token(project='p2')}"),
    "post read-only token": post(b"{}", Authorization=f"Bearer {token(permissions=['workflow:read'])}"),
    "get no permission": get(Authorization=f"Bearer {token(permissions=[])}"),
    "run details of another project": {**get(Authorization=f"Bearer {token(project='p2')}"), "url": RUN},
    "run details without a project": {**get(Authorization=f"Bearer {token(project='')}"), "url": RUN},
    "post message too large": post(orjson.dumps({"message": "m" * 101})),
    "post chunked body over the limit": chunked([b'{"details":"', b"x" * 5000, b'"}']),
    "post Redis down": post(b'{"type":"REDIS_DOWN"}'),
}

UNAUTHENTICATED = {
    "no token": {"Authorization": ""},
    "malformed token": {"Authorization": "Bearer not.a.jwt"},
    "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
    "expired": {"Authorization": f"Bearer {token(ttl_seconds=-3600)}"},
    "wrong key": {"Authorization": f"Bearer {mint_token('another-secret-' + 'y' * 40, user='u1', project='p1')}"},
}


@pytest.mark.parametrize("name", SERVED)
def test_plainly_valid_requests_are_served_by_the_lane(clients: tuple[Any, Any], routed: list[str], name: str) -> None:
    fast, _ = clients
    status, _, _ = answer(fast, SERVED[name])
    assert status == 200
    assert routed == []  # Connexion never saw it
    assert_same(clients, SERVED[name])


@pytest.mark.parametrize("name", HANDED_ON)
def test_doubtful_requests_get_connexions_own_answer(clients: tuple[Any, Any], name: str) -> None:
    status, body, _ = assert_same(clients, HANDED_ON[name])
    assert 400 <= status < 500 or status == 200, body


def test_a_transfer_coding_other_than_chunked_is_501_on_both_paths(clients: tuple[Any, Any]) -> None:
    # Decoding only the chunks would hand on a body still gzip-encoded as if it were plain.
    status, body, _ = assert_same(clients, chunked([b"{}"], **{"Transfer-Encoding": "gzip, chunked"}))
    assert status == 501 and body["errorCode"] == "not_implemented"


def test_the_lane_reads_chunked_bodies_only_in_http_1_1() -> None:
    headers = {b"transfer-encoding": b"chunked"}
    assert fast_lane._plainly_framed(headers, 4096, "1.1")
    assert not fast_lane._plainly_framed(headers, 4096, "1.0")  # handed on: `ChunkedBody` answers 501
    assert not fast_lane._plainly_framed({b"transfer-encoding": b"gzip, chunked"}, 4096, "1.1")


@pytest.mark.parametrize("name", DOMAIN_ERRORS)
def test_domain_errors_leave_the_lane_as_they_leave_connexion(clients: tuple[Any, Any], name: str) -> None:
    status, body, headers = assert_same(clients, DOMAIN_ERRORS[name])
    assert status in {403, 404, 405, 413, 503}
    assert body["status"] == status and body["errorCode"]
    assert (headers["retry-after"] is not None) == (status == 503)


@pytest.mark.parametrize("name", UNAUTHENTICATED)
@pytest.mark.parametrize("request_of", [lambda h: post(b"{}", **h), lambda h: get(**h)], ids=["post", "get"])
def test_unauthenticated_requests_get_connexions_401(clients: tuple[Any, Any], name: str, request_of: Any) -> None:
    status, body, headers = assert_same(clients, request_of(UNAUTHENTICATED[name]))
    assert status == 401 and body["errorCode"] == "unauthenticated"
    assert headers["www-authenticate"]


def test_a_valid_post_is_stored_once_whichever_path_serves_it(clients: tuple[Any, Any]) -> None:
    fast, connexion = clients
    before = len(UPDATES.stored)
    assert fast.post(POST, content=b'{"message":"via the lane"}', headers=post(b"")["headers"]).status_code == 200
    assert connexion.post(POST, content=b'{"message":"via Connexion"}', headers=post(b"")["headers"]).status_code == 200
    stored = [orjson.loads(u)["message"] for u in UPDATES.stored[before:]]
    assert stored == ["via the lane", "via Connexion"]
    assert answer(fast, get())[1]["messages"][-2:] == answer(connexion, get())[1]["messages"][-2:]


schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", FAST).include(
    operation_id=["postWorkflowRunUpdate", "getWorkflowRunUpdates", "getWorkflowRun"]
)


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_the_same_answer(clients: tuple[Any, Any], case: Any) -> None:
    # Most generated ids would only meet the 404 path: point half of them at the fake's run.
    if case.path_parameters and case.path_parameters.get("runId", "").endswith(("0", "2", "4", "6", "8")):
        case.path_parameters["runId"] = RUN_ID
        if "workflowId" in case.path_parameters:
            case.path_parameters["workflowId"] = WORKFLOW_ID
    kwargs = case.as_transport_kwargs(headers=auth())
    request = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": kwargs.get("headers"),
        "params": kwargs.get("params"),
    }
    if "json" in kwargs:
        request["content"] = json.dumps(kwargs["json"]).encode()  # orjson refuses integers beyond 64 bits
    elif kwargs.get("data") is not None:
        request["content"] = kwargs["data"]
    assert_same(clients, request)


def test_an_unreachable_key_server_is_503_on_both_paths(unused_tcp_port: int) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    def jwks_settings(fast_lane: bool) -> Settings:
        return replace(app_settings(fast_lane), jwt_secret=None, jwks_url=f"http://127.0.0.1:{unused_tcp_port}/jwks")

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {"sub": "u1", "project": {"id": "p1"}, "permissions": ["workflow:run"], "exp": 2**31}
    signed = {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='RS256', headers={'kid': 'k1'})}"}
    backends = fake_backends_factory(FakeRuns(status="RUNNING"))
    with (
        create_app(jwks_settings(True), backends).test_client() as fast,
        create_app(jwks_settings(False), backends).test_client() as connexion,
    ):
        for request in (post(b"{}", **signed), get(**signed), {**get(**signed), "url": f"{RUN}/stream"}):
            status, body, headers = assert_same((fast, connexion), request)
            assert status == 503 and body["errorCode"] == "backend_unavailable", body
            assert headers["retry-after"]


async def test_a_post_whose_client_left_mid_body_is_not_stored() -> None:
    """The lane hands the partial body and the disconnect on, exactly as it got them."""
    handed_on: list[Any] = []

    async def connexion(scope: Any, receive: Any, send: Any) -> None:
        handed_on.extend([await receive(), await receive()])

    settings = app_settings(True)
    lane = lane_of(connexion, settings)
    updates = Updates()
    state = {"verifier": TokenVerifier(settings), "deps": Deps(FakeRuns(), updates, settings)}
    headers = [(k.lower().encode(), v.encode()) for k, v in post(b"")["headers"].items()]
    scope = {"type": "http", "method": "POST", "path": POST, "query_string": b"", "state": state}
    messages = [{"type": "http.request", "body": b"{}", "more_body": True}, {"type": "http.disconnect"}]
    pending = list(messages)

    async def receive() -> Any:
        return pending.pop(0)

    async def send(message: Any) -> None:
        raise AssertionError(f"the lane answered {message}")

    await lane({**scope, "headers": [*headers, (b"content-length", b"20")]}, receive, send)
    assert handed_on == messages
    assert updates.stored == []


def test_a_chunked_body_is_read_as_a_sized_one_on_both_paths(clients: tuple[Any, Any]) -> None:
    fast, connexion = clients
    before = len(UPDATES.stored)
    for client in (fast, connexion):
        response = client.request(**chunked([b'{"message":', b'"chunked"}']))
        assert response.status_code == 200, response.text
        assert "transfer-encoding" in response.request.headers and "content-length" not in response.request.headers
    assert [orjson.loads(u)["message"] for u in UPDATES.stored[before:]] == ["chunked", "chunked"]
    # An operation only Connexion serves, and a body over the limit: the same as with a length.
    signal = {**chunked([b'{"message":"hi"}']), "url": f"{RUN}/signal/UserInput"}
    assert assert_same(clients, signal)[0] == 200
    too_big = chunked([b'{"details":"', b"x" * 5000, b'"}'])
    assert assert_same(clients, too_big)[:2] == assert_same(clients, post(b'{"details":"' + b"x" * 5000 + b'"}'))[:2]
    assert assert_same(clients, too_big)[0] == 413


async def test_a_chunked_body_over_the_limit_is_not_read_whole_by_the_lane() -> None:
    """The lane stops reading at the first part past the limit and hands what it read on."""
    handed_on: list[Any] = []

    async def connexion(scope: Any, receive: Any, send: Any) -> None:
        handed_on.append(await receive())

    settings = app_settings(True)
    lane = lane_of(connexion, settings)
    state = {"verifier": TokenVerifier(settings), "deps": Deps(FakeRuns(), Updates(), settings)}
    headers = [(k.lower().encode(), v.encode()) for k, v in post(b"")["headers"].items()]
    scope = {"type": "http", "method": "POST", "path": POST, "query_string": b"", "state": state}
    part = {"type": "http.request", "body": b"x" * 3000, "more_body": True}
    read = 0

    async def endless() -> Any:
        nonlocal read
        read += 1
        return part

    async def send(message: Any) -> None:
        raise AssertionError(f"the lane answered {message}")

    await lane({**scope, "headers": [*headers, (b"transfer-encoding", b"chunked")]}, endless, send)
    assert read == 2  # 6000 bytes > 4096: no third part read
    assert handed_on == [part]


def test_big_integers_in_details_are_stored_exactly_on_both_paths(clients: tuple[Any, Any]) -> None:
    before = len(UPDATES.stored)
    request = post(b'{"details": {"n": 1180591620717411303425}}')
    assert assert_same(clients, request)[0] == 200
    assert [json.loads(u)["details"]["n"] for u in UPDATES.stored[before:]] == [2**70 + 1, 2**70 + 1]


def test_json_nested_too_deep_is_refused_on_both_paths(clients: tuple[Any, Any]) -> None:
    for depth in (128, 129, 960, 2000):
        body = b'{"details":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
        status, answer_body, _ = assert_same(clients, post(body))
        assert status == (200 if depth <= 128 else 400), answer_body
        if status == 400:
            assert "nested more than 128 levels deep" in answer_body["message"] or depth >= 1024


def test_negative_integers_beyond_64_bits_are_stored_exactly(clients: tuple[Any, Any]) -> None:
    before = len(UPDATES.stored)
    assert assert_same(clients, post(b'{"details": -9223372036854775809}'))[0] == 200
    assert [json.loads(u)["details"] for u in UPDATES.stored[before:]] == [-(2**63) - 1] * 2


# -- the lane implements what the document says, or refuses to start ---------------------------------


def altered_document(change: Any) -> dict[str, Any]:
    document = copy.deepcopy(published_document())
    change(document)
    return document


def operation_of(document: dict[str, Any], operation_id: str) -> dict[str, Any]:
    for item in document["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict) and operation.get("operationId") == operation_id:
                return operation
    raise LookupError(operation_id)


def with_cookie_parameter(document: dict[str, Any]) -> None:
    operation_of(document, "getWorkflowRun")["parameters"].append(
        {"name": "session", "in": "cookie", "required": False, "schema": {"type": "string"}}
    )


def test_a_construct_the_lane_does_not_implement_stops_the_app_from_starting() -> None:
    document = altered_document(with_cookie_parameter)
    with pytest.raises(LaneUnsupported, match=r"getWorkflowRun: parameter 'session' is in 'cookie'"):
        create_app(app_settings(True), fake_backends_factory(), document=document)
    # Without the lane, Connexion serves the same document.
    create_app(app_settings(False), fake_backends_factory(), document=document)


@pytest.mark.parametrize(
    ("construct", "change", "named"),
    [
        ("a parameter style", lambda o: o["parameters"][0].update(style="label"), "'style'"),
        (
            "an array query parameter",
            lambda o: o["parameters"].append(
                {"name": "tag", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}}
            ),
            "'items'",
        ),
        ("another media type", lambda o: o["requestBody"]["content"].update({"text/plain": {}}), "'text/plain'"),
        ("another security", lambda o: o.update(security=[]), "security is []"),
        ("callbacks", lambda o: o.update(callbacks={}), "'callbacks'"),
        ("a specification extension", lambda o: o["requestBody"].update({"x-body-name": "update"}), "'x-body-name'"),
        (
            "a nullable parameter",
            lambda o: o["parameters"].append(
                {"name": "tag", "in": "query", "schema": {"type": "string", "nullable": True}}
            ),
            "'nullable'",
        ),
    ],
)
def test_every_unimplemented_construct_is_named(construct: str, change: Any, named: str) -> None:
    document = altered_document(lambda d: change(operation_of(d, "postWorkflowRunUpdate")))
    with pytest.raises(LaneUnsupported, match=re.escape(named)):
        create_app(app_settings(True), fake_backends_factory(), document=document)


def require_api_version(document: dict[str, Any]) -> None:
    """The shared `x-api-version` header parameter made required (for every operation)."""
    shared = document["components"]["parameters"]
    (name,) = [name for name, parameter in shared.items() if parameter["name"] == "x-api-version"]
    shared[name]["required"] = True


def test_a_security_scheme_other_than_http_bearer_stops_the_lane() -> None:
    def api_key(document: dict[str, Any]) -> None:
        document["components"]["securitySchemes"]["bearerAuth"] = {"type": "apiKey", "in": "header", "name": "X-Key"}

    with pytest.raises(LaneUnsupported, match="one HTTP bearer scheme only"):
        create_app(app_settings(True), fake_backends_factory(), document=altered_document(api_key))


def test_a_header_made_required_is_enforced_alike_by_both_paths(routed: list[str]) -> None:
    document = altered_document(require_api_version)
    runs = FakeRuns(status="RUNNING")
    with (
        create_app(app_settings(True), fake_backends_factory(runs), document=document).test_client() as fast,
        create_app(app_settings(False), fake_backends_factory(runs), document=document).test_client() as connexion,
    ):
        details = {**get(), "url": RUN}
        status, body, _ = assert_same((fast, connexion), details)
        assert status == 400 and body["errorCode"] == "invalid_request"
        assert "x-api-version" in body["message"]
        routed.clear()
        status, _, _ = answer(fast, {**get(**{"x-api-version": "1"}), "url": RUN})
        assert status == 200 and routed == []  # with the header, the lane serves it
        assert assert_same((fast, connexion), {**get(**{"x-api-version": "1"}), "url": RUN})[0] == 200


# -- the stream: the same errors, the same response, served by the lane ------------------------------


class StreamUpdates(FakeUpdates):
    """Three stored updates of the run, and Redis "down" while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.ids = [
            self.store(RUN_ID, b',"type":"UPDATE","message":"m%d"}' % n, at_ms=1678886400000 + n) for n in (1, 2, 3)
        ]

    async def open_stream(
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> MemoryUpdateStream:
        if self.down:
            raise BackendUnavailable("Redis did not answer: Connection refused", retry_after=5)
        return await super().open_stream(run_id, after_id=after_id, since_ms=since_ms, skip_history=skip_history)


STREAM_UPDATES = StreamUpdates()


def stream_apps(**overrides: Any) -> tuple[Any, Any]:
    """The app with and without the lane on a closed run: its stream sends what is stored, then
    `end`, then ends, so that a test client can read it whole."""
    backends = fake_backends_factory(FakeRuns(status="COMPLETED"), STREAM_UPDATES)
    return tuple(  # type: ignore[return-value]
        create_app(replace(app_settings(lane), **overrides), backends) for lane in (True, False)
    )


@pytest.fixture(scope="module")
def stream_clients() -> Iterator[tuple[Any, Any]]:
    fast_app, connexion_app = stream_apps()
    with fast_app.test_client() as fast, connexion_app.test_client() as connexion:
        yield fast, connexion


def stream(query: str = "", **headers: str) -> dict[str, Any]:
    return {"method": "GET", "url": STREAM + query, "headers": {**auth(), **headers}}


def event_ids(body: bytes) -> list[str]:
    return [line[4:].decode() for line in body.split(b"\n") if line.startswith(b"id: ")]


STREAMS_SERVED = {
    "every stored update": (stream(), STREAM_UPDATES.ids),
    "since": (stream("?since=1678886400001"), STREAM_UPDATES.ids[1:]),
    "since zero": (stream("?since=0"), STREAM_UPDATES.ids),
    "skipHistory": (stream("?skipHistory=true"), []),
    "skipHistory false": (stream("?skipHistory=false"), STREAM_UPDATES.ids),
    "since wins over skipHistory": (stream("?since=1678886400002&skipHistory=true"), STREAM_UPDATES.ids[2:]),
    "Last-Event-ID": (stream(**{"Last-Event-ID": STREAM_UPDATES.ids[0]}), STREAM_UPDATES.ids[1:]),
    "Last-Event-ID wins over since": (
        stream("?since=0", **{"Last-Event-ID": STREAM_UPDATES.ids[1]}),
        STREAM_UPDATES.ids[2:],
    ),
    "with api version": (stream(**{"x-api-version": "20260803"}), STREAM_UPDATES.ids),
}


@pytest.mark.parametrize("name", STREAMS_SERVED)
def test_a_plainly_valid_stream_is_served_by_the_lane_as_by_connexion(
    stream_clients: tuple[Any, Any], routed: list[str], name: str
) -> None:
    request, ids = STREAMS_SERVED[name]
    status, body, headers = answer(stream_clients[0], request)
    assert routed == []  # Connexion never saw it
    assert (status, body, headers) == answer(stream_clients[1], request)
    assert status == 200 and headers["content-type"] == "text/event-stream; charset=utf-8"
    assert (headers["cache-control"], headers["x-accel-buffering"], headers["connection"]) == (
        "no-store",
        "no",
        "close",
    )
    assert body.startswith(b"retry: 3000\n: open\n\n")
    assert event_ids(body) == ids
    assert body.endswith(b'event: end\ndata: {"reason":"run_closed","status":"COMPLETED"}\n\n')


STREAMS_HANDED_ON = {
    "since not a number": stream("?since=abc"),
    "since negative": stream("?since=-1"),
    "since a fraction": stream("?since=1.5"),
    "since beyond 2^53": stream("?since=9007199254740992"),
    "skipHistory not a boolean": stream("?skipHistory=yes"),
    "skipHistory in capitals": stream("?skipHistory=True"),
    "Last-Event-ID malformed": stream(**{"Last-Event-ID": "abc"}),
    "Last-Event-ID too long": stream(**{"Last-Event-ID": "1" * 21}),
    "unknown parameter": stream("?limit=5"),
    "since twice": stream("?since=1&since=2"),
    "malformed run id": {**stream(), "url": f"/api/v1/workflows/runs/{WORKFLOW_ID}/nope/stream"},
    "with a body": {**stream(), "content": b"{}"},
    "no token": stream(Authorization=""),
    "malformed token": stream(Authorization="Bearer not.a.jwt"),
}


@pytest.mark.parametrize("name", STREAMS_HANDED_ON)
def test_a_doubtful_stream_request_gets_connexions_own_answer(
    stream_clients: tuple[Any, Any], routed: list[str], name: str
) -> None:
    status, body, _ = assert_same(stream_clients, STREAMS_HANDED_ON[name])
    assert status in {200, 400, 401}, body  # Connexion reads `True` and a repeated `since`
    assert routed  # the lane handed it on


def test_a_stream_whose_token_is_in_the_query_is_left_to_connexion(
    stream_clients: tuple[Any, Any], routed: list[str]
) -> None:
    # EventSource's way: the token as `access_token`, which the lane leaves to Connexion's security.
    query = {"method": "GET", "url": f"{STREAM}?access_token={token()}&skipHistory=true"}
    status, body, _ = assert_same(stream_clients, query)
    assert status == 200 and event_ids(body) == []
    assert routed == [STREAM, STREAM]
    # With the header as well, the header is used, on both paths.
    both = {**query, "url": f"{STREAM}?access_token=not.a.jwt", "headers": auth()}
    assert assert_same(stream_clients, both)[0] == 200


STREAM_ERRORS = {
    "no permission": (stream(Authorization=f"Bearer {token(permissions=[])}"), 403),
    "another project's run": (stream(Authorization=f"Bearer {token(project='p2')}"), 404),
    "unknown run": (
        {**stream(), "url": f"/api/v1/workflows/runs/{WORKFLOW_ID}/{'0' * 8}-0000-4000-8000-{'0' * 12}/stream"},
        404,
    ),
    "other workflow": ({**stream(), "url": f"/api/v1/workflows/runs/other-workflow/{RUN_ID}/stream"}, 404),
}


@pytest.mark.parametrize("name", STREAM_ERRORS)
def test_a_stream_refused_before_it_starts_is_refused_alike(
    stream_clients: tuple[Any, Any], routed: list[str], name: str
) -> None:
    request, expected = STREAM_ERRORS[name]
    status, body, headers = answer(stream_clients[0], request)
    assert routed == []  # refused by the handler the lane called
    assert (status, body, headers) == answer(stream_clients[1], request)
    assert status == expected and body["status"] == expected and body["errorCode"]


def test_redis_down_as_a_stream_opens_is_503_with_retry_after_on_both_paths(
    stream_clients: tuple[Any, Any], routed: list[str]
) -> None:
    STREAM_UPDATES.down = True
    try:
        status, body, headers = assert_same(stream_clients, stream())
    finally:
        STREAM_UPDATES.down = False
    assert routed == [STREAM]  # only the request sent to the app without the lane
    assert status == 503 and body["errorCode"] == "backend_unavailable" and headers["retry-after"] == "5"


@pytest.mark.parametrize(
    ("limit", "named"),
    [
        ({"max_streams_per_principal": 0}, "the limit per caller"),
        ({"max_streams_per_process": 0}, "update streams open, its limit"),
        ({"rate_limit_updates_per_second": 1, "rate_limit_updates_burst": 1}, ""),
    ],
)
def test_a_stream_over_a_limit_is_429_with_retry_after_on_both_paths(
    routed: list[str], limit: dict[str, Any], named: str
) -> None:
    fast_app, connexion_app = stream_apps(**limit)
    with fast_app.test_client() as fast, connexion_app.test_client() as connexion:
        for _ in range(2):  # the burst of one, if any, is spent by the first
            status, body, headers = assert_same((fast, connexion), stream("?skipHistory=true"))
    assert status == 429 and body["errorCode"] and headers["retry-after"]
    assert named in body["message"]
    assert routed == [STREAM, STREAM]  # the lane answered its own


def test_the_stream_operation_is_served_by_the_lane() -> None:
    operations = compile_operations(resolve_refs(copy.deepcopy(published_document())), HANDLERS)
    (route,) = [r for r in lane_routes(operations, "/api/v1") if r.operation.operation_id == "streamWorkflowRunUpdates"]
    assert route.response is None  # sent as events, by `web.endpoints.stream_response`
    assert route.pattern.match(STREAM)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: r["200"]["headers"].update({"X-Other": {"schema": {"type": "string"}}}), "'X-Other'"),
        (lambda r: r["200"]["content"].update({"application/json": {"schema": {}}}), "one media type"),
        (lambda r: r["200"].update(content={"text/plain": {"schema": {}}}), "'text/plain'"),
        (
            lambda r: r["200"].update(content={"application/json": {"schema": {}}}),
            "not what the lane sends as application/json",
        ),
    ],
)
def test_a_stream_answer_the_lane_does_not_send_stops_the_app(change: Any, named: str) -> None:
    document = altered_document(lambda d: change(operation_of(d, "streamWorkflowRunUpdates")["responses"]))
    with pytest.raises(LaneUnsupported, match=re.escape(named)):
        create_app(app_settings(True), fake_backends_factory(), document=document)


# -- over a real socket: a stream the lane serves writes straight to its connection, and gives its
# -- place back when its client leaves


class HeldStream:
    """A running run's stream: offers one live update to the sink (as the hub does; the sink takes
    it only when the server's direct writer reached the response), then waits until closed."""

    def __init__(self) -> None:
        self.written_directly = False
        self.closed = asyncio.Event()
        self._offered = False

    async def next(self, wait_seconds: float, sink: LiveSink | None = None) -> UpdateEvent | None:
        if not self._offered:
            self._offered = True
            await asyncio.sleep(0)  # waiting, as the hub's reader reads
            update = ("message", "1678886400001-0", b'{"timestamp":1678886400001,"message":"live"}')
            if sink is None or not sink(update[1], update[2]):
                return update
            self.written_directly = True
        await self.closed.wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed.set()


class HeldUpdates(FakeUpdates):
    def __init__(self) -> None:
        super().__init__()
        self.streams: list[HeldStream] = []

    async def open_stream(  # type: ignore[override]
        self, run_id: str, *, after_id: str | None, since_ms: int | None, skip_history: bool
    ) -> HeldStream:
        self.streams.append(HeldStream())
        return self.streams[-1]


class ServerProtocol(AbortableHttpToolsProtocol, DirectWriteHttpToolsProtocol):
    """The protocols the server puts in front of its bounds (`web.transport.protocol_class`)."""


@asynccontextmanager
async def one_stream_server(updates: HeldUpdates) -> AsyncIterator[int]:
    """uvicorn in this process, with the lane, on a free port; one stream per caller at most."""
    settings = replace(app_settings(True), max_streams_per_principal=1, sse_heartbeat_seconds=3600)
    app = create_app(settings, fake_backends_factory(FakeRuns(status="RUNNING"), updates))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    config = uvicorn.Config(app, http=ServerProtocol, log_config=None, timeout_graceful_shutdown=1)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[listener])
    try:
        yield listener.getsockname()[1]
    finally:
        await server.shutdown(sockets=[listener])


async def open_stream(port: int) -> tuple[socket.socket, bytes]:
    """A stream request over a new connection, and what came back: the head, and for a 200 the
    frames up to the live update."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", port))
    request = f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token()}\r\n\r\n"
    await loop.sock_sendall(client, request.encode())
    received = b""
    while b"\r\n\r\n" not in received or (b" 200 " in received.split(b"\r\n", 1)[0] and b"live" not in received):
        chunk = await loop.sock_recv(client, 65536)
        assert chunk, received
        received += chunk
    return client, received


async def test_a_stream_served_by_the_lane_gives_its_place_back_when_its_client_leaves(routed: list[str]) -> None:
    updates = HeldUpdates()
    async with asyncio.timeout(20), one_stream_server(updates) as port:
        first, received = await open_stream(port)
        assert received.startswith(b"HTTP/1.1 200") and b"retry: 3000\n: open\n\n" in received
        assert routed == []  # served by the lane, in the scope the server gave (its direct writer)
        assert updates.streams[0].written_directly
        second, refused = await open_stream(port)  # the one place is taken
        second.close()
        assert refused.startswith(b"HTTP/1.1 429")
        first.close()
        await updates.streams[0].closed.wait()  # the response ends when the client leaves
        third, received = await open_stream(port)  # and gave its place back
        with third:
            assert received.startswith(b"HTTP/1.1 200")
        await updates.streams[1].closed.wait()
    assert routed == []
