"""Updates posted right after a run starts, while Temporal's listings do not show it yet
(docs/decisions/0015-visibility-lag.md), on the real dev server and Redis.

The API runs in this process under uvicorn, on the real runs backend whose listings lag `lag`
seconds behind each start (`tests/support/lagging.py`: 0, 2 and 5 s), with the default
VISIBILITY_WAIT_SECONDS (5 s); the sample worker runs here too and posts through it. For each lag:

- a sample run's own updates (its first activity posts right after the start) are stored and
  streamed, and the API never listed the run to find it: the activity names the workflow;
- updates the test posts to another run right after its start (a run no worker picks up, so that
  nothing else makes it known to the API), first without `workflow_id` (the post waits for the
  listing), then with it, are all stored and streamed;
- a caller of another project naming that run's workflow id, or not, gets 404 and stores nothing;
- a run that never exists answers 404, once the API has looked it up again for the whole window.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
import uvicorn
from temporalio.client import Client

from cli import stack
from core.settings import Settings
from core.tokens import mint_token
from tests.support.lagging import LaggingRunsBackend, lagging_backends
from tests.support.live import Services
from tests.support.waits import wait_until
from web.app import create_app
from workloads.activities import WorkloadActivities
from workloads.shared import INGESTION_WORKFLOW
from workloads.starter import start_workflow
from workloads.worker import create_worker

pytestmark = pytest.mark.services

DEADLINE = 30.0
TASK_QUEUE = f"test-visibility-lag-{uuid.uuid4().hex[:8]}"
IDLE_QUEUE = f"{TASK_QUEUE}-no-worker"  # no worker polls it: its runs stay open, untouched


@dataclass
class Stack:
    """The lagging API (`http`, at `base_url`), its runs backend, and Temporal's client."""

    http: httpx.AsyncClient
    runs: LaggingRunsBackend
    client: Client
    secret: str

    def auth(self, project: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.secret, user='u1', project=project)}"}

    async def start(self, project: str, task_queue: str = TASK_QUEUE) -> tuple[str, str]:
        return await start_workflow(
            self.client,
            INGESTION_WORKFLOW,
            project=project,
            user="u1",
            input={"documentId": f"doc-{uuid.uuid4().hex[:6]}"},
            task_queue=task_queue,
        )

    async def post(self, project: str, run_id: str, message: str, workflow_id: str | None = None) -> int:
        params = {} if workflow_id is None else {"workflow_id": workflow_id}
        response = await self.http.post(
            f"/workflows/runs/{run_id}/updates",
            params=params,
            json={"type": "PROGRESS", "message": message},
            headers=self.auth(project),
        )
        return response.status_code

    async def stored(self, project: str, workflow_id: str, run_id: str) -> list[str]:
        response = await self.http.get(f"/workflows/runs/{workflow_id}/{run_id}/updates", headers=self.auth(project))
        assert response.status_code == 200, response.text
        return [update["message"] for update in response.json()["messages"]]

    async def streamed(self, project: str, workflow_id: str, run_id: str) -> list[str]:
        """The messages the stream of a closed run sends, up to its `event: end`."""
        messages: list[str] = []
        path = f"/workflows/runs/{workflow_id}/{run_id}/stream"
        async with asyncio.timeout(DEADLINE), self.http.stream("GET", path, headers=self.auth(project)) as response:
            assert response.status_code == 200
            event, data = "message", ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = line.removeprefix("data: ")
                elif not line:
                    if event == "end":
                        assert orjson.loads(data)["reason"] == "run_closed"
                        return messages
                    if event == "message" and data:
                        messages.append(orjson.loads(data)["message"])
                    event, data = "message", ""
        raise AssertionError("the stream ended without `event: end`")

    def looked_up(self, run_id: str) -> int:
        """How many times the API listed `run_id` to find it."""
        return self.runs.listings[f"RunId = '{run_id}'"]


@pytest.fixture(scope="module")
async def client(services: Services) -> Client:
    return await Client.connect(services.temporal_address)


@pytest.fixture(params=[0.0, 2.0, 5.0], ids=lambda lag: f"lag {lag:g} s")
async def lagging(request: pytest.FixtureRequest, services: Services, client: Client) -> AsyncIterator[Stack]:
    """The API with listings `lag` seconds late, under uvicorn, and the sample worker posting to it."""
    lag: float = request.param
    port = stack.free_port()
    base_url = f"http://{stack.LOCALHOST}:{port}/api/v1"
    settings = Settings.from_env(
        {
            "TEMPORAL_ADDRESS": services.temporal_address,
            "REDIS_URL": services.redis_url,
            "JWT_SECRET": services.jwt_secret,
            "DATA_DIR": str(services.data_dir),
            "VALIDATE_RESPONSES": "1",
            "TEMPORAL_TASK_QUEUE": TASK_QUEUE,
        }
    )
    assert settings.visibility_wait_seconds == 5  # the default the operation documents
    runs: list[LaggingRunsBackend] = []
    app = create_app(settings, lagging_backends(lag, runs))
    config = uvicorn.Config(app, host=stack.LOCALHOST, port=port, log_config=None, lifespan="on", ws="none")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or serving.done(), DEADLINE, "the API listens")
    assert server.started, "the API did not start"
    try:
        async with (
            WorkloadActivities(api_url=base_url, secret=services.jwt_secret) as activities,
            create_worker(client, task_queue=TASK_QUEUE, activities=activities),
            # A kept-alive connection is dropped by the client before the server's 5 s idle timeout
            # can close it under a request (a post here may wait that long beside an idle one).
            httpx.AsyncClient(base_url=base_url, timeout=DEADLINE, limits=httpx.Limits(keepalive_expiry=1)) as http,
        ):
            [backend] = runs
            yield Stack(http, backend, client, services.jwt_secret)
    finally:
        server.should_exit = True
        async with asyncio.timeout(DEADLINE):
            await serving


async def test_updates_posted_right_after_a_start_are_stored_and_streamed(lagging: Stack) -> None:
    project, other = f"lag-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    missing = str(uuid.uuid4())
    # The sample's run, whose first activity posts at once; and a run no worker picks up, so that
    # nothing but the test's posts asks the API about it (a describe would make it known).
    (sample_workflow, sample_run), (workflow_id, run_id) = await asyncio.gather(
        lagging.start(project), lagging.start(project, task_queue=IDLE_QUEUE)
    )
    # Right after the start, before anything else names it: found by listing, once listed.
    statuses = await asyncio.gather(
        lagging.post(project, run_id, "without workflow id"),
        lagging.post(other, run_id, "another project"),
        lagging.post(project, missing, "a run that never exists"),
    )
    assert list(statuses) == [200, 404, 404]
    if lagging.runs.lag > 0:
        assert lagging.looked_up(run_id) > 1  # not listed at first: looked up again
    assert await lagging.post(project, run_id, "with workflow id", workflow_id) == 200
    assert await lagging.post(other, run_id, "another project, naming the workflow", workflow_id) == 404
    await lagging.client.get_workflow_handle(workflow_id, run_id=run_id).terminate("the test is over")
    sample = lagging.client.get_workflow_handle(sample_workflow, run_id=sample_run)
    async with asyncio.timeout(DEADLINE):
        assert (await sample.result())["success"] is True

    stored = await lagging.stored(project, workflow_id, run_id)
    assert stored == ["without workflow id", "with workflow id"]
    assert await lagging.streamed(project, workflow_id, run_id) == stored
    # The sample's first and last updates: both stored and streamed, and its run was never listed
    # to be found (the activity names its workflow), whatever the lag.
    sample_stored = await lagging.stored(project, sample_workflow, sample_run)
    assert len(sample_stored) == 2 and sample_stored[0].startswith("Processing document")
    assert await lagging.streamed(project, sample_workflow, sample_run) == sample_stored
    assert lagging.looked_up(sample_run) == 0
    # A run that never exists was looked up again and again over the window before its 404.
    assert lagging.looked_up(missing) > 2
