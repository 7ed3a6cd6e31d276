"""TLS, mutual TLS and the API key to Temporal, on real connections.

The session's Temporal dev server speaks cleartext gRPC; a terminator started here
(`tests.support.tls`) serves TLS in front of it (ALPN h2; under mTLS it requires a client
certificate of the test's CA) and reads the gRPC requests that pass. Everything is configured the
way an operator does it, with `TEMPORAL_*` variables read by `Settings.from_env`: the worker
(`run_worker`), a run started with the connection `workflow-runs start` uses, and the API
(`create_app`, whose runs backend is `TemporalRunsBackend.connect`) reading the run.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import pytest

from core import temporal_connection
from core.settings import Settings
from core.tokens import mint_token
from tests.support.live import Services
from tests.support.tls import Authority, Credentials, Terminator, running_terminator, served, server_context
from tests.support.waits import wait_until
from web.app import create_app
from web.errors import UNAVAILABLE
from workloads.shared import INGESTION_WORKFLOW
from workloads.starter import start_workflow
from workloads.worker import connect_when_up, run_worker

pytestmark = pytest.mark.services

DEADLINE = 30.0
API_KEY = f"key-{secrets.token_hex(8)}"
SERVER_NAME = "temporal.internal"  # the one name on the `named` server certificate
CA, CERT, KEY = "TEMPORAL_TLS_SERVER_CA_CERT_PATH", "TEMPORAL_TLS_CLIENT_CERT_PATH", "TEMPORAL_TLS_CLIENT_KEY_PATH"
# What each party asks of Temporal: the run's start, the worker's polls, the API's read of the run.
STARTER_WORKER_API = {"StartWorkflowExecution", "PollWorkflowTaskQueue", "DescribeWorkflowExecution"}


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Credentials  # for 127.0.0.1 and localhost
    named: Credentials  # for SERVER_NAME only
    client: Credentials
    other_ca: Authority  # one the terminator does not trust, nor the clients
    other_client: Credentials  # issued by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority.create(directory / "ca", "ca"), Authority.create(directory / "other", "other-ca")
    return Pki(
        ca=ca,
        server=ca.issue("server", hosts=("127.0.0.1", "localhost")),
        named=ca.issue("named", hosts=(SERVER_NAME,)),
        client=ca.issue("worker-client", client=True),
        other_ca=other,
        other_client=other.issue("stranger", client=True),
    )


def listener_context(listener: str, pki: Pki) -> ssl.SSLContext | None:
    """The terminator's TLS: none (`plain`), TLS (`tls`), TLS with a certificate for SERVER_NAME
    only (`named`), or mutual TLS (`mtls`)."""
    if listener == "plain":
        return None
    if listener == "named":
        return server_context(pki.named)
    if listener == "mtls":
        return server_context(pki.server, client_ca=pki.ca.cert_path)
    return server_context(pki.server)


@dataclass(frozen=True)
class Case:
    listener: str  # plain, tls, named or mtls
    variables: Callable[[Pki], dict[str, str]]  # the TEMPORAL_* an operator sets for it


CONNECTED = {
    "TLS": Case("tls", lambda p: {"TEMPORAL_TLS": "true", CA: str(p.ca.cert_path)}),
    "TLS with TEMPORAL_TLS_SERVER_NAME": Case(
        "named",
        lambda p: {"TEMPORAL_TLS": "true", CA: str(p.ca.cert_path), "TEMPORAL_TLS_SERVER_NAME": SERVER_NAME},
    ),
    # No TEMPORAL_TLS: a TLS file turns TLS on.
    "mTLS": Case(
        "mtls",
        lambda p: {CA: str(p.ca.cert_path), CERT: str(p.client.cert_path), KEY: str(p.client.key_path)},
    ),
    "mTLS under the deprecated names": Case(
        "mtls",
        lambda p: {
            "TEMPORAL_TLS_CA": str(p.ca.cert_path),
            "TEMPORAL_TLS_CERT": str(p.client.cert_path),
            "TEMPORAL_TLS_KEY": str(p.client.key_path),
        },
    ),
    # No TEMPORAL_TLS: an API key turns TLS on (Temporal Cloud's way).
    "API key over TLS": Case("tls", lambda p: {"TEMPORAL_API_KEY": API_KEY, CA: str(p.ca.cert_path)}),
    "API key without TLS": Case("plain", lambda p: {"TEMPORAL_API_KEY": API_KEY, "TEMPORAL_TLS": "false"}),
}

REFUSED = {
    "server certificate of another CA": Case("tls", lambda p: {"TEMPORAL_TLS": "true", CA: str(p.other_ca.cert_path)}),
    "server certificate for another name": Case("named", lambda p: {"TEMPORAL_TLS": "true", CA: str(p.ca.cert_path)}),
    "mTLS without a client certificate": Case("mtls", lambda p: {CA: str(p.ca.cert_path)}),
    "mTLS with a client certificate of another CA": Case(
        "mtls",
        lambda p: {
            CA: str(p.ca.cert_path),
            CERT: str(p.other_client.cert_path),
            KEY: str(p.other_client.key_path),
        },
    ),
}


def environment(services: Services, address: str, variables: Mapping[str, str]) -> dict[str, str]:
    """The environment of the API and the worker, Temporal reached at `address` only."""
    return {
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_TASK_QUEUE": f"tls-{secrets.token_hex(4)}",  # no other worker polls it
        "REDIS_URL": services.redis_url,
        "JWT_SECRET": services.jwt_secret,
        "DATA_DIR": str(services.data_dir),
        "VALIDATE_RESPONSES": "1",
        "BACKEND_TIMEOUT_SECONDS": "5",
        **variables,
    }


@pytest.fixture
async def terminator(case: Case, services: Services, pki: Pki) -> AsyncIterator[Terminator]:
    """The terminator of the test's case, in front of the session's Temporal."""
    context = listener_context(case.listener, pki)
    async with running_terminator(services.temporal_address, context) as running:
        yield running


async def worker_result(settings: Settings, workflow_id: str, run_id: str) -> object:
    """Run the sample worker on `settings` until the run it executes completes; the run's result.
    The worker failing (it cannot connect, say) fails at once rather than at the deadline."""
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, api_url=None, stop=stop))
    client = await temporal_connection.connect(settings)
    result = asyncio.create_task(client.get_workflow_handle(workflow_id, run_id=run_id).result())
    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.wait({worker, result}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            worker.result()  # raises what stopped the worker
            raise AssertionError("the worker stopped before the run completed")
        return result.result()
    finally:
        stop.set()
        result.cancel()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(worker, result, return_exceptions=True)


def bearer(project: str, services: Services) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(services.jwt_secret, user='u1', project=project)}"}


@pytest.mark.parametrize("case", CONNECTED.values(), ids=list(CONNECTED))
async def test_a_run_goes_from_start_to_worker_to_api_through_the_terminator(
    case: Case, terminator: Terminator, services: Services, pki: Pki
) -> None:
    env = environment(services, terminator.address, case.variables(pki))
    settings = Settings.from_env(env)
    project = f"tls-{uuid.uuid4().hex[:8]}"

    # Started as `workflow-runs start` does, on the connection of these settings.
    starter = await temporal_connection.connect(settings)
    workflow_id, run_id = await start_workflow(
        starter,
        INGESTION_WORKFLOW,
        project=project,
        user="u1",
        input={"documentId": "doc-1"},
        task_queue=settings.temporal_task_queue,
    )
    # Executed by the sample worker, which reaches Temporal only through the terminator.
    assert await worker_result(Settings.from_env(env), workflow_id, run_id) == {"success": True}
    # Read by the API, whose runs backend connects with the same settings.
    async with served(create_app(Settings.from_env(env))) as http:
        answer = await http.get(f"/workflows/runs/{workflow_id}/{run_id}", headers=bearer(project, services))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "COMPLETED"
    assert answer.json()["run_id"] == run_id

    requests = terminator.requests
    assert terminator.tap_errors == []
    assert {r.method for r in requests} >= STARTER_WORKER_API
    if case.listener != "plain":
        assert {a.alpn for a in terminator.accepted} == {"h2"}
    if case.listener == "mtls":
        # Every connection presented the client certificate, and the terminator verified it.
        assert {a.client_common_name for a in terminator.accepted} == {pki.client.common_name}
    if case.listener == "named":
        assert set(terminator.server_names) == {SERVER_NAME}
        assert {r.values(":authority")[0] for r in requests} == {SERVER_NAME}
    expected_authorization = [f"Bearer {API_KEY}"] if "TEMPORAL_API_KEY" in env else []
    assert [r for r in requests if r.values("authorization") != expected_authorization] == []


@pytest.mark.parametrize("case", REFUSED.values(), ids=list(REFUSED))
async def test_a_refused_connection_fails_and_the_api_answers_503(
    case: Case, terminator: Terminator, services: Services, pki: Pki
) -> None:
    settings = Settings.from_env(environment(services, terminator.address, case.variables(pki)))

    with pytest.raises(RuntimeError, match="Failed client connect"):
        await temporal_connection.connect(settings)

    async with served(create_app(settings)) as http:
        answer = await http.get(f"/workflows/runs/wf-1/{uuid.uuid4()}", headers=bearer("p1", services))
    assert answer.status_code == 503, answer.text
    assert answer.json()["message"].startswith(UNAVAILABLE["temporal"]), answer.text
    # The API's words only: nothing of the TLS failure nor of where Temporal is.
    for backend_text in ("ertificate", "tls", "transport", "tonic", str(terminator.port)):
        assert backend_text not in answer.text.lower()
    # No connection got past the TLS handshake: nothing reached Temporal.
    assert terminator.accepted == []


@pytest.mark.parametrize("case", [REFUSED["server certificate of another CA"]], ids=["another CA"])
async def test_the_worker_does_not_wait_out_a_refused_server_certificate(
    case: Case, terminator: Terminator, services: Services, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="workloads.worker")
    settings = Settings.from_env(environment(services, terminator.address, case.variables(pki)))
    connecting = asyncio.create_task(connect_when_up(settings, first_delay=0.05))
    try:
        # Either it gives up, or it logs that it will retry: whichever comes first.
        await wait_until(lambda: connecting.done() or bool(caplog.records), DEADLINE, "the worker's first attempt")
        assert connecting.done(), [r.getMessage() for r in caplog.records]
        with pytest.raises(RuntimeError, match="UnknownIssuer"):
            connecting.result()
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
