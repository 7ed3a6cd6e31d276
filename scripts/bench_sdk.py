"""The ceiling for the runs figures: the same Temporal calls, straight through the temporalio SDK.

`concurrency` loops share one client (as the server's backend does) and repeat, for `duration`
seconds, what the server does for one request:

- `details`: `describe` + `fetch_history_events` (every event, pages of 1000) of one run;
- `list`: `list_workflows` with the visibility query the server builds for the caller, one page.

It runs in a child process pinned where the servers run (`scripts.bench_proc`) and prints one
JSON object (`scripts.bench_load.LoadResult`'s fields). Its own CPU time per call is metered as
the "server" (it is both client and server here: an upper bound of what the SDK costs), and so
are the processes named with `--cpu-pid` (Temporal).

    python -m scripts.bench_sdk details --address 127.0.0.1:7233 --workflow-id W --run-id R
    python -m scripts.bench_sdk list --address 127.0.0.1:7233 --query "ProjectId = 'p'" --page-size 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from temporalio.client import Client

from scripts.bench_load import LoadResult, percentile
from scripts.bench_proc import CpuMeter

HISTORY_PAGE_SIZE = 1000  # backends.temporal_runs.HISTORY_PAGE_SIZE


def details_call(client: Client, workflow_id: str, run_id: str) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        await handle.describe()
        events = [event async for event in handle.fetch_history_events(page_size=HISTORY_PAGE_SIZE)]
        return len(events)

    return call


def list_call(client: Client, query: str, page_size: int) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        return len([run async for run in client.list_workflows(query, page_size=page_size, limit=page_size)])

    return call


async def measure(
    call: Callable[[], Awaitable[int]], *, concurrency: int, duration: float, warmup: float, meter: CpuMeter
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    counting = False

    async def loop(deadline: float) -> None:
        nonlocal errors
        while (start := time.perf_counter()) < deadline:
            try:
                await call()
            except Exception:
                errors += 1
                continue
            if counting:
                latencies.append((time.perf_counter() - start) * 1000)

    if warmup > 0:
        await asyncio.gather(*(loop(time.perf_counter() + warmup) for _ in range(concurrency)))
    counting = True
    meter.start()
    started = time.perf_counter()
    await asyncio.gather(*(loop(started + duration) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    cpu = meter.per_request(len(latencies))
    latencies.sort()
    return LoadResult(
        generator="temporalio-sdk",
        requests=len(latencies),
        seconds=round(seconds, 3),
        rps=round(len(latencies) / seconds, 1),
        p50_ms=round(statistics.median(latencies), 3) if latencies else 0.0,
        p99_ms=round(percentile(latencies, 0.99), 3),
        non_2xx=0,
        errors=errors,
        cpu_us_per_request=cpu,
    )


async def run(args: argparse.Namespace) -> LoadResult:
    client = await Client.connect(args.address, namespace=args.namespace)
    if args.mode == "details":
        call = details_call(client, args.workflow_id, args.run_id)
    else:
        call = list_call(client, args.query, args.page_size)
    await call()  # fail loudly now if the target is wrong
    pids = {"server": os.getpid(), **dict(_named_pid(text) for text in args.cpu_pid)}
    meter = CpuMeter(pids)
    return await measure(call, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup, meter=meter)


def _named_pid(text: str) -> tuple[str, int]:
    name, _, pid = text.partition("=")
    return name, int(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description="direct temporalio SDK calls at a fixed concurrency (prints JSON)")
    parser.add_argument("mode", choices=["details", "list"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--workflow-id")
    parser.add_argument("--run-id")
    parser.add_argument("--query", default="")
    parser.add_argument("--page-size", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID", help="also meter this process")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)).as_json()), flush=True)
    # temporalio's core runtime threads can abort the interpreter's finalisation
    # ("PyGILState_Release: thread state ... must be current"): the figures are out, skip it.
    os._exit(0)


if __name__ == "__main__":
    main()
