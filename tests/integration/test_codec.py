"""Encrypted payloads on the real stack: a conversation started as `workflow-runs start` starts it
with SAMPLES_ENCRYPT=1, executed by the sample worker (which encrypts), signalled and read through the
API, whose runs backend decodes with the codec server (`workflow-runs codec-server`'s app, served
by uvicorn here on a free port).

Temporal holds only `binary/encrypted` payloads (input, memo, activity inputs and results, the API's
signal, the result), while every answer of the API shows them decoded; with the codec server stopped,
the answers that need it are 503 with the API's sentence, and those that do not still answer.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from temporalio.api.common.v1 import Payload
from temporalio.client import Client

from backends.codec_client import payloads_in
from cli import stack
from core import temporal_connection
from core.settings import Settings
from core.tokens import mint_token
from tests.support.live import Services
from tests.support.tls import served
from tests.support.waits import wait_until
from web.app import create_app
from web.errors import UNAVAILABLE
from workloads.codec import ENCODING
from workloads.codec_server import create_codec_app
from workloads.shared import CONVERSATION_WORKFLOW, GENERATE_ANSWER, USER_INPUT_SIGNAL
from workloads.starter import start_workflow
from workloads.worker import run_worker, sample_data_converter

pytestmark = pytest.mark.services

DEADLINE = 30.0
AUTH = f"Bearer codec-{secrets.token_hex(8)}"
# The run idles this long after its last answer, then completes with its result: long enough for the
# signal sent right after the start to arrive first.
IDLE_SECONDS = 3


@dataclass
class CodecServer:
    """The codec server's app under uvicorn, in this event loop, until `stop`."""

    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        async with asyncio.timeout(DEADLINE):
            await self.task


@pytest.fixture
async def codec_server(settings: Settings) -> AsyncIterator[CodecServer]:
    assert settings.temporal_codec_endpoint is not None and settings.codec_key is not None
    port = int(settings.temporal_codec_endpoint.rsplit(":", 1)[1].split("/", 1)[0])
    app = create_codec_app(base64.b64decode(settings.codec_key), auth=settings.temporal_codec_auth, cors_origins=[])
    config = uvicorn.Config(app, host=stack.LOCALHOST, port=port, log_config=None, lifespan="off", ws="none")
    server = uvicorn.Server(config)
    running = CodecServer(server, asyncio.create_task(server.serve()))
    await wait_until(lambda: server.started or running.task.done(), DEADLINE, "the codec server listens")
    assert server.started, "the codec server did not start"
    yield running
    await running.stop()


@pytest.fixture
def settings(services: Services) -> Settings:
    """The API's, the worker's and the starter's settings, as an operator sets them."""
    return Settings.from_env(
        {
            "TEMPORAL_ADDRESS": services.temporal_address,
            "TEMPORAL_TASK_QUEUE": f"codec-{secrets.token_hex(4)}",  # no other worker polls it
            "REDIS_URL": services.redis_url,
            "JWT_SECRET": services.jwt_secret,
            "DATA_DIR": str(services.data_dir),
            "VALIDATE_RESPONSES": "1",
            "BACKEND_TIMEOUT_SECONDS": "5",
            "SAMPLES_ENCRYPT": "1",
            "CODEC_KEY": base64.b64encode(secrets.token_bytes(32)).decode("ascii"),
            "TEMPORAL_CODEC_ENDPOINT": f"http://{stack.LOCALHOST}:{stack.free_port()}/{{namespace}}",
            "TEMPORAL_CODEC_AUTH": AUTH,
            "CODEC_TIMEOUT_SECONDS": "5",
        }
    )


def encodings(payloads: list[Payload]) -> set[bytes]:
    return {p.metadata["encoding"] for p in payloads}


async def raw_payloads(plain: Client, workflow_id: str, run_id: str) -> list[Payload]:
    """Every payload Temporal holds for the run (its history and memo), read without any codec."""
    held: list[Payload] = []
    handle = plain.get_workflow_handle(workflow_id, run_id=run_id)
    async for event in handle.fetch_history_events():
        payloads_in(event, held)
    description = await handle.describe()
    payloads_in(description.raw_description.workflow_execution_info.memo, held)
    return held


async def test_encrypted_runs_are_shown_decoded_and_answer_503_while_the_codec_server_is_down(
    settings: Settings, codec_server: CodecServer, services: Services
) -> None:
    project = f"codec-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {mint_token(services.jwt_secret, user='u1', project=project)}"}
    # Started as `workflow-runs start` starts it: the starter's converter encrypts input and memo.
    starter = await temporal_connection.connect(settings, data_converter=sample_data_converter(settings))
    workflow_id, run_id = await start_workflow(
        starter,
        CONVERSATION_WORKFLOW,
        project=project,
        user="u1",
        input={"topic": "secret topic", "message": "first question", "max_idle_seconds": IDLE_SECONDS},
        task_queue=settings.temporal_task_queue,
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, api_url=None, stop=stop))
    run_path = f"/workflows/runs/{workflow_id}/{run_id}"
    try:
        async with served(create_app(settings)) as api:
            signalled = await api.post(
                f"{run_path}/signal/{USER_INPUT_SIGNAL}", json={"message": "second question"}, headers=headers
            )
            assert signalled.status_code == 200, signalled.text
            async with asyncio.timeout(DEADLINE):
                done = asyncio.ensure_future(starter.get_workflow_handle(workflow_id, run_id=run_id).result())
                await asyncio.wait({done, worker}, return_when=asyncio.FIRST_COMPLETED)
            if worker.done():
                worker.result()  # raises what stopped the worker
            result = done.result()
            assert result == {"answered": 2, "reason": "idle"}  # the worker read both questions

            # Temporal holds ciphertext only.
            plain = await temporal_connection.connect(settings)
            held = await raw_payloads(plain, workflow_id, run_id)
            assert len(held) >= 8 and encodings(held) == {ENCODING}
            assert not any(b"question" in p.data or b"secret topic" in p.data for p in held)

            # The API shows it all decoded.
            answer = await api.get(run_path, headers=headers)
            assert answer.status_code == 200, answer.text
            run = answer.json()
            assert run["status"] == "COMPLETED"
            assert run["input"]["message"] == "first question"
            assert run["input"]["topic"] == "secret topic"
            assert run["result"] == {"answered": 2, "reason": "idle"}
            assert run["memo"]["topic"] == run["topic"] == "secret topic"
            assert run["memo"]["project"] == project
            assert run["memo"]["activity_state"] == "idle"
            signals = [e["signal"] for e in run["history"] if "signal" in e]
            assert signals == [{"name": USER_INPUT_SIGNAL, "input": [{"message": "second question"}]}]
            answered = [
                e
                for e in run["history"]
                if e["event_type"] == "EVENT_TYPE_ACTIVITY_TASK_COMPLETED" and e["activity"]["name"] == GENERATE_ANSWER
            ]
            # Completions are in the order the activities finished, which a loaded machine may swap.
            answered.sort(key=lambda e: e["activity"]["input"][0]["message"])
            assert [e["activity"]["input"][0]["message"] for e in answered] == ["first question", "second question"]
            assert [e["result"] for e in answered] == [
                ["Answer #1: you said 'first question'."],
                ["Answer #2: you said 'second question'."],
            ]
            assert "undecodable" not in answer.text

            listing = await api.post("/workflows/runs", json={}, headers=headers)
            assert listing.status_code == 200, listing.text
            [listed] = listing.json()["runs"]
            assert (listed["run_id"], listed["topic"]) == (run_id, "secret topic")

            # The codec server stopped: what needs it is 503 with the API's sentence, nothing of the codec's.
            await codec_server.stop()
            for refused in (
                await api.get(run_path, headers=headers),
                await api.post("/workflows/runs", json={}, headers=headers),
            ):
                assert refused.status_code == 503, refused.text
                message = refused.json()["message"]
                assert message.startswith(UNAVAILABLE["codec"])
                assert "127.0.0.1" not in message and "ConnectError" not in message
            # A listing with nothing to decode does not need it.
            others = {"Authorization": f"Bearer {mint_token(services.jwt_secret, user='u1', project='nobody')}"}
            empty = await api.post("/workflows/runs", json={}, headers=others)
            assert empty.status_code == 200, empty.text
            assert empty.json()["runs"] == []
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(worker, return_exceptions=True)


async def test_the_codec_server_refuses_a_caller_without_its_authorization(
    settings: Settings, codec_server: CodecServer
) -> None:
    assert settings.temporal_codec_endpoint is not None
    url = settings.temporal_codec_endpoint.replace("{namespace}", "default") + "/decode"
    async with httpx.AsyncClient() as http:
        refused = await http.post(url, json={"payloads": []})
        accepted = await http.post(url, json={"payloads": []}, headers={"Authorization": AUTH})
    assert (refused.status_code, accepted.status_code) == (401, 200)
