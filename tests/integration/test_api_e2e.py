"""End to end through HTTP: the real server and worker processes on the real Temporal and Redis,
driven the way a user drives them (the CLI starts runs; httpx reads them)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support.live import LiveApi
from tests.support.runs import start, start_command
from tests.support.waits import wait_for

pytestmark = pytest.mark.services


def client(live: LiveApi, **token_kwargs: Any) -> httpx.Client:
    return httpx.Client(
        base_url=live.base_url, headers={"Authorization": f"Bearer {live.token(**token_kwargs)}"}, timeout=30
    )


def test_ingestion_reads_back_completed_with_history_result_and_updates(live_api: LiveApi) -> None:
    workflow_id, run_id = start(
        live_api, "StandardContentIngestion", "--input", '{"documentId": "doc-e2e"}', "--document-id", "doc-e2e"
    )
    with client(live_api) as http:
        run = wait_for(
            lambda: (r := http.get(f"/workflows/runs/{workflow_id}/{run_id}").json())["status"] == "COMPLETED" and r
        )
        assert isinstance(run["started_at"], int) and isinstance(run["closed_at"], int)
        assert run["input"] == {"documentId": "doc-e2e"}
        assert run["result"] == {"success": True}
        assert isinstance(run["memo"], dict)
        types = [event["event_type"] for event in run["history"]]
        assert types[0] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
        assert types[-1] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
        activities = {e["activity"]["name"] for e in run["history"] if "activity" in e}
        assert "processDocument" in activities

        updates = http.get(f"/workflows/runs/{workflow_id}/{run_id}/updates", params={"since": 0}).json()["messages"]
        assert updates, "the workflow posts its progress through the API"
        assert all(u["workflow_run_id"] == run_id for u in updates)
        assert [u["timestamp"] for u in updates] == sorted(u["timestamp"] for u in updates)

        listed = wait_for(lambda: http.post("/workflows/runs", json={"document_id": "doc-e2e"}).json()["runs"])
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


def test_conversation_signal_answer_cancel(live_api: LiveApi) -> None:
    workflow_id, run_id = start(live_api, "AgentConversation", "--interaction", "support", "--visibility", "project")
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(live_api) as http:
        wait_for(lambda: http.get(base).status_code == 200)
        signalled = http.post(f"{base}/signal/UserInput", json={"message": "hello", "data": {"approved": True}})
        assert signalled.status_code == 200, signalled.text
        assert signalled.json() == {"status": "success", "message": f"Workflow {run_id} signalled with UserInput"}
        answers = wait_for(lambda: [u for u in http.get(f"{base}/updates").json()["messages"] if u["type"] == "ANSWER"])
        assert answers

        conversations = wait_for(
            lambda: http.post("/workflows/conversations", json={"status": "running"}).json()["runs"]
        )
        assert run_id in {r["run_id"] for r in conversations}

        cancelled = http.post(f"{base}/actions/cancel", json={"reason": "done"})
        assert cancelled.json() == {"message": f"Workflow {run_id} cancelled"}
        wait_for(lambda: http.get(base).json()["status"] == "CANCELED")
        assert http.post(f"{base}/signal/UserInput", json={"message": "late"}).status_code == 409
        assert http.post(f"{base}/actions/terminate").status_code == 409


def test_other_project_sees_404_everywhere(live_api: LiveApi) -> None:
    workflow_id, run_id = start(live_api, "StandardContentIngestion", "--input", '{"documentId": "doc-iso"}')
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(live_api) as own:
        wait_for(lambda: own.get(base).status_code == 200)
    with client(live_api, project="p2") as other:
        responses = [
            other.get(base),
            other.get(f"{base}/updates"),
            other.get(f"{base}/stream"),
            other.post(f"{base}/actions/cancel"),
            other.post(f"{base}/signal/UserInput", json={"message": "x"}),
            other.post(f"/workflows/runs/{run_id}/updates", json={"message": "x"}),
        ]
        assert [r.status_code for r in responses] == [404] * 6
        assert len({r.json()["message"] for r in responses}) == 1
        assert run_id not in {r["run_id"] for r in other.post("/workflows/runs", json={}).json()["runs"]}


def test_access_token_query_parameter_only_on_stream(live_api: LiveApi) -> None:
    workflow_id, run_id = start(live_api, "StandardContentIngestion", "--input", '{"documentId": "doc-qt"}')
    base = f"{live_api.base_url}/workflows/runs/{workflow_id}/{run_id}"
    token = live_api.token()
    with httpx.Client(timeout=30) as anonymous:
        wait_for(
            lambda: (
                anonymous.get(base, headers={"Authorization": f"Bearer {token}"}).json().get("status") == "COMPLETED"
            )
        )
        with anonymous.stream("GET", f"{base}/stream", params={"access_token": token, "since": 0}) as streamed:
            assert streamed.status_code == 200
            assert "event: end" in "".join(streamed.iter_text())
        refused = anonymous.get(f"{base}/updates", params={"access_token": token})
        assert refused.status_code in (400, 401)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "needs an input"),
        (["--input", "{not json"], "Expecting property name"),
        (["--input", "[1]"], "--input must be a JSON object"),
    ],
)
def test_start_refuses_bad_input_with_a_message_not_a_traceback(
    live_api: LiveApi, args: list[str], message: str
) -> None:
    out = start_command(live_api, "StandardContentIngestion", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("workflow-runs start: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr
