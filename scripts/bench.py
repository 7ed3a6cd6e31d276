"""`make bench`: every performance figure of the project's server, side by side with its ceiling.

One command, one run. It starts what it needs in a temporary folder: a Temporal dev server, Redis,
the sample worker (only while seeding), the project's server (`python -m cli.main serve`: uvicorn,
one worker, request validation on, `VALIDATE_RESPONSES=0`) and the bare baseline
(`scripts.bench_baseline`), seeds real data, measures, prints a table and writes JSON (`--json`).

Figures (each server figure beside its baseline measured in the same run, as a ratio):
  updates  POST (append one), GET 20 stored, GET 1000 stored: the server vs the bare Starlette app
           doing the same Redis work; the same generator and connections (wrk, 1 thread, 32
           connections; else `scripts.bench_load`'s asyncio+httpx generator). Also POST to a
           *running* run, where the server asks Temporal whether the run exists on every post.
  runs     GET run details and list runs: the server vs the same Temporal calls made directly
           through the temporalio SDK by `scripts.bench_sdk` at the same concurrency.
  streams  N SSE streams on one API process, one poster: POST→receipt latency p50/p99 over every
           delivery, and the server's VmRSS growth per open stream (`scripts.bench_streams`).
  streams10k  10,000 SSE streams over 1,000 running runs (10 each), 200 posts/s spread over them:
           p99 and memory per stream (`scripts.bench_many_streams --shape spread`).
  fanout   5,000 streams on one run, posts at a rising rate: the deliveries per second one process
           sustains with p99 under 250 ms (`scripts.bench_many_streams --shape fanout`).

Measurements alternate server and baseline, `--rounds` times; the table shows the medians of the
rates, and each ratio is the median of the rounds' ratios (`Figure.ratio`). With two cores or more
the load generator runs on the first core and every measured server on the others
(`scripts.bench_proc`); Redis and Temporal join the generator while the updates figures are
measured. `--profile DIR` also records a py-spy profile of the server during its first round of
every figure and prints the functions with the most own time (slows that round a little).

    python -m scripts.bench [--json PATH] [--smoke] [--duration S] [--streams N] [--rounds R]
                            [--generator auto|wrk|python] [--profile DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import orjson

from cli import stack
from core.settings import Settings
from scripts import bench_profile
from scripts.bench_load import Load, LoadResult, generate, wrk_path
from scripts.bench_proc import CpuMeter, Placement, pin_running, raise_open_files_limit, run_pinned, spawn_pinned

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "bench"
USER = "bench"
TASK_QUEUE = "bench-samples"
TARGET_RATIO = 0.8
TARGET_P99_MS = 100.0
TARGET_KB_PER_STREAM = 50.0
TARGET_MANY_P99_MS = 250.0
TARGET_MANY_KB_PER_STREAM = 30.0
TARGET_FANOUT_DELIVERIES = 25_000.0
GROUPS = ("streams", "streams10k", "fanout", "updates", "runs")
MAX_FAILED_SHARE = 0.05  # more failed requests than this and a figure is refused
POST_BODY = b'{"type":"UPDATE","message":"Processing chunk 42 of 100","details":{"progress":42,"chunk":"c-42"}}'


@dataclass(frozen=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    connections: int
    streams: int
    stream_posts: int
    stream_interval: float
    list_runs: int
    generator: str
    smoke: bool
    many_runs: int = 1000
    many_per_run: int = 10
    many_rate: float = 200.0
    fanout_streams: int = 5_000
    fanout_rates: str = "2,4,5,6,8,12,16"
    many_seconds: float = 10.0
    many_clients: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        smoke = bool(args.smoke)
        generator = args.generator
        if generator == "auto":
            generator = "wrk" if wrk_path() else "python"
        elif generator == "wrk" and not wrk_path():
            raise SystemExit("bench: --generator wrk, but wrk is not installed (apt-get install wrk)")
        return cls(
            duration=args.duration if args.duration is not None else (1.0 if smoke else 6.0),
            warmup=0.5 if smoke else 2.0,
            rounds=args.rounds if args.rounds is not None else (1 if smoke else 5),
            connections=args.connections,
            streams=args.streams if args.streams is not None else (20 if smoke else 1000),
            stream_posts=args.stream_posts if args.stream_posts is not None else (10 if smoke else 100),
            stream_interval=0.1 if smoke else 0.2,
            list_runs=4 if smoke else 30,
            generator=generator,
            smoke=smoke,
            many_runs=args.many_runs if args.many_runs is not None else (5 if smoke else 1000),
            many_per_run=2 if smoke else 10,
            many_rate=10.0 if smoke else 200.0,
            fanout_streams=args.fanout_streams if args.fanout_streams is not None else (20 if smoke else 5_000),
            fanout_rates=args.fanout_rates or ("1,2" if smoke else "2,4,5,6,8,12,16"),
            many_seconds=1.0 if smoke else args.many_seconds,
            many_clients=1 if smoke else args.many_clients,
        )


# -- the stack --------------------------------------------------------------------------------------


@dataclass
class Stack:
    data_dir: Path
    temporal_address: str
    redis_url: str
    api_port: int
    baseline_port: int
    jwt_secret: str
    children: list[stack.Child]
    api_pid: int = 0
    baseline_pid: int = 0
    server_env: dict[str, str] = field(default_factory=dict)
    backend_pids: dict[str, int] = field(default_factory=dict)
    api_env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api/v1"

    @property
    def baseline_url(self) -> str:
        return f"http://127.0.0.1:{self.baseline_port}/api/v1"


def child_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


API_ARGV = (sys.executable, "-m", "cli.main", "serve")


@contextmanager
def running_stack(data_dir: Path, placement: Placement, server_env: dict[str, str]) -> Iterator[Stack]:
    temporal_port, redis_port = stack.free_port(), stack.free_port()
    api_port, baseline_port = stack.free_port(), stack.free_port()
    bench = Stack(
        data_dir=data_dir,
        temporal_address=f"127.0.0.1:{temporal_port}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        api_port=api_port,
        baseline_port=baseline_port,
        jwt_secret=secrets.token_urlsafe(48),
        children=[],
        server_env=server_env,
    )
    env = child_env(
        {
            "HOST": "127.0.0.1",
            "PORT": str(api_port),
            "TEMPORAL_ADDRESS": bench.temporal_address,
            "REDIS_URL": bench.redis_url,
            "JWT_SECRET": bench.jwt_secret,
            "API_URL": bench.api_url,
            "TEMPORAL_TASK_QUEUE": TASK_QUEUE,
            "VALIDATE_RESPONSES": "0",  # request validation stays on (strict_validation=True)
            "DATA_DIR": str(data_dir),
        }
    )
    logs = data_dir / "logs"
    python = [sys.executable, "-m"]
    with stack.running(bench.children):
        bench.children.append(stack.start_temporal(data_dir, port=temporal_port))
        bench.children.append(stack.start_redis(data_dir, port=redis_port))
        bench.api_env = {**env, **server_env}
        api = spawn_pinned("api", API_ARGV, logs, placement.servers, bench.api_env)
        bench.children.append(api)
        baseline_argv = [
            *python,
            "scripts.bench_baseline",
            "--port",
            str(baseline_port),
            "--redis-url",
            bench.redis_url,
        ]
        bench.children.append(spawn_pinned("baseline", baseline_argv, logs, placement.servers, env))
        bench.children.append(stack.spawn("worker", [*python, "cli.main", "worker"], logs, env))
        stack.wait_for_port("127.0.0.1", api_port, 60, api.proc)
        stack.wait_for_port("127.0.0.1", baseline_port, 60, bench.children[3].proc)
        bench.api_pid, bench.baseline_pid = api.proc.pid, bench.children[3].proc.pid
        bench.backend_pids = {"redis": bench.children[1].proc.pid, "temporal": bench.children[0].proc.pid}
        yield bench


def restart_api(bench: Stack, placement: Placement) -> None:
    """A fresh API process on the same port, in the old one's place among the children."""
    index = next(i for i, child in enumerate(bench.children) if child.proc.pid == bench.api_pid)
    bench.children[index].stop()
    api = spawn_pinned("api", API_ARGV, bench.data_dir / "logs", placement.servers, bench.api_env)
    bench.children[index] = api
    stack.wait_for_port("127.0.0.1", bench.api_port, 60, api.proc)
    bench.api_pid = api.proc.pid


def stop_worker(bench: Stack) -> None:
    """The worker is only needed to run the seeded workflows; idle, it would only add noise."""
    for child in bench.children:
        if child.name == "worker":
            child.stop()


# -- seeding ----------------------------------------------------------------------------------------


@dataclass
class Seeds:
    token: str
    details: tuple[str, str]
    post_closed: tuple[str, str]
    post_running: tuple[str, str]
    get_20: tuple[str, str]
    get_1000: tuple[str, str]
    stream: tuple[str, str]
    list_query: str
    list_total: int
    counts: dict[str, int] = field(default_factory=dict)


def seed(bench: Stack, config: Config) -> Seeds:
    from redis.asyncio import Redis
    from temporalio.client import Client

    from backends.redis_updates import (
        _APPEND,
        MAX_UPDATES_PER_RUN,
        TTL_SECONDS,
        append_args,
        append_keys,
        encode_update,
    )
    from backends.visibility_query import build_query
    from core.principals import Principal
    from core.protocols import RunFilters
    from core.tokens import mint_token
    from workloads.starter import start_workflow

    async def seed_all() -> Seeds:
        client = await Client.connect(bench.temporal_address)

        async def start(kind: str, index: int) -> tuple[str, str]:
            inputs = {"documentId": f"doc-{index}"} if kind == "StandardContentIngestion" else None
            return await start_workflow(client, kind, project=PROJECT, user=USER, input=inputs, task_queue=TASK_QUEUE)

        completed = [await start("StandardContentIngestion", i) for i in range(config.list_runs + 3)]
        running = [await start("AgentConversation", i) for i in range(2)]
        async with asyncio.timeout(120):
            for workflow_id, run_id in completed:
                await client.get_workflow_handle(workflow_id, run_id=run_id).result()

        redis = Redis.from_url(bench.redis_url)
        append = redis.register_script(_APPEND)

        async def fill(run_id: str, count: int) -> None:
            # Replace what the sample workflow posted with exactly `count` updates.
            await redis.delete(*append_keys(run_id))
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(count):
                    update = {"type": "UPDATE", "message": f"Processing chunk {i}", "details": {"progress": i % 100}}
                    rest = encode_update(run_id, update)
                    await append(
                        keys=append_keys(run_id),
                        args=append_args(
                            rest,
                            max_updates=MAX_UPDATES_PER_RUN,
                            max_bytes=Settings.max_update_bytes_per_run,
                            ttl_seconds=TTL_SECONDS,
                        ),
                        client=pipe,
                    )
                await pipe.execute()

        details, post_closed, get_20, get_1000 = completed[0], completed[-3], completed[-2], completed[-1]
        post_running, stream_run = running
        # Posts land on a log already at its cap: every post then trims, the steady state.
        for run, count in ((get_20, 20), (get_1000, 1000), (post_closed, 1000), (post_running, 1000)):
            await fill(run[1], count)
        await redis.delete(*append_keys(stream_run[1]))
        await redis.aclose()

        query = build_query(RunFilters(), project_id=PROJECT, principal_ref=Principal(user_id=USER).ref)
        return Seeds(
            token=mint_token(bench.jwt_secret, user=USER, project=PROJECT, ttl_seconds=6 * 3600),
            details=details,
            post_closed=post_closed,
            post_running=post_running,
            get_20=get_20,
            get_1000=get_1000,
            stream=stream_run,
            list_query=query,
            list_total=len(completed) + len(running),
        )

    return asyncio.run(seed_all())


def check_seeds(bench: Stack, seeds: Seeds) -> None:
    """Every measured request answers 200 with the seeded data, and the baseline's answers are the
    server's, byte for byte: the comparison is of the same work. Also warms both servers up."""
    headers = {"Authorization": f"Bearer {seeds.token}"}
    with httpx.Client(headers=headers, timeout=30) as http:

        def get(url: str) -> Any:
            response = http.get(url)
            response.raise_for_status()
            return response

        for name, (workflow_id, run_id), expected in (("get_20", seeds.get_20, 20), ("get_1000", seeds.get_1000, 1000)):
            server = get(f"{bench.api_url}/workflows/runs/{workflow_id}/{run_id}/updates")
            baseline = get(f"{bench.baseline_url}/workflows/runs/{workflow_id}/{run_id}/updates")
            count = len(server.json()["messages"])
            if count != expected or server.content != baseline.content:
                raise SystemExit(
                    f"bench: {name}: server has {count} updates, baseline differs: {server.content[:200]!r}"
                )
            seeds.counts[name] = count
        for base in (bench.api_url, bench.baseline_url):
            for _, run_id in (seeds.post_closed, seeds.post_running):
                posted = http.post(f"{base}/workflows/runs/{run_id}/updates", content=POST_BODY,
                                   headers={"Content-Type": "application/json"})  # fmt: skip
                if posted.status_code != 200:
                    raise SystemExit(f"bench: POST {base}: {posted.status_code} {posted.text[:300]}")
        run = get(f"{bench.api_url}/workflows/runs/{seeds.details[0]}/{seeds.details[1]}").json()
        seeds.counts["details_history_events"] = len(run.get("history") or [])
        listed = http.post(f"{bench.api_url}/workflows/runs", json={})
        listed.raise_for_status()
        seeds.counts["list_runs"] = len(listed.json()["runs"])
        if seeds.counts["list_runs"] != seeds.list_total:
            raise SystemExit(f"bench: list answered {seeds.counts['list_runs']} runs, {seeds.list_total} seeded")


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One comparison: the server's results and its baseline's, per round."""

    name: str
    label: str
    baseline_name: str
    server: list[LoadResult] = field(default_factory=list)
    baseline: list[LoadResult] = field(default_factory=list)
    target: float | None = TARGET_RATIO
    profile: dict[str, object] | None = None
    baseline_profile: dict[str, object] | None = None

    @staticmethod
    def median_rps(results: list[LoadResult]) -> float:
        return round(statistics.median(r.rps for r in results), 1) if results else 0.0

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios: each round measures the server and its baseline back
        to back, and the machine's speed drifts between rounds (a shared host: one round's rates
        differed by a third from the next's), which a ratio of separate medians would mix in."""
        pairs = [server.rps / base.rps for server, base in zip(self.server, self.baseline, strict=False) if base.rps]
        return round(statistics.median(pairs), 3) if pairs else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "baseline": self.baseline_name,
            "server_rps": self.median_rps(self.server),
            "baseline_rps": self.median_rps(self.baseline),
            "ratio": self.ratio,
            "target_ratio": self.target,
            "meets_target": None if self.target is None else self.ratio >= self.target,
            "server_p50_ms": statistics.median(r.p50_ms for r in self.server) if self.server else 0.0,
            "server_p99_ms": statistics.median(r.p99_ms for r in self.server) if self.server else 0.0,
            "baseline_p50_ms": statistics.median(r.p50_ms for r in self.baseline) if self.baseline else 0.0,
            "baseline_p99_ms": statistics.median(r.p99_ms for r in self.baseline) if self.baseline else 0.0,
            "failed_requests": sum(r.non_2xx + r.errors for r in (*self.server, *self.baseline)),
            "server_cpu_us_per_request": median_cpu(self.server),
            "baseline_cpu_us_per_request": median_cpu(self.baseline),
            "rounds": {"server": [r.as_json() for r in self.server], "baseline": [r.as_json() for r in self.baseline]},
            **({"profile": self.profile} if self.profile else {}),
            **({"baseline_profile": self.baseline_profile} if self.baseline_profile else {}),
        }


def median_cpu(results: list[LoadResult]) -> dict[str, float]:
    """Per process, the median over rounds of its CPU microseconds per request."""
    names = sorted({name for r in results for name in r.cpu_us_per_request})
    return {
        name: round(statistics.median(r.cpu_us_per_request[name] for r in results if name in r.cpu_us_per_request), 1)
        for name in names
    }


class Runner:
    def __init__(
        self, bench: Stack, seeds: Seeds, config: Config, placement: Placement, profile_dir: Path | None
    ) -> None:
        self.bench, self.seeds, self.config, self.placement = bench, seeds, config, placement
        self.profile_dir = profile_dir
        self.auth = {"Authorization": f"Bearer {seeds.token}"}
        self._running: list[tuple[str, str]] = []

    def http(self, load: Load, server_pid: int, *, profile_as: str | None = None) -> LoadResult:
        """Warm up, then measure one load with the configured generator, metering the CPU time of
        the server measured, Redis and Temporal (and, with `--profile`, sampling it with py-spy)."""
        config = self.config
        generate(load, generator=config.generator, connections=config.connections, duration=config.warmup,
                 cores=self.placement.generator)  # fmt: skip
        recorder = None
        if profile_as is not None and self.profile_dir is not None:
            output = self.profile_dir / f"{profile_as}.txt"
            recorder = bench_profile.record(server_pid, config.duration, output, self.placement.generator)
        meter = CpuMeter({"server": server_pid, **self.bench.backend_pids})
        meter.start()
        result = generate(load, generator=config.generator, connections=config.connections,
                          duration=config.duration, cores=self.placement.generator)  # fmt: skip
        result = dataclasses.replace(result, cpu_us_per_request=meter.per_request(result.requests))
        if recorder is not None:
            recorder.wait(timeout=60)
        failed = result.non_2xx + result.errors
        if result.requests == 0 or failed > MAX_FAILED_SHARE * result.requests:
            raise SystemExit(f"bench: {load.method} {load.url}: {result.non_2xx} non-2xx, {result.errors} errors")
        if failed:  # a few (e.g. a 503 when Temporal is slow): reported beside the figure, not hidden
            print(f"bench: WARNING {load.method} {load.url}: {result.non_2xx} non-2xx, {result.errors} errors "
                  f"of {result.requests}", file=sys.stderr, flush=True)  # fmt: skip
        return result

    def sdk(self, mode: str, extra: list[str]) -> LoadResult:
        config = self.config
        argv = [
            sys.executable, "-m", "scripts.bench_sdk", mode, "--address", self.bench.temporal_address,
            "--concurrency", str(config.connections), "--duration", str(config.duration),
            "--warmup", str(config.warmup), *extra,
        ]  # fmt: skip
        argv += [f"--cpu-pid={name}={pid}" for name, pid in self.bench.backend_pids.items()]
        data = json.loads(run_pinned(argv, self.placement.servers, timeout=config.duration + 120, env=child_env({})))
        result = LoadResult(**data)
        if result.errors or result.requests == 0:
            raise SystemExit(f"bench: direct SDK {mode}: {result.errors} errors, {result.requests} calls")
        return result

    def updates_figures(self) -> list[Figure]:
        seeds, bench = self.seeds, self.bench
        json_post = {**self.auth, "Content-Type": "application/json"}

        def post(base: str, run: tuple[str, str]) -> Load:
            return Load(f"{base}/workflows/runs/{run[1]}/updates", "POST", POST_BODY, json_post)

        def get(base: str, run: tuple[str, str]) -> Load:
            return Load(f"{base}/workflows/runs/{run[0]}/{run[1]}/updates", "GET", None, self.auth)

        api, baseline = bench.api_url, bench.baseline_url
        post_figure = Figure("post", "POST update (append one)", "bare Starlette + same Redis work")
        running = Figure("post_running_run", "POST update, running run", "the POST baseline", target=None)
        running.baseline = post_figure.baseline  # the same work in Redis; only the server asks Temporal
        cases: list[tuple[Figure, Load, Load | None]] = [
            (post_figure, post(api, seeds.post_closed), post(baseline, seeds.post_closed)),
            (
                Figure("get_20", "GET updates, 20 stored", "bare Starlette + same Redis work"),
                get(api, seeds.get_20),
                get(baseline, seeds.get_20),
            ),
            (
                Figure("get_1000", "GET updates, 1000 stored", "bare Starlette + same Redis work"),
                get(api, seeds.get_1000),
                get(baseline, seeds.get_1000),
            ),
            (running, post(api, seeds.post_running), None),
        ]
        for round_index in range(self.config.rounds):
            for figure, server_load, baseline_load in cases:
                first = round_index == 0
                sides: list[tuple[list[LoadResult], Load | None, int, str | None]] = [
                    (figure.server, server_load, bench.api_pid, figure.name if first else None),
                    (figure.baseline, baseline_load, bench.baseline_pid, f"{figure.name}.baseline" if first else None),
                ]
                for results, load, pid, profile_as in sides if round_index % 2 == 0 else reversed(sides):
                    if load is not None:
                        results.append(self.http(load, pid, profile_as=profile_as))
                self.progress(figure, round_index)
        return [case[0] for case in cases]

    def runs_figures(self) -> list[Figure]:
        seeds, bench = self.seeds, self.bench
        details = Figure("details", "GET run details", "temporalio: describe + fetch_history")
        listing = Figure("list", "list runs (one page)", "temporalio: list_workflows, same query")
        workflow_id, run_id = seeds.details
        for round_index in range(self.config.rounds):
            profile = round_index == 0
            for figure in (details, listing):
                server_first = round_index % 2 == 0
                for side in ("server", "sdk") if server_first else ("sdk", "server"):
                    if side == "sdk" and figure is details:
                        figure.baseline.append(self.sdk("details", ["--workflow-id", workflow_id, "--run-id", run_id]))
                    elif side == "sdk":
                        figure.baseline.append(self.sdk("list", ["--query", seeds.list_query, "--page-size", "50"]))
                    elif figure is details:
                        load = Load(f"{bench.api_url}/workflows/runs/{workflow_id}/{run_id}", "GET", None, self.auth)
                        figure.server.append(self.http(load, bench.api_pid, profile_as="details" if profile else None))
                    else:
                        headers = {**self.auth, "Content-Type": "application/json"}
                        load = Load(f"{bench.api_url}/workflows/runs", "POST", b"{}", headers)
                        figure.server.append(self.http(load, bench.api_pid, profile_as="list" if profile else None))
                self.progress(figure, round_index)
        return [details, listing]

    @contextmanager
    def backends_beside_generator(self, wanted: bool) -> Iterator[None]:
        """While measuring (when `wanted`), Redis and Temporal run on the generator's core, so
        that the measured server's core runs the measured server alone: the updates figures
        compare two servers doing the same Redis work, and Redis (about a quarter of a core at
        these rates) scheduled beside one of them took its CPU and not the other's. The stream
        and run details groups keep them where the scheduler puts them (the Temporal dev server
        spends milliseconds of CPU per run details request, more than the generator's core spares)."""
        pids = self.bench.backend_pids.values()
        if not wanted or not self.placement.pinned:
            yield
            return
        for pid in pids:
            pin_running(pid, self.placement.generator)
        try:
            yield
        finally:
            for pid in pids:
                pin_running(pid, self.placement.generator | self.placement.servers)

    def restart_api(self) -> None:
        restart_api(self.bench, self.placement)
        print("  restarted the API: the next figures are a fresh process's", flush=True)

    def streams_figure(self) -> dict[str, Any]:
        config, seeds = self.config, self.seeds
        workflow_id, run_id = seeds.stream
        argv = [
            sys.executable, "-m", "scripts.bench_streams", "--port", str(self.bench.api_port),
            "--workflow-id", workflow_id, "--run-id", run_id, "--token", seeds.token,
            "--server-pid", str(self.bench.api_pid), "--streams", str(config.streams),
            "--posts", str(config.stream_posts), "--interval", str(config.stream_interval),
            "--settle", "0.5" if config.smoke else "2",
        ]  # fmt: skip
        timeout = 300 + config.streams * 0.2 + config.stream_posts * config.stream_interval
        recorder = None
        if self.profile_dir is not None:
            output = self.profile_dir / "streams.txt"
            recorder = bench_profile.record(self.bench.api_pid, None, output, self.placement.generator)
        try:
            result: dict[str, Any] = json.loads(run_pinned(argv, self.placement.generator, timeout, env=child_env({})))
        finally:
            if recorder is not None:
                bench_profile.stop(recorder)
        result["targets"] = {"latency_p99_ms": TARGET_P99_MS, "kb_per_stream": TARGET_KB_PER_STREAM}
        result["meets_targets"] = {
            "latency_p99": result["latency_p99_ms"] < TARGET_P99_MS,
            "kb_per_stream": result["kb_per_stream"] < TARGET_KB_PER_STREAM,
        }
        print(
            f"  streams: {result['opened']}/{result['streams']} open, {result['deliveries']}/"
            f"{result['expected_deliveries']} deliveries, p50 {result['latency_p50_ms']} ms, "
            f"p99 {result['latency_p99_ms']} ms, {result['kb_per_stream']} KB/stream",
            flush=True,
        )
        if result["opened"] < config.streams or result["deliveries"] < result["expected_deliveries"]:
            print(f"bench: WARNING streams incomplete: {result}", file=sys.stderr, flush=True)
        return result

    def running_runs(self, count: int) -> list[tuple[str, str]]:
        """`count` running runs (started once, kept for the figures that need them): the sample
        worker is stopped by now, so they stay running, which is all a stream needs."""
        if len(self._running) >= count:
            return self._running[:count]
        from temporalio.client import Client

        from workloads.starter import start_workflow

        async def start_all(missing: int) -> list[tuple[str, str]]:
            client = await Client.connect(self.bench.temporal_address)
            gate = asyncio.Semaphore(32)

            async def start(index: int) -> tuple[str, str]:
                async with gate:
                    return await start_workflow(client, "AgentConversation", project=PROJECT, user=USER,
                                                task_queue=TASK_QUEUE)  # fmt: skip

            return list(await asyncio.gather(*(start(i) for i in range(missing))))

        started = time.monotonic()
        self._running += asyncio.run(start_all(count - len(self._running)))
        print(f"  started {count} running runs in {time.monotonic() - started:.1f} s", flush=True)
        return self._running[:count]

    def many_streams_figure(self, shape: str) -> dict[str, Any]:
        """`scripts.bench_many_streams` in `shape` (spread or fanout), with its targets."""
        config = self.config
        runs = self.running_runs(config.many_runs if shape == "spread" else 1)
        runs_file = self.bench.data_dir / f"runs-{shape}.json"
        runs_file.write_text(json.dumps(runs), encoding="utf-8")
        argv = [
            sys.executable, "-m", "scripts.bench_many_streams", "--shape", shape,
            "--port", str(self.bench.api_port), "--token", self.seeds.token,
            "--server-pid", str(self.bench.api_pid), "--runs-file", str(runs_file),
            "--streams-per-run", str(config.many_per_run), "--streams", str(config.fanout_streams),
            "--rate", str(config.many_rate), "--rates", config.fanout_rates,
            "--seconds", str(config.many_seconds), "--clients", str(config.many_clients),
            "--settle", "0.5" if config.smoke else "2", "--max-p99-ms", str(TARGET_MANY_P99_MS),
        ]  # fmt: skip
        argv += [f"--cpu-pid={name}={pid}" for name, pid in self.bench.backend_pids.items()]
        recorder = None
        if self.profile_dir is not None:
            output = self.profile_dir / f"{shape}.txt"
            recorder = bench_profile.record(self.bench.api_pid, None, output, self.placement.generator)
        try:
            result: dict[str, Any] = json.loads(run_pinned(argv, self.placement.generator, 1800, env=child_env({})))
        finally:
            if recorder is not None:
                bench_profile.stop(recorder)
        if shape == "spread":
            phase = result["phases"][0] if result["phases"] else {}
            result["targets"] = {"latency_p99_ms": TARGET_MANY_P99_MS, "kb_per_stream": TARGET_MANY_KB_PER_STREAM}
            result["meets_targets"] = {
                "latency_p99": bool(phase.get("within_bound")),
                "kb_per_stream": result["kb_per_stream"] < TARGET_MANY_KB_PER_STREAM,
            }
            print(
                f"  streams10k: {result['opened']}/{result['streams']} open over {result['runs']} runs, "
                f"{phase.get('deliveries')}/{phase.get('expected_deliveries')} deliveries, p50 "
                f"{phase.get('latency_p50_ms')} ms, p99 {phase.get('latency_p99_ms')} ms, "
                f"{result['kb_per_stream']} KB/stream",
                flush=True,
            )
        else:
            result["targets"] = {"deliveries_per_s": TARGET_FANOUT_DELIVERIES, "latency_p99_ms": TARGET_MANY_P99_MS}
            result["meets_targets"] = {
                "deliveries_per_s": result["sustained_deliveries_per_s"] >= TARGET_FANOUT_DELIVERIES
            }
            print(
                f"  fanout: {result['opened']}/{result['streams']} open on one run, sustained "
                f"{result['sustained_deliveries_per_s']} deliveries/s with p99 < {TARGET_MANY_P99_MS:g} ms, "
                f"{result['kb_per_stream']} KB/stream",
                flush=True,
            )
        if result["opened"] < result["streams"]:
            print(f"bench: WARNING {shape}: {result['opened']}/{result['streams']} streams opened: "
                  f"{result['open_failure_sample']}", file=sys.stderr, flush=True)  # fmt: skip
        return result

    @staticmethod
    def progress(figure: Figure, round_index: int) -> None:
        server = figure.server[-1].rps if figure.server else 0.0
        baseline = figure.baseline[-1].rps if figure.baseline else 0.0
        print(f"  round {round_index + 1}: {figure.label:<28} server {server:>8.1f}/s  baseline {baseline:>8.1f}/s",
              flush=True)  # fmt: skip


# -- report -----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {}
    for package in ("connexion", "starlette", "uvicorn", "uvloop", "httptools", "temporalio", "redis", "orjson"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def meta(config: Config, placement: Placement, bench: Stack) -> dict[str, object]:
    wrk_version = ""
    if config.generator == "wrk" and (wrk := wrk_path()):
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        wrk_version = (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else ""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server_env": bench.server_env,
        "commit": commit.stdout.strip(),
        "smoke": config.smoke,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "placement": placement.describe(),
        "generator": config.generator,
        "generator_version": wrk_version,
        "connections": config.connections,
        "threads": 1,
        "duration_s": config.duration,
        "warmup_s": config.warmup,
        "rounds": config.rounds,
        "server": "python -m cli.main serve (uvicorn, 1 worker), VALIDATE_RESPONSES=0, request validation on",
        "redis_appendfsync": Settings.redis_appendfsync,
        "versions": versions(),
        "data_dir": str(bench.data_dir),
    }


def table(report: dict[str, Any]) -> str:
    m = report["meta"]
    where = (
        f"generator on core {m['placement']['generator_cores']}, servers on {m['placement']['server_cores']}"
        if m["placement"]["pinned"]
        else "unpinned (one core)"
    )
    lines = [
        f"Workflow Runs API benchmark ({m['generator']}, 1 thread, {m['connections']} connections, "
        f"{m['duration_s']:g} s x {m['rounds']} rounds, medians; {where})",
        "",
    ]

    def verdict(figure: dict[str, Any]) -> str:
        if figure["target_ratio"] is None:
            return "(info)"
        return f">= {figure['target_ratio']:.2f} {'ok' if figure['meets_target'] else 'MISS'}"

    def cpu(figure: dict[str, Any], side: str, name: str) -> str:
        value = figure[f"{side}_cpu_us_per_request"].get(name)
        return "-" if value is None else f"{value:.0f}"

    def failed(figure: dict[str, Any]) -> str:
        return f"({figure['failed_requests']} failed)" if figure["failed_requests"] else ""

    def section(title: str, baseline: str, backend: str, figures: dict[str, dict[str, Any]]) -> None:
        lines.append(
            f"{title:<26}{'server/s':>10}{baseline + '/s':>12}{'ratio':>7}  {'target':<13}"
            f"{'CPU us/req:':>12}{'server':>8}{baseline:>10}{backend:>10}"
        )
        for f in figures.values():
            lines.append(
                f"{f['label']:<26}{f['server_rps']:>10.1f}{f['baseline_rps']:>12.1f}{f['ratio']:>7.2f}  "
                f"{verdict(f):<13}{failed(f):>12}{cpu(f, 'server', 'server'):>8}{cpu(f, 'baseline', 'server'):>10}"
                f"{cpu(f, 'server', backend):>10}"
            )

    if "updates" in report:
        section("updates", "baseline", "redis", report["updates"])
    if "runs" in report:
        lines.append("")
        section("runs", "SDK", "temporal", report["runs"])
    lines += many_streams_lines(report)
    if "streams" not in report:
        return "\n".join(lines)
    s = report["streams"]
    ok = s["meets_targets"]
    lines += [
        "",
        f"streams: {s['opened']}/{s['streams']} open on one API process, {s['posts']} posts every "
        f"{s['post_interval_s']:g} s, {s['deliveries']}/{s['expected_deliveries']} deliveries",
        f"  POST->receive p50 {s['latency_p50_ms']:.1f} ms, p99 {s['latency_p99_ms']:.1f} ms, "
        f"max {s['latency_max_ms']:.1f} ms   "
        f"(target p99 < {TARGET_P99_MS:g} ms: {'ok' if ok['latency_p99'] else 'MISS'})",
        f"  memory {s['kb_per_stream']:.1f} KB per open stream (VmRSS {s['rss_before_kb'] / 1024:.1f} -> "
        f"{s['rss_open_kb'] / 1024:.1f} MB)   (target < {TARGET_KB_PER_STREAM:g} KB: "
        f"{'ok' if ok['kb_per_stream'] else 'MISS'})",
    ]
    return "\n".join(lines)


def many_streams_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "streams10k" in report:
        s = report["streams10k"]
        p = s["phases"][0] if s["phases"] else {}
        ok = s["meets_targets"]
        lines += [
            "",
            f"streams10k: {s['opened']}/{s['streams']} open over {s['runs']} running runs, "
            f"{p.get('posts_per_s', 0):g} posts/s for {p.get('post_seconds', 0):g} s, "
            f"{p.get('deliveries')}/{p.get('expected_deliveries')} deliveries",
            f"  POST->receive p50 {p.get('latency_p50_ms')} ms, p99 {p.get('latency_p99_ms')} ms, max "
            f"{p.get('latency_max_ms')} ms   (target p99 < {TARGET_MANY_P99_MS:g} ms: "
            f"{'ok' if ok['latency_p99'] else 'MISS'}); server CPU {p.get('server_cpu_share')} of a core, "
            f"{p.get('server_cpu_us_per_delivery')} us per delivery",
            f"  memory {s['kb_per_stream']:.1f} KB per open stream (VmRSS {s['rss_before_kb'] / 1024:.1f} -> "
            f"{s['rss_open_kb'] / 1024:.1f} MB)   (target < {TARGET_MANY_KB_PER_STREAM:g} KB: "
            f"{'ok' if ok['kb_per_stream'] else 'MISS'})",
        ]
    if "fanout" in report:
        s = report["fanout"]
        ok = s["meets_targets"]
        lines += [
            "",
            f"fanout: {s['opened']}/{s['streams']} streams on one run, {s['kb_per_stream']:.1f} KB per stream; "
            f"sustained {s['sustained_deliveries_per_s']:.0f} deliveries/s with p99 < {TARGET_MANY_P99_MS:g} ms "
            f"(target >= {TARGET_FANOUT_DELIVERIES:.0f}: {'ok' if ok['deliveries_per_s'] else 'MISS'})",
        ]
        for p in s["phases"]:
            lines.append(
                f"  {p['posts_per_s']:>5g} posts/s: {p['deliveries_per_s']:>9.0f} deliveries/s "
                f"({p['deliveries']}/{p['expected_deliveries']}), p50 {p['latency_p50_ms']} ms, p99 "
                f"{p['latency_p99_ms']} ms, server CPU {p['server_cpu_share']} ({p['server_cpu_us_per_delivery']} "
                f"us/delivery), clients CPU {p['clients_cpu_share']}"
            )
    return lines


def profile_summary(report: dict[str, Any]) -> str:
    lines = []
    for section in ("updates", "runs"):
        for figure in report.get(section, {}).values():
            for key, side in (("profile", "server"), ("baseline_profile", "baseline")):
                if figure.get(key):
                    lines += profile_lines(f"{figure['label']}, {side}", figure[key])
    for group in ("streams", "streams10k", "fanout"):
        profile = report.get(group, {}).get("profile")
        if profile:
            lines += profile_lines(f"{group}, opening and posting", profile)
    return "\n".join(lines)


def profile_lines(label: str, profile: dict[str, Any]) -> list[str]:
    lines = [f"\nprofile: {label} ({profile['samples']} busy samples)", "  by component:"]
    lines += [f"    {pct:>5.1f}%  {name}" for name, pct in profile["components_pct"][:10]]
    lines.append("  top own time:")
    lines += [f"    {pct:>5.1f}%  {name}" for name, pct in profile["own_pct"][:10]]
    return lines


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny durations and counts (keeps the benchmark working)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 6; smoke 1)")
    parser.add_argument("--rounds", type=int, help="alternating server/baseline rounds (default 5; smoke 1)")
    parser.add_argument("--streams", type=int, help="concurrent SSE streams (default 1000; smoke 20)")
    parser.add_argument("--stream-posts", type=int, help="updates posted while streams are open (default 100)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections (default 32)")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the server in the first round")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (logs) afterwards")
    parser.add_argument("--many-runs", type=int, help="streams10k: running runs (default 1000; smoke 5)")
    parser.add_argument("--fanout-streams", type=int, help="fanout: streams on one run (default 5000; smoke 20)")
    parser.add_argument(
        "--fanout-rates",
        help="fanout: posts/s, phase by phase (default 2,4,5,6,8,12,16: 5 is the target itself with 5,000 streams)",
    )
    parser.add_argument("--many-seconds", type=float, default=10.0, help="streams10k/fanout: seconds per phase")
    parser.add_argument("--many-clients", type=int, default=2, help="streams10k/fanout: client processes")
    parser.add_argument("--only", default=",".join(GROUPS), help="figure groups to measure (comma-separated)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the API server, for experiments (e.g. SSE_HEARTBEAT_SECONDS=60)",
    )
    return parser.parse_args(argv)


def measure(runner: Runner, groups: set[str], profile_dir: Path | None) -> dict[str, Any]:
    """The groups of figures asked for, as JSON-ready dicts (with their profiles, if recorded).

    Run details and listings first, on the store as seeded: the 10,000-stream group starts 1,000
    more runs in the benchmark's project, after which a listing's page has a next one and the
    server asks Temporal one run ahead for it (`has_more`), a second query the SDK baseline does
    not make (the README gives both figures). Then the stream groups and the request path, each on
    a fresh API process once another group was measured (`Runner.restart_api`): after 10,000
    streams the heap keeps their freed memory, so a second shape's memory per stream would read
    about 0 KB, and the same fan-out measured 34 µs of CPU per delivery instead of 25. (Minutes
    pass before the request path: the run its POST figure writes to, closed at seeding, takes
    updates for `POST_AFTER_CLOSE_SECONDS`, which `main` raises for the benchmark.)"""
    measured: dict[str, Any] = {}
    first = True

    def request_figures(group: str, figures: Callable[[], list[Figure]], *, backends_beside: bool) -> None:
        measured[group] = {}
        with runner.backends_beside_generator(backends_beside):
            measured_figures = figures()
        for figure in measured_figures:
            if profile_dir is not None:
                for side, raw in (("profile", profile_dir / f"{figure.name}.txt"),
                                  ("baseline_profile", profile_dir / f"{figure.name}.baseline.txt")):  # fmt: skip
                    if raw.exists():
                        setattr(figure, side, bench_profile.summarize(raw))
            measured[group][figure.name] = figure.as_json()

    if "runs" in groups:
        request_figures("runs", runner.runs_figures, backends_beside=False)
        first = False
    for group, shape in (("streams", None), ("streams10k", "spread"), ("fanout", "fanout")):
        if group not in groups:
            continue
        if not first:
            runner.restart_api()
        first = False
        measured[group] = runner.streams_figure() if shape is None else runner.many_streams_figure(shape)
        recorded = profile_dir / f"{shape or group}.txt" if profile_dir else None
        if recorded is not None and recorded.exists():
            measured[group]["profile"] = bench_profile.summarize(recorded)
    if "updates" in groups:
        if not first:
            runner.restart_api()
        request_figures("updates", runner.updates_figures, backends_beside=True)
    return measured


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config.from_args(args)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if not groups <= set(GROUPS):
        raise SystemExit(f"bench: --only takes {', '.join(GROUPS)}; got {args.only!r}")
    server_env = dict(item.split("=", 1) for item in args.server_env)
    # Every stream is opened by one principal: leave headroom above the per-principal cap.
    most = max(config.streams, config.fanout_streams, config.many_runs * config.many_per_run)
    server_env.setdefault("MAX_STREAMS_PER_PRINCIPAL", str(max(1000, most + 64)))
    server_env.setdefault("MAX_STREAMS_PER_PROCESS", str(max(Settings.max_streams_per_process, most + 64)))
    server_env.setdefault("MAX_CONNECTIONS", str(max(Settings.max_connections, most + 2000)))
    # The load generator is one caller (one token) posting thousands of updates a second and asking
    # for run details as fast as the server answers: under the per-caller rate limits it would
    # measure 429s, not the server. Both buckets are off (a rate of 0) unless `--server-env` sets them
    # (e.g. RATE_LIMIT_UPDATES_PER_SECOND=1000000 to measure what the bookkeeping itself costs).
    server_env.setdefault("RATE_LIMIT_TEMPORAL_PER_SECOND", "0")
    server_env.setdefault("RATE_LIMIT_UPDATES_PER_SECOND", "0")
    # The POST figure writes to a run closed at seeding, measured after the stream groups: minutes.
    server_env.setdefault("POST_AFTER_CLOSE_SECONDS", "7200")
    placement = Placement.detect()
    raise_open_files_limit()
    profile_dir: Path | None = args.profile
    if profile_dir is not None:
        if bench_profile.py_spy() is None:
            raise SystemExit("bench: --profile needs py-spy (.venv/bin/pip install py-spy)")
        profile_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    started = time.monotonic()
    print(f"bench: generator {config.generator}, {placement.describe()}, data in {data_dir}", flush=True)
    keep = bool(args.keep)
    try:
        with running_stack(data_dir, placement, server_env) as bench:
            seeds = seed(bench, config)
            stop_worker(bench)
            check_seeds(bench, seeds)
            print(f"bench: stack up and seeded in {time.monotonic() - started:.1f} s", flush=True)
            runner = Runner(bench, seeds, config, placement, profile_dir)
            report: dict[str, Any] = {"meta": meta(config, placement, bench), "seeds": seeds.counts}
            report.update(measure(runner, groups, profile_dir))
    except BaseException:
        keep = True
        print(f"bench: failed; the stack's logs are kept in {data_dir / 'logs'}", file=sys.stderr, flush=True)
        raise
    finally:
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    print()
    print(table(report))
    if profile_dir is not None:
        print(profile_summary(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        print(f"\nbench: figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
