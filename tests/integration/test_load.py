"""A bounded load test on loopback: concurrent update streams over several runs while updates are
posted, with random forced disconnects and resumes (`Last-Event-ID`, sometimes `since` as an
EventSource client does); every stream must get every update exactly once, in order.

Small by default (part of `make test`); larger by environment:

    LOAD_STREAMS=50 LOAD_POSTS=1000 .venv/bin/pytest tests/integration/test_load.py -s

`LOAD_SEED` replays one run of the random choices (the seed is printed with the figures).

The clients (`ResumingReader`, `Poster`) are in `tests/support/load.py`, shared with the fault and
replica tests.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import secrets
import time
from typing import Any

import httpx
import pytest

from backends.redis_updates import MAX_UPDATES_PER_RUN
from tests.support.live import LiveApi
from tests.support.load import Poster, ResumingReader, read_log
from tests.support.runs import Run, start_runs
from tests.support.waits import wait_all

pytestmark = pytest.mark.services

POSTERS = 8
FORCED_DISCONNECTS_PER_STREAM = 5  # on average, whatever the scale


async def test_streams_with_forced_disconnects_get_every_update_once_in_order(live_api: LiveApi) -> None:
    n_streams = int(os.environ.get("LOAD_STREAMS", "10"))
    n_posts = int(os.environ.get("LOAD_POSTS", "200"))
    seed = int(os.environ.get("LOAD_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    n_runs = max(3, math.ceil(n_posts / (MAX_UPDATES_PER_RUN // 2)))  # never trimmed: exactly once is exact
    project, user = "load-project", f"load-{secrets.token_hex(3)}"
    runs = await asyncio.to_thread(start_runs, live_api.env(), n_runs, project=project, user=user)
    per_run_events = n_posts / n_runs
    disconnect_p = min(0.2, FORCED_DISCONNECTS_PER_STREAM / per_run_events)

    limits = httpx.Limits(max_connections=n_streams + POSTERS + 4, max_keepalive_connections=n_streams + POSTERS + 4)
    auth = {"Authorization": f"Bearer {live_api.token(project=project, user=user)}"}
    async with httpx.AsyncClient(base_url=live_api.base_url, headers=auth, timeout=60, limits=limits) as http:
        readers = [
            ResumingReader(
                http,
                runs[i % n_runs],
                rng=random.Random(rng.random()),
                disconnect_probability=disconnect_p,
                since_probability=0.25,
            )
            for i in range(n_streams)
        ]
        early, late = readers[: max(1, n_streams // 2)], readers[max(1, n_streams // 2) :]
        tasks = [asyncio.create_task(r.run()) for r in early]
        await wait_all([r.connected for r in early], 60)

        poster = Poster(http)
        halfway = asyncio.Event()
        work: asyncio.Queue[tuple[Run, str]] = asyncio.Queue()
        for i in range(n_posts):
            work.put_nowait((runs[i % n_runs], f"load-{i}"))

        async def post_worker() -> None:
            while not work.empty():
                run, message = work.get_nowait()
                await poster.post(run, message)
                if poster.acked_count >= n_posts // 2:
                    halfway.set()

        started = time.perf_counter()
        posting = [asyncio.create_task(post_worker()) for _ in range(POSTERS)]
        async with asyncio.timeout(300):
            await halfway.wait()  # the other half of the streams opens while posts flow
        tasks += [asyncio.create_task(r.run()) for r in late]
        await asyncio.gather(*posting)
        posting_seconds = time.perf_counter() - started
        for run in runs:
            await poster.post_until_acked(run, run.sentinel)
        await wait_all([r.done for r in readers], 300)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started

        logs = {run.run_id: await read_log(http, run) for run in runs}
        for run in runs:
            done = await http.post(f"{run.path}/actions/terminate", json={"reason": "load test done"})
            assert done.status_code == 200, done.text
    figures: dict[str, Any] = {
        "seed": seed,
        "runs": n_runs,
        "streams": n_streams,
        "posts": n_posts,
        "posts_acked": poster.acked_count,
        "posts_per_second": round(n_posts / posting_seconds, 1),
        "events_delivered": sum(len(r.received) for r in readers),
        "reconnects": sum(r.reconnects for r in readers),
        "forced_disconnects": sum(r.forced for r in readers),
        "refused_opens": dict(sum((r.refused for r in readers), collections.Counter())),
        "seconds": round(elapsed, 2),
    }
    print("\nload test figures:", json.dumps(figures))

    assert not poster.failures, poster.failures
    assert poster.acked_count == n_posts + n_runs
    poster.assert_all_stored(logs)
    for reader in readers:
        reader.assert_exactly_once_in_order(logs[reader.run_ids.run_id])
    assert figures["forced_disconnects"] > 0
