"""Who may see and do what, on the real stack: the permission matrix, project isolation (the
OWASP API1 risk: an API keyed by guessable ids), and private conversations."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.support.live import LiveApi
from tests.support.runs import start
from tests.support.waits import wait_for

pytestmark = pytest.mark.services

READ_OPS = ("getWorkflowRun", "getWorkflowRunUpdates", "streamWorkflowRunUpdates")
ACT_OPS = ("applyWorkflowRunAction", "signalWorkflowRun", "postWorkflowRunUpdate")
LIST_OPS = ("listWorkflowRuns", "listConversations")
# A permission set that lacks what each kind of operation needs.
LACKING: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(READ_OPS, ("workflow:admin",)),
    **dict.fromkeys(ACT_OPS, ("workflow:read",)),
    **dict.fromkeys(LIST_OPS, ("workflow:run",)),
}


def request(http: httpx.Client, operation: str, workflow_id: str, run_id: str) -> httpx.Response:  # noqa: PLR0911
    base = f"/workflows/runs/{workflow_id}/{run_id}"
    match operation:
        case "getWorkflowRun":
            return http.get(base)
        case "getWorkflowRunUpdates":
            return http.get(f"{base}/updates")
        case "streamWorkflowRunUpdates":
            # The run is open: read the response head only, then hang up.
            with http.stream("GET", f"{base}/stream", params={"skipHistory": "true"}) as response:
                response.close()
                return response
        case "applyWorkflowRunAction":
            return http.post(f"{base}/actions/cancel", json={"reason": "matrix"})
        case "signalWorkflowRun":
            return http.post(f"{base}/signal/UserInput", json={"message": "hi"})
        case "postWorkflowRunUpdate":
            return http.post(f"/workflows/runs/{run_id}/updates", json={"message": "from the matrix"})
        case "listWorkflowRuns":
            return http.post("/workflows/runs", json={})
        case _:
            return http.post("/workflows/conversations", json={})


@pytest.fixture
def conversation(live_api: LiveApi) -> Iterator[tuple[str, str]]:
    """A fresh open conversation of project p1 (actions close it, so one per case)."""
    ids = start(live_api, "AgentConversation", project="p1", user="u1")
    with httpx.Client(base_url=live_api.base_url, headers=auth(live_api.token()), timeout=30) as http:
        wait_for(lambda: http.get(f"/workflows/runs/{ids[0]}/{ids[1]}").status_code == 200)
    yield ids


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


OPERATIONS = READ_OPS + ACT_OPS + LIST_OPS


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("who", ["no-token", "other-project", "lacking-permission", "no-project", "right-principal"])
def test_matrix(live_api: LiveApi, conversation: tuple[str, str], operation: str, who: str) -> None:
    token = {
        "no-token": None,
        "other-project": live_api.token(project="p2"),
        "lacking-permission": live_api.token(permissions=LACKING[operation]),
        "no-project": jwt.encode(
            {"sub": "u1", "exp": 2**31, "permissions": ["workflow:read", "workflow:run"]}, live_api.services.jwt_secret
        ),
        "right-principal": live_api.token(),
    }[who]
    expected = {
        "no-token": 401,
        "other-project": 200 if operation in LIST_OPS else 404,  # a listing is simply scoped
        "lacking-permission": 403,
        "no-project": 403,
        "right-principal": 200,
    }[who]
    with httpx.Client(base_url=live_api.base_url, headers=auth(token), timeout=30) as http:
        response = request(http, operation, *conversation)
        assert response.status_code == expected, response.text if not response.is_stream_consumed else ""
        if operation in LIST_OPS and who == "other-project":
            assert conversation[1] not in {r["run_id"] for r in response.json()["runs"]}


def ingestion(live_api: LiveApi, project: str) -> tuple[str, str]:
    args = ("--input", '{"documentId": "shared-doc"}', "--event-name", "create", "--rule-id", "rule-1")
    return start(live_api, "StandardContentIngestion", *args, project=project)


@pytest.fixture(scope="module")
def two_projects(live_api: LiveApi) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    a, b = f"iso-a-{tag}", f"iso-b-{tag}"
    runs = {
        a: [ingestion(live_api, a) for _ in range(3)],
        b: [ingestion(live_api, b) for _ in range(3)],
    }
    runs[a].append(start(live_api, "AgentConversation", "--visibility", "project", project=a, user="alice"))
    runs[a].append(start(live_api, "AgentConversation", "--visibility", "private", project=a, user="alice"))
    runs[b].append(start(live_api, "AgentConversation", "--visibility", "project", project=b, user="carol"))
    for project in (a, b):
        with httpx.Client(
            base_url=live_api.base_url, headers=auth(live_api.token(project=project, user="alice")), timeout=30
        ) as http:

            def all_listed(http: httpx.Client = http, project: str = project) -> bool:
                return len(http.post("/workflows/runs", json={}).json()["runs"]) == len(runs[project])

            wait_for(all_listed)
    return {"a": a, "b": b, "runs": runs}


FILTERS: list[dict[str, Any]] = [
    {},
    {"document_id": "shared-doc"},
    {"event_name": "create"},
    {"rule_id": "rule-1"},
    {"type": "StandardContentIngestion"},
    {"search_term": "StandardContentIngestion"},
    {"status": "completed"},
    {"status": "running"},
    {"start": "2000-01-01"},
    {"query": "WorkflowType = 'StandardContentIngestion'"},
    {"query": "(WorkflowType = 'StandardContentIngestion' OR WorkflowType = 'AgentConversation')"},
    {"document_id": "shared-doc' OR ProjectId != 'nobody"},
    {"page_size": 1},
]


@pytest.mark.parametrize("body", FILTERS, ids=[str(f) for f in FILTERS])
@pytest.mark.parametrize("path", ["/workflows/runs", "/workflows/conversations"])
def test_no_listing_of_one_project_yields_a_run_of_the_other(
    live_api: LiveApi, two_projects: dict[str, Any], body: dict[str, Any], path: str
) -> None:
    a, b = two_projects["a"], two_projects["b"]
    foreign = {run_id for _, run_id in two_projects["runs"][b]}
    with httpx.Client(
        base_url=live_api.base_url, headers=auth(live_api.token(project=a, user="alice")), timeout=30
    ) as http:
        seen: set[str] = set()
        payload = dict(body)
        for _ in range(20):  # every page
            response = http.post(path, json=payload)
            assert response.status_code == 200, response.text
            page = response.json()
            seen |= {r["run_id"] for r in page["runs"]}
            if not page["has_more"]:
                break
            payload = {**body, "next_page_token": page["next_page_token"]}
        assert not seen & foreign


def test_escape_attempts_are_refused_or_match_nothing(live_api: LiveApi, two_projects: dict[str, Any]) -> None:
    a, b = two_projects["a"], two_projects["b"]
    with httpx.Client(base_url=live_api.base_url, headers=auth(live_api.token(project=a)), timeout=30) as http:
        for query in (
            f"ProjectId = '{b}'",
            "WorkflowType = 'x') OR (ProjectId != ''",
            "WorkflowType = 'x' OR ProjectId != ''",
            "WorkflowType = 'x",
            "(WorkflowType = 'x'",
            "Visibility = 'private'",
            "InitiatedBy = 'user:alice'",
            "WorkflowType = 'x' ORDER BY StartTime",
        ):
            response = http.post("/workflows/runs", json={"query": query})
            assert response.status_code == 400, (query, response.text)
            assert response.json()["errorCode"] == "invalid_request"
        injected = http.post("/workflows/runs", json={"document_id": f"x' OR ProjectId = '{b}"}).json()
        assert injected["runs"] == []


def test_page_token_of_one_project_is_refused_in_the_other(live_api: LiveApi, two_projects: dict[str, Any]) -> None:
    a, b = two_projects["a"], two_projects["b"]
    with httpx.Client(base_url=live_api.base_url, headers=auth(live_api.token(project=b)), timeout=30) as other:
        page = other.post("/workflows/runs", json={"page_size": 1}).json()
        assert page["has_more"]
    with httpx.Client(base_url=live_api.base_url, headers=auth(live_api.token(project=a)), timeout=30) as http:
        response = http.post("/workflows/runs", json={"page_size": 1, "next_page_token": page["next_page_token"]})
        assert response.status_code == 400


def test_private_conversations(live_api: LiveApi, two_projects: dict[str, Any]) -> None:
    a = two_projects["a"]
    private_wf, private_run = two_projects["runs"][a][-1]
    project_run = two_projects["runs"][a][-2][1]

    def listed(token: str) -> set[str]:
        with httpx.Client(base_url=live_api.base_url, headers=auth(token), timeout=30) as http:
            return {r["run_id"] for r in http.post("/workflows/conversations", json={}).json()["runs"]}

    owner = live_api.token(project=a, user="alice")
    colleague = live_api.token(project=a, user="bob")
    superadmin = live_api.token(
        project=a, user="root", permissions=["workflow:read", "workflow:run", "workflow:superadmin"]
    )
    assert {private_run, project_run} <= listed(owner)
    assert project_run in listed(colleague) and private_run not in listed(colleague)
    assert {private_run, project_run} <= listed(superadmin)
    with httpx.Client(base_url=live_api.base_url, headers=auth(colleague), timeout=30) as http:
        base = f"/workflows/runs/{private_wf}/{private_run}"
        codes = [
            http.get(base).status_code,
            http.get(f"{base}/updates").status_code,
            http.post(f"{base}/signal/UserInput", json={"message": "x"}).status_code,
            http.post(f"{base}/actions/cancel").status_code,
            http.post(f"/workflows/runs/{private_run}/updates", json={"message": "x"}).status_code,
        ]
        assert codes == [404] * 5
    with httpx.Client(base_url=live_api.base_url, headers=auth(superadmin), timeout=30) as http:
        assert http.get(f"/workflows/runs/{private_wf}/{private_run}").status_code == 200
