"""CORS (CORS_ORIGINS): off by default; when set, a page of an allowed origin may call every
operation, read every answer (errors included, from the fast lane or Connexion), and open the update
stream with EventSource (`access_token`); other origins get nothing that lets a browser read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from core.errors import BackendUnavailable
from core.settings import Settings
from core.tokens import mint_token
from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, app_settings, fake_backends_factory
from web import cors
from web.app import create_app
from web.cors import CORS_EXPOSED_HEADERS

SECRET = "cors-unit-test-secret-" + "x" * 48
RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
ALLOWED = "https://console.example.com"
OTHER = "https://evil.example.net"
# What Swagger UI or a browser client sends before an authenticated POST with a JSON body.
PREFLIGHT = {
    "Origin": ALLOWED,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, last-event-id, x-api-version",
}


class DownRuns(FakeRuns):
    async def get_run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise BackendUnavailable("connect: connection refused", backend="temporal")


def settings(origins: tuple[str, ...] = (ALLOWED,), **overrides: Any) -> Settings:
    return app_settings(SECRET, cors_origins=origins, **overrides)


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user='u1', project='p1')}"}


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    app = create_app(settings(), fake_backends_factory(FakeRuns(status="COMPLETED")))
    with app.test_client() as test_client:
        yield test_client


def exposed(response: Any) -> set[str]:
    return {name.strip().lower() for name in response.headers.get("access-control-expose-headers", "").split(",")}


def assert_readable_by(response: Any, origin: str) -> None:
    """What a browser needs to hand the answer to a page of `origin`."""
    assert response.headers["access-control-allow-origin"] == origin
    assert "origin" in response.headers["vary"].lower()
    assert {h.lower() for h in CORS_EXPOSED_HEADERS} <= exposed(response)
    assert "access-control-allow-credentials" not in response.headers


def test_a_preflight_of_an_allowed_origin_is_answered_without_a_token(client: Any) -> None:
    response = client.options("/api/v1/workflows/runs", headers=PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert set(response.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id", "x-api-version", "x-request-id"} <= allowed
    assert int(response.headers["access-control-max-age"]) > 0
    # Inside the request context: a preflight has its request id (and its access-log line).
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    "refused",
    [
        {"Origin": OTHER},
        {"Access-Control-Request-Method": "DELETE"},
        {"Access-Control-Request-Headers": "authorization, x-secret"},
    ],
    ids=["origin", "method", "header"],
)
def test_a_refused_preflight_gets_the_json_error_body_and_no_allow_origin(client: Any, refused: dict[str, str]) -> None:
    response = client.options("/api/v1/workflows/runs", headers={**PREFLIGHT, **refused})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["status"], body["errorCode"]) == (400, "invalid_request")
    assert "Cross-origin request refused" in body["message"]
    if "Origin" in refused:
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("lane", [True, False], ids=["fast-lane", "connexion"])
def test_an_answer_to_an_allowed_origin_is_readable(lane: bool) -> None:
    app = create_app(settings(fast_lane=lane), fake_backends_factory(FakeRuns(status="COMPLETED")))
    with app.test_client() as client:
        response = client.get(RUN, headers={**bearer(), "Origin": ALLOWED})
        assert response.status_code == 200
        assert_readable_by(response, ALLOWED)
        listing = client.post("/api/v1/workflows/runs", json={}, headers={**bearer(), "Origin": ALLOWED})
        assert listing.status_code == 200
        assert_readable_by(listing, ALLOWED)


def test_an_answer_to_another_origin_does_not_allow_it(client: Any) -> None:
    response = client.get(RUN, headers={**bearer(), "Origin": OTHER})
    assert response.status_code == 200  # the browser, not the server, withholds it from the page
    assert "access-control-allow-origin" not in response.headers
    assert "origin" in response.headers["vary"].lower()  # a shared cache keeps the two apart


def test_errors_are_readable_too_from_connexion_and_the_fast_lane(client: Any) -> None:
    """401 (Connexion's security), 404 (the lane's own answer), 405 (the seed's path overlap),
    429 (rate limit, in the lane), 503 (backend down, in the lane and in Connexion)."""
    origin = {"Origin": ALLOWED}
    unauthenticated = client.get(RUN, headers=origin)
    assert unauthenticated.status_code == 401
    assert_readable_by(unauthenticated, ALLOWED)
    assert unauthenticated.headers["www-authenticate"]
    missing = client.get(RUN.replace(WORKFLOW_ID, "no-such-workflow"), headers={**bearer(), **origin})
    assert missing.status_code == 404
    assert_readable_by(missing, ALLOWED)
    overlap = client.get(f"/api/v1/workflows/runs/{RUN_ID}/updates", headers={**bearer(), **origin})
    assert (overlap.status_code, overlap.headers["allow"]) == (405, "POST")
    assert_readable_by(overlap, ALLOWED)

    limited = settings(rate_limit_temporal_per_second=0.001, rate_limit_temporal_burst=1)
    app = create_app(limited, fake_backends_factory(FakeRuns(status="COMPLETED")), clock=lambda: 0.0)
    with app.test_client() as limited_client:
        assert limited_client.get(RUN, headers={**bearer(), **origin}).status_code == 200
        over = limited_client.get(RUN, headers={**bearer(), **origin})
        assert over.status_code == 429
        assert over.headers["retry-after"]
        assert_readable_by(over, ALLOWED)

    for lane in (True, False):
        down = create_app(settings(fast_lane=lane), fake_backends_factory(DownRuns(status="COMPLETED")))
        with down.test_client() as down_client:
            unavailable = down_client.get(RUN, headers={**bearer(), **origin})
            assert unavailable.status_code == 503
            assert unavailable.headers["retry-after"]
            assert_readable_by(unavailable, ALLOWED)


def test_eventsource_from_an_allowed_origin_reads_the_stream_with_access_token(client: Any) -> None:
    """EventSource sends no Authorization header and, by default, no credentials: the token is the
    `access_token` query parameter, and `Access-Control-Allow-Origin` is all it needs."""
    token = mint_token(SECRET, user="u1", project="p1")
    response = client.get(f"{RUN}/stream", params={"access_token": token}, headers={"Origin": ALLOWED})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert_readable_by(response, ALLOWED)
    assert '"reason":"run_closed"' in response.text


def test_a_reconnecting_eventsource_may_send_last_event_id(client: Any) -> None:
    preflight = {**PREFLIGHT, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "last-event-id"}
    assert client.options(f"{RUN}/stream", headers=preflight).status_code == 200


def test_star_allows_every_origin_without_credentials() -> None:
    app = create_app(settings(origins=("*",)), fake_backends_factory(FakeRuns(status="COMPLETED")))
    with app.test_client() as client:
        preflight = client.options("/api/v1/workflows/runs", headers={**PREFLIGHT, "Origin": OTHER})
        assert (preflight.status_code, preflight.headers["access-control-allow-origin"]) == (200, "*")
        response = client.get(RUN, headers={**bearer(), "Origin": OTHER})
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


def front_layers(app: Any) -> list[type]:
    """The middlewares a request passes through ahead of Connexion's stack, outside in."""
    layers, layer = [], app.front
    while layer is not app.middleware:
        layers.append(type(layer))
        layer = layer.app
    return layers


def test_cors_is_off_by_default_and_then_adds_no_middleware() -> None:
    assert Settings().cors_origins == ()
    app = create_app(app_settings(SECRET), fake_backends_factory(FakeRuns(status="COMPLETED")))
    assert front_layers(app) and cors.Cors not in front_layers(app)
    assert cors.Cors in front_layers(create_app(app_settings(SECRET, cors_origins=(ALLOWED,)), fake_backends_factory()))
    with app.test_client() as client:
        response = client.get(RUN, headers={**bearer(), "Origin": ALLOWED})
        assert response.status_code == 200
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]
        preflight = client.options("/api/v1/workflows/runs", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers
