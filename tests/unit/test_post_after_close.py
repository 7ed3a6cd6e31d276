"""Posting updates to a closed run: accepted for POST_AFTER_CLOSE_SECONDS after the close, then 409
(on fake backends, through the fast lane and through Connexion)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core.tokens import mint_token
from tests.support.fakes import RUN_ID, FakeRuns, FakeUpdates, app_settings, fake_backends_factory
from web.app import create_app

SECRET = "post-after-close-unit-test-secret-" + "x" * 40
POST = f"/api/v1/workflows/runs/{RUN_ID}/updates"
WINDOW = 300


@pytest.fixture(params=[True, False], ids=["fast-lane", "connexion"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def post(fast_lane: bool, runs: FakeRuns) -> tuple[Any, FakeUpdates]:
    updates = FakeUpdates()
    settings = app_settings(SECRET, fast_lane=fast_lane, post_after_close_seconds=WINDOW)
    headers = {"Authorization": f"Bearer {mint_token(SECRET, user='u1', project='p1')}"}
    with create_app(settings, fake_backends_factory(runs, updates)).test_client() as client:
        return client.post(POST, json={"type": "COMPLETE", "message": "late"}, headers=headers), updates


def test_an_open_run_takes_updates(fast_lane: bool) -> None:
    response, updates = post(fast_lane, FakeRuns(status="RUNNING"))
    assert response.status_code == 200
    assert len(updates.stored) == 1


def test_a_run_closed_within_the_window_still_takes_updates(fast_lane: bool) -> None:
    response, updates = post(fast_lane, FakeRuns(status="COMPLETED", closed_at=time.time() - WINDOW + 60))
    assert response.status_code == 200, response.text
    assert len(updates.stored) == 1


def test_a_run_closed_longer_ago_refuses_updates_with_409(fast_lane: bool) -> None:
    response, updates = post(fast_lane, FakeRuns(status="FAILED", closed_at=time.time() - WINDOW - 60))
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["errorCode"] == "run_closed"
    assert f"{WINDOW} seconds after a run closes" in body["message"]
    assert updates.stored == []
