"""End to end through HTTP, what only the real stack can do: the sample worker answering a signal,
`workflow-runs start` refusing bad input. The HTTP tests both backends satisfy (reads, updates,
streams, actions, signals, scope) run against the real stack and mock mode alike, in
test_api_both.py.

Each test runs twice: against the session's API (`serve`, one process) and against `serve
--workers 2`, started for this module alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.live import LiveApi, Services, running_live_api
from tests.support.runs import start, start_command
from tests.support.waits import wait_for

pytestmark = pytest.mark.services


@pytest.fixture(scope="module", params=[1, 2], ids=["workers=1", "workers=2"])
def live(request: pytest.FixtureRequest, services: Services) -> Iterator[LiveApi]:
    """The API (and sample worker) a test talks to: the session's, or one on `--workers 2`."""
    if request.param == 1:
        yield request.getfixturevalue("live_api")
        return
    with running_live_api(services, workers=request.param) as two_workers:
        yield two_workers


def client(live: LiveApi, **token_kwargs: Any) -> httpx.Client:
    return httpx.Client(
        base_url=live.base_url, headers={"Authorization": f"Bearer {live.token(**token_kwargs)}"}, timeout=30
    )


def test_the_worker_answers_a_conversation_signal_with_an_update(live: LiveApi) -> None:
    workflow_id, run_id = start(live, "AgentConversation", "--interaction", "support", "--visibility", "project")
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    with client(live) as http:
        wait_for(lambda: http.get(base).status_code == 200)
        signalled = http.post(f"{base}/signal/UserInput", json={"message": "hello", "data": {"approved": True}})
        assert signalled.status_code == 200, signalled.text
        answers = wait_for(lambda: [u for u in http.get(f"{base}/updates").json()["messages"] if u["type"] == "ANSWER"])
        assert all(u["workflow_run_id"] == run_id for u in answers)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "needs an input"),
        (["--input", "{not json"], "Expecting property name"),
        (["--input", "[1]"], "--input must be a JSON object"),
    ],
)
def test_start_refuses_bad_input_with_a_message_not_a_traceback(live: LiveApi, args: list[str], message: str) -> None:
    out = start_command(live, "StandardContentIngestion", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("workflow-runs start: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr
