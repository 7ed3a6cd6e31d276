"""Two API replicas on the same Temporal and Redis (the session's), as behind a load balancer: the
API process keeps no state of its own, so what is done through one is seen through the other."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from cli import stack
from core.tokens import mint_token
from tests.support.live import CLI, Services, api_url, live_env, start_api, start_worker
from tests.support.load import Poster, ResumingReader, read_log
from tests.support.runs import Run
from tests.support.waits import wait_all, wait_until

pytestmark = pytest.mark.services

DEADLINE = 60.0
START = [*CLI, "start", "AgentConversation"]


@dataclass(frozen=True)
class Replicas:
    urls: tuple[str, str]
    services: Services
    task_queue: str

    def env(self) -> dict[str, str]:
        return live_env(self.services, self.urls[0], self.task_queue)

    def token(self) -> str:
        return mint_token(self.services.jwt_secret, user="replica-user", project="replicas")


@pytest.fixture(scope="module")
def replicas(services: Services) -> Iterator[Replicas]:
    """`python -m cli.main serve` twice, on two ports, plus the sample worker (which posts its
    updates through the first replica)."""
    ports = (stack.free_port(), stack.free_port())
    urls = (api_url(ports[0]), api_url(ports[1]))
    task_queue = f"replicas-{secrets.token_hex(4)}"
    children: list[stack.Child] = []
    with stack.running(children):
        for port, url in zip(ports, urls, strict=True):
            start_api(children, f"replica-{port}", port, live_env(services, url, task_queue), services.logs)
        worker_env = live_env(services, urls[0], task_queue)
        start_worker(children, f"replica-worker-{ports[0]}", worker_env, services.logs)
        yield Replicas(urls=urls, services=services, task_queue=task_queue)


def start_conversation(replicas: Replicas) -> Run:
    out = subprocess.run(
        [*START, "--project", "replicas", "--user", "replica-user", "--interaction", "replicas"],
        env=replicas.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    ids = json.loads(out.stdout)
    return Run(ids["workflow_id"], ids["run_id"])


async def test_updates_cross_replicas_and_a_cancel_through_one_reads_back_through_the_other(
    replicas: Replicas,
) -> None:
    run = await asyncio.to_thread(start_conversation, replicas)
    auth = {"Authorization": f"Bearer {replicas.token()}"}
    async with (
        httpx.AsyncClient(base_url=replicas.urls[0], headers=auth, timeout=30) as first,
        httpx.AsyncClient(base_url=replicas.urls[1], headers=auth, timeout=30) as second,
    ):
        # A stream open on each replica; updates posted through the other one reach it.
        on_second, on_first = ResumingReader(second, run), ResumingReader(first, run)
        reading = [asyncio.create_task(on_second.run()), asyncio.create_task(on_first.run())]
        await wait_all([on_second.connected, on_first.connected], DEADLINE)
        poster_first, poster_second = Poster(first), Poster(second)
        await poster_first.post_until_acked(run, "posted through the first replica")
        await poster_second.post_until_acked(run, "posted through the second replica")
        mine = {"posted through the first replica", "posted through the second replica"}

        def delivered_to_both() -> bool:
            return all(mine <= {u["message"] for u in r.received} for r in (on_second, on_first))

        await wait_until(delivered_to_both, DEADLINE, "each update reaches the stream on the other replica")

        # Cancelled through the first replica, read back through the second.
        cancelled = await first.post(f"{run.path}/actions/cancel", json={"reason": "replica test"})
        assert cancelled.status_code == 200, cancelled.text

        async def status_on_second() -> str:
            return str((await second.get(run.path)).json()["status"])

        async with asyncio.timeout(DEADLINE):
            while await status_on_second() != "CANCELED":  # noqa: ASYNC110  # the worker acts on its own time
                await asyncio.sleep(0.2)
        # Both streams end by themselves with `end` once every stored update was sent.
        await wait_all([on_second.done, on_first.done], DEADLINE)
        await asyncio.gather(*reading)
        logs = [await read_log(client, run) for client in (first, second)]
        refused = await second.post(f"{run.path}/signal/UserInput", json={"message": "too late"})
    assert logs[0] == logs[1]
    for reader in (on_second, on_first):
        assert reader.error is None and reader.ended_by_server["run_closed"] == 1
        assert reader.received == logs[0]  # exactly the stored log, once, in order
    assert refused.status_code == 409
