"""Stream series: deliveries counted, the end reason recorded once, the open-streams gauge back to 0."""

from __future__ import annotations

from tests.support.fakes import RUN_ID, WORKFLOW_ID, FakeRuns, FakeUpdates, app_settings, bearer, fake_backends_factory
from tests.unit.test_metrics import SECRET, grew, scrape
from web.app import create_app

RUN = f"/api/v1/workflows/runs/{WORKFLOW_ID}/{RUN_ID}"
POST = f"/api/v1/workflows/runs/{RUN_ID}/updates"


def test_a_stream_of_a_closed_run_delivers_what_is_stored_and_ends_run_closed() -> None:
    updates = FakeUpdates()
    app = create_app(app_settings(SECRET), fake_backends_factory(FakeRuns(status="COMPLETED"), updates))
    before = scrape()
    with app.test_client() as client:
        for i in range(20):
            client.post(POST, json={"message": f"m{i}"}, headers=bearer(SECRET))
        with client.stream("GET", RUN + "/stream", headers=bearer(SECRET)) as answer:
            assert answer.status_code == 200
            body = b"".join(answer.iter_bytes())
    after = scrape()
    assert b"run_closed" in body
    assert grew(before, after, "workflow_runs_stream_events_total") == body.count(b"\nid: ") + body.startswith(b"id: ")
    assert grew(before, after, "workflow_runs_stream_events_total") == 20
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="run_closed") == 1
    assert grew(before, after, "workflow_runs_open_streams") == 0
    assert grew(before, after, "workflow_runs_requests_total", operation="streamWorkflowRunUpdates", status="200") == 1


def test_a_client_that_leaves_ends_its_stream_client_gone() -> None:
    app = create_app(app_settings(SECRET, sse_heartbeat_seconds=1), fake_backends_factory(FakeRuns(status="RUNNING")))
    before = scrape()
    with app.test_client() as client, client.stream("GET", RUN + "/stream", headers=bearer(SECRET)) as answer:
        assert answer.status_code == 200
        next(answer.iter_bytes())
        assert grew(before, scrape(), "workflow_runs_open_streams") == 1
    after = scrape()
    assert grew(before, after, "workflow_runs_streams_ended_total", reason="client_gone") == 1
    assert grew(before, after, "workflow_runs_open_streams") == 0
