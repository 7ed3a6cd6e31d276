"""The same HTTP tests against both backends: the real stack (`workflow-runs serve` and the sample
worker on Temporal and Redis: the `services` half) and mock mode (the same app on the in-memory
backends seeded from the document's examples). A run is started the way each allows: through
the CLI on the real stack, as a copy of a seeded run in mock mode. What only the real stack can
do (a worker answering a signal, `workflow-runs start`) is tested in test_api_e2e.py."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any, Protocol

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from tests.support.live import LiveApi
from tests.support.mock import MockApi, running_mock_api
from tests.support.runs import start
from tests.support.waits import wait_for


class Target(Protocol):
    """A server to test and the way to start runs on it."""

    base_url: str

    def token(self, project: str = "p1", user: str = "u1") -> str: ...

    def ingestion(self, document_id: str) -> tuple[str, str]:
        """A completed ingestion run of project p1, with stored updates; its ids."""
        ...

    def conversation(self) -> tuple[str, str]:
        """A running conversation of project p1 that the project sees; its ids."""
        ...


class LiveTarget:
    def __init__(self, live: LiveApi) -> None:
        self.live, self.base_url = live, live.base_url

    def token(self, project: str = "p1", user: str = "u1") -> str:
        return self.live.token(project=project, user=user)

    def ingestion(self, document_id: str) -> tuple[str, str]:
        argv = ("--input", json.dumps({"documentId": document_id}), "--document-id", document_id)
        workflow_id, run_id = start(self.live, "StandardContentIngestion", *argv)
        with client(self) as http:
            wait_for(lambda: http.get(f"/workflows/runs/{workflow_id}/{run_id}").json().get("status") == "COMPLETED")
        return workflow_id, run_id

    def conversation(self) -> tuple[str, str]:
        workflow_id, run_id = start(self.live, "AgentConversation", "--interaction", "support")
        with client(self) as http:
            wait_for(lambda: http.get(f"/workflows/runs/{workflow_id}/{run_id}").status_code == 200)
        return workflow_id, run_id


class MockTarget:
    def __init__(self, mock: MockApi) -> None:
        self.mock, self.base_url = mock, mock.base_url

    def token(self, project: str = "p1", user: str = "u1") -> str:
        return self.mock.token(project=project, user=user)

    def ingestion(self, document_id: str) -> tuple[str, str]:
        run = self.mock.add_copy("COMPLETED", interactive=False, input={"documentId": document_id})
        run.attributes["document_id"] = document_id
        return run.workflow_id, run.run_id

    def conversation(self) -> tuple[str, str]:
        run = self.mock.add_copy("RUNNING", interactive=True, visibility="project", interaction_name="support")
        return run.workflow_id, run.run_id


@pytest.fixture(scope="module", params=[pytest.param("live", marks=pytest.mark.services), "mock"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "live":
        yield LiveTarget(request.getfixturevalue("live_api"))
    else:
        with running_mock_api() as mock:
            yield MockTarget(mock)


def client(target: Target, **token_kwargs: Any) -> httpx.Client:
    return httpx.Client(
        base_url=target.base_url, headers={"Authorization": f"Bearer {target.token(**token_kwargs)}"}, timeout=30
    )


def events_until(source: Any, stop: Any) -> list[ServerSentEvent]:
    """The stream's events up to the first for which `stop` holds (the stream's heartbeats, every
    second, keep the reader from waiting for ever on a stream that would send nothing)."""
    seen = []
    for event in source.iter_sse():
        seen.append(event)
        if stop(event):
            return seen
    raise AssertionError(f"the stream ended without the awaited event: {seen}")


def test_ingestion_reads_back_completed_with_history_result_and_updates(target: Target) -> None:
    document_id = f"doc-both-{secrets.token_hex(4)}"
    workflow_id, run_id = target.ingestion(document_id)
    with client(target) as http:
        run = http.get(f"/workflows/runs/{workflow_id}/{run_id}").json()
        assert run["status"] == "COMPLETED"
        assert isinstance(run["started_at"], int) and isinstance(run["closed_at"], int)
        assert run["input"] == {"documentId": document_id}
        assert run["result"] == {"success": True}
        assert isinstance(run["memo"], dict)
        types = [event["event_type"] for event in run["history"]]
        assert types[0] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
        assert types[-1] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
        activities = {e["activity"]["name"] for e in run["history"] if "activity" in e}
        assert "processDocument" in activities

        updates = http.get(f"/workflows/runs/{workflow_id}/{run_id}/updates", params={"since": 0}).json()["messages"]
        assert updates, "the run's progress was posted through the API"
        assert all(u["workflow_run_id"] == run_id for u in updates)
        assert [u["timestamp"] for u in updates] == sorted(u["timestamp"] for u in updates)
        later = http.get(f"/workflows/runs/{workflow_id}/{run_id}/updates", params={"since": updates[0]["timestamp"]})
        assert later.json()["messages"] == updates[1:]

        listed = wait_for(lambda: http.post("/workflows/runs", json={"document_id": document_id}).json()["runs"])
        assert [r["run_id"] for r in listed] == [run_id]

        # The stream of a closed run replays what is stored and then ends by itself.
        with connect_sse(http, "GET", f"/workflows/runs/{workflow_id}/{run_id}/stream", params={"since": 0}) as source:
            assert source.response.headers["cache-control"] == "no-store"
            events = list(source.iter_sse())
        # httpx-sse yields the opening `retry:` frame as an event without data; EventSource does not.
        messages = [e for e in events if e.event == "message" and e.data]
        assert [json.loads(m.data) for m in messages] == updates
        assert all(m.id for m in messages)
        assert events[-1].event == "end"
        assert json.loads(events[-1].data) == {"reason": "run_closed", "status": "COMPLETED"}


def test_a_signal_is_recorded_and_a_cancelled_run_refuses_more(target: Target) -> None:
    workflow_id, run_id = target.conversation()
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(target) as http:
        signalled = http.post(f"{base}/signal/UserInput", json={"message": "hello", "data": {"approved": True}})
        assert signalled.status_code == 200, signalled.text
        assert signalled.json() == {"status": "success", "message": f"Workflow {run_id} signalled with UserInput"}
        signals = [e["signal"] for e in http.get(base).json()["history"] if "signal" in e]
        assert {"name": "UserInput", "input": [{"message": "hello", "data": {"approved": True}}]} in signals

        def running_conversations() -> list[dict[str, Any]]:
            runs: list[dict[str, Any]] = http.post("/workflows/conversations", json={"status": "running"}).json()[
                "runs"
            ]
            return runs

        listed = wait_for(lambda: (runs := running_conversations()) and run_id in {r["run_id"] for r in runs} and runs)
        assert all(r["interactive"] and r["status"] == "RUNNING" for r in listed)

        cancelled = http.post(f"{base}/actions/cancel", json={"reason": "done"})
        assert cancelled.json() == {"message": f"Workflow {run_id} cancelled"}
        wait_for(lambda: http.get(base).json()["status"] == "CANCELED")
        late = http.post(f"{base}/signal/UserInput", json={"message": "late"})
        assert late.status_code == 409
        assert late.json()["message"] == f"Workflow run {run_id} is already closed (CANCELED)."
        assert http.post(f"{base}/actions/terminate").status_code == 409


def test_terminate_closes_the_run_as_terminated(target: Target) -> None:
    workflow_id, run_id = target.conversation()
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(target) as http:
        terminated = http.post(f"{base}/actions/terminate", json={"reason": "enough"})
        assert terminated.json() == {"message": f"Workflow {run_id} terminated"}
        run = wait_for(lambda: (r := http.get(base).json())["status"] == "TERMINATED" and r)
        assert isinstance(run["closed_at"], int) and run["pendingActivities"] == []
        assert run["history"][-1]["event_type"] == "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED"
        again = http.post(f"{base}/actions/cancel")
        assert again.status_code == 409 and again.json()["errorCode"] == "run_closed"


def test_a_posted_update_reaches_an_open_stream_and_the_stored_list(target: Target) -> None:
    workflow_id, run_id = target.conversation()
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    sentinel = f"sentinel-{run_id}"
    with client(target) as http, client(target) as poster:
        with connect_sse(http, "GET", f"{base}/stream", params={"skipHistory": "true"}) as source:
            assert source.response.status_code == 200
            posted = poster.post(f"/workflows/runs/{run_id}/updates", json={"type": "PROGRESS", "message": sentinel})
            assert posted.json() == {"success": True}
            events = events_until(source, lambda e: e.event == "message" and sentinel in e.data)
        update = json.loads(events[-1].data)
        assert update["workflow_run_id"] == run_id and update["type"] == "PROGRESS"
        assert events[-1].id == f"{update['timestamp']}-0"
        stored = http.get(f"{base}/updates").json()["messages"]
        assert update in stored


def test_an_open_stream_ends_when_its_run_is_cancelled(target: Target) -> None:
    workflow_id, run_id = target.conversation()
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(target) as http, client(target) as actor:
        with connect_sse(http, "GET", f"{base}/stream", params={"skipHistory": "true"}) as source:
            assert source.response.status_code == 200
            assert actor.post(f"{base}/actions/cancel").status_code == 200
            events = events_until(source, lambda e: e.event == "end")
        assert json.loads(events[-1].data) == {"reason": "run_closed", "status": "CANCELED"}


def test_other_project_sees_404_everywhere(target: Target) -> None:
    workflow_id, run_id = target.conversation()
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(target, project="p2") as other:
        responses = [
            other.get(base),
            other.get(f"{base}/updates"),
            other.get(f"{base}/stream"),
            other.post(f"{base}/actions/cancel"),
            other.post(f"{base}/signal/UserInput", json={"message": "x"}),
            other.post(f"/workflows/runs/{run_id}/updates", json={"message": "x"}),
        ]
        assert [r.status_code for r in responses] == [404] * 6
        assert {r.json()["message"] for r in responses} == {f"Workflow run {run_id} was not found."}
        assert run_id not in {r["run_id"] for r in other.post("/workflows/runs", json={}).json()["runs"]}


def test_access_token_query_parameter_only_on_stream(target: Target) -> None:
    workflow_id, run_id = target.ingestion(f"doc-qt-{secrets.token_hex(4)}")
    base = f"{target.base_url}/workflows/runs/{workflow_id}/{run_id}"
    token = target.token()
    with httpx.Client(timeout=30) as anonymous:
        with anonymous.stream("GET", f"{base}/stream", params={"access_token": token, "since": 0}) as streamed:
            assert streamed.status_code == 200
            assert "event: end" in "".join(streamed.iter_text())
        refused = anonymous.get(f"{base}/updates", params={"access_token": token})
        assert refused.status_code in (400, 401)


def test_ready_when_both_backends_answer(target: Target) -> None:
    ready = httpx.get(target.base_url.removesuffix("/api/v1") + "/health/ready", timeout=30)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"temporal": "ok", "redis": "ok"}}


# The words both backends answer a query Temporal refuses with (`backends.temporal_runs`).
REFUSED = (
    "Temporal refused this listing's filters: check `query` (an unknown search attribute,"
    " or a value of the wrong type for its attribute)."
)


@pytest.mark.parametrize(
    "query",
    [
        "ExecutionStatus = 'Bogus'",
        "ExecutionStatus = 9",
        "CloseTime > 'x'",
        "StartTime STARTS_WITH '2024'",
        "WorkflowType = 5",
        "ExecutionDuration > 'abc'",
        "ExecutionDuration > 5.5",
        "NoSuchAttribute = 'x'",
    ],
)
def test_a_query_temporal_refuses_is_a_400_even_where_no_run_is_visible(target: Target, query: str) -> None:
    with client(target, project=f"p-empty-{secrets.token_hex(4)}") as http:
        refused = http.post("/workflows/runs", json={"query": query})
        assert refused.status_code == 400, refused.text
        assert refused.json()["message"] == REFUSED


def test_typed_query_literals_match_the_same_runs(target: Target) -> None:
    document_id = f"doc-typed-{secrets.token_hex(4)}"
    _, closed = target.ingestion(document_id)
    running_workflow, running = target.conversation()
    with client(target) as http:

        def listed(query: str, **filters: str) -> list[str]:
            answer = http.post("/workflows/runs", json={"query": query, **filters})
            assert answer.status_code == 200, answer.text
            return [run["run_id"] for run in answer.json()["runs"]]

        def closed_run(query: str) -> list[str]:
            return listed(query, document_id=document_id)

        # Each first asked until the visibility store shows the run as asked.
        assert wait_for(lambda: closed_run("ExecutionStatus = 2 AND CloseTime > 5")) == [closed]
        assert closed_run("ExecutionStatus = 5") == []
        assert closed_run("ExecutionDuration > 0 AND ExecutionDuration < '1000d'") == [closed]
        assert closed_run("ExecutionDuration > '1000d'") == []
        assert closed_run("NOT (CloseTime < '2000-01-01T00:00:00Z')") == [closed]

        def running_run(query: str) -> list[str]:
            return listed(f"WorkflowId = '{running_workflow}' AND {query}")

        assert wait_for(lambda: running_run("ExecutionStatus = 'Running' AND ExecutionDuration IS NULL")) == [running]
        assert running_run("NOT (CloseTime < '2000-01-01T00:00:00Z')") == []
        assert running_run("ExecutionDuration >= 0") == []
