"""Clients generated from the document work against the real server: `make -f make/clients.mk clients`
generates and compiles the TypeScript (openapi-typescript + openapi-fetch), Python (openapi-python-client)
and Go (openapi-generator) clients, then each smoke program lists runs, reads a run, signals a running
conversation, reads its updates and streams them (SSE, hand-written consumers) on the live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.live import LiveApi
from tests.support.runs import start
from tests.support.waits import wait_for

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_OUT = ROOT / "build" / "clients"
SMOKES = {
    "typescript": ["node", str(CLIENTS_OUT / "ts" / "dist" / "smoke.js")],
    "python": [sys.executable, str(ROOT / "clients" / "python" / "smoke.py")],
    "go": [str(CLIENTS_OUT / "bin" / "go-smoke")],
}
STEPS = [
    "ok listWorkflowRuns:",
    "ok getWorkflowRun:",
    "ok getWorkflowRun (unknown run): 404",
    "ok signalWorkflowRun: Workflow ",
    "ok getWorkflowRunUpdates:",
    "ok streamWorkflowRunUpdates: retry ",
    "ok streamWorkflowRunUpdates (closed run):",
]


@pytest.fixture(scope="module")
def generated_clients() -> None:
    """`make clients`: bundle, generate the three clients into build/clients, compile each."""
    started = time.monotonic()
    # A parent `make test` exports its flags (jobserver, -n, -k); this make is independent of them.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    made = subprocess.run(
        ["make", "--no-print-directory", "-f", "make/clients.mk", "clients"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert made.returncode == 0, f"make clients failed:\n{made.stdout[-6000:]}\n{made.stderr[-6000:]}"
    assert "clients: TypeScript, Python and Go clients generated and compiled" in made.stdout
    print(f"make clients: {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def smoke_env(live_api: LiveApi) -> Iterator[dict[str, str]]:
    """A project of its own with an open conversation (the signal target) and a completed ingestion run."""
    project = f"clients-{uuid.uuid4().hex[:8]}"
    token = live_api.token(project=project, user="u-clients")
    conversation = start(
        live_api,
        "AgentConversation",
        "--interaction",
        "smoke",
        "--visibility",
        "project",
        project=project,
        user="u-clients",
    )
    document_id = f"doc-clients-{uuid.uuid4().hex[:8]}"
    ingestion = start(
        live_api,
        "StandardContentIngestion",
        "--input",
        json.dumps({"documentId": document_id}),
        project=project,
        user="u-clients",
    )
    with httpx.Client(base_url=live_api.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        wait_for(lambda: http.get(f"/workflows/runs/{ingestion[0]}/{ingestion[1]}").json().get("status") == "COMPLETED")
        yield {
            **os.environ,
            "BASE_URL": live_api.base_url,
            "API_TOKEN": token,
            "SMOKE_WORKFLOW_ID": conversation[0],
            "SMOKE_RUN_ID": conversation[1],
            "SMOKE_CLOSED_WORKFLOW_ID": ingestion[0],
            "SMOKE_CLOSED_RUN_ID": ingestion[1],
            "PYTHONPATH": str(CLIENTS_OUT / "python"),
        }
        http.post(f"/workflows/runs/{conversation[0]}/{conversation[1]}/actions/terminate", json={"reason": "done"})


@pytest.mark.parametrize("language", list(SMOKES))
def test_generated_client_smoke(generated_clients: None, smoke_env: dict[str, str], language: str) -> None:
    ran = subprocess.run(
        SMOKES[language], cwd=ROOT, env=smoke_env, capture_output=True, text=True, timeout=180, check=False
    )
    assert ran.returncode == 0, f"{language} smoke failed:\n{ran.stdout}\n{ran.stderr}"
    lines = ran.stdout.splitlines()
    for step in STEPS:
        assert any(line.startswith(step) for line in lines), f"{language}: no `{step}` line in\n{ran.stdout}"
    assert f"ok listWorkflowRuns: 2 runs, including {smoke_env['SMOKE_RUN_ID']}" in ran.stdout
    assert "end run_closed COMPLETED" in ran.stdout
    assert lines[-1] == f"SMOKE OK {language}"
