"""Thousands of SSE streams on one API process: POST→receive latency, memory and deliveries per second.

Two shapes (`--shape`):

  spread  `--streams-per-run` streams on each of the runs in `--runs-file` (10 x 1000 = 10,000),
          `--rate` posts a second spread round-robin over those runs for `--seconds`: p50/p99 of
          every delivery, and the server's VmRSS growth per open stream.
  fanout  `--streams` streams on the first run of `--runs-file`, posts at each rate of `--rates`
          in turn (`--seconds` each) until a phase misses `--max-p99-ms` or loses deliveries: the
          deliveries per second the process sustained (posts/s x streams) within the bound.

Streams are opened by `--clients` processes of `scripts.bench_sse_client` (raw asyncio protocols;
see there for why), posts by raw keep-alive HTTP/1.1 connections from this process. Each update
carries its send time (`time.time_ns()` just before the request is written) and its phase; clients
stamp receipts on the same clock. The CPU seconds of the server (and of Redis, Temporal and the
clients) are read from /proc around every phase: the server's CPU per delivery is the cost the
optimisations aim at, and the clients' share of their core says whether a figure is client-bound.
Prints one JSON object.

    python -m scripts.bench_many_streams --shape fanout --port 8000 --token T --server-pid P \
        --runs-file runs.json --streams 10000 --rates 1,2,5,10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from scripts.bench_proc import cpu_seconds, raise_open_files_limit, rss_kb
from scripts.bench_sse_client import BUCKET_US

SENT = "bench_sent_ns"


# -- posting ----------------------------------------------------------------------------------------


class Poster:
    """Posts updates over `connections` keep-alive HTTP/1.1 connections, one request at a time each."""

    def __init__(self, host: str, port: int, token: str, connections: int) -> None:
        self.host, self.port, self.token = host, port, token
        self.size = connections
        # Last in, first out: at a low rate the same few connections are reused and stay open,
        # rather than each idling past the server's keep-alive timeout before its next turn.
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.LifoQueue()
        self.ok = 0
        self.failed = 0
        self.statuses: dict[int, int] = {}

    async def start(self) -> None:
        for _ in range(self.size):
            self.free.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def post(self, run_id: str, phase: int) -> None:
        """One post; a connection the server closed while idle (its keep-alive timeout passes while
        thousands of streams open) is replaced and the post sent again on the new one, once."""
        connection = await self.free.get()
        for attempt in range(2):
            reader, writer = connection
            try:
                status = await self._exchange(reader, writer, run_id, phase)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                writer.close()
                connection = await asyncio.open_connection(self.host, self.port)
                if attempt:
                    self.failed += 1
                    self.free.put_nowait(connection)
                continue
            self.free.put_nowait(connection)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.ok += 1
            else:
                self.failed += 1
            return

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, run_id: str, phase: int
    ) -> int:
        body = b'{"type":"BENCH","message":"bench","details":{"%s":%d,"phase":%d}}' % (
            SENT.encode(),
            time.time_ns(),
            phase,
        )
        writer.write(
            b"POST /api/v1/workflows/runs/%s/updates HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (run_id.encode(), self.host.encode(), self.port, self.token.encode(), len(body), body)
        )
        status = int((await reader.readline()).split(b" ", 2)[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return status

    async def refresh(self) -> None:
        """New connections: the old ones sat idle past the server's keep-alive timeout while the
        streams opened, and a post on a closed one would be lost."""
        await self.close()
        await self.start()

    async def at_rate(self, run_ids: list[str], rate: float, seconds: float, phase: int) -> tuple[int, float]:
        """Post `rate` a second for `seconds`, round-robin over `run_ids`; (posts made, seconds taken)."""
        count = max(1, round(rate * seconds))
        runs = itertools.cycle(run_ids)
        tasks = []
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.post(next(runs), phase)))
        await asyncio.gather(*tasks)
        return count, time.perf_counter() - start

    async def close(self) -> None:
        while not self.free.empty():
            _, writer = self.free.get_nowait()
            writer.close()


# -- clients ----------------------------------------------------------------------------------------


@dataclass
class Client:
    proc: asyncio.subprocess.Process
    streams: int
    opened: int = 0
    failed: int = 0
    failure_sample: list[str] = field(default_factory=list)

    async def command(self, word: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(word.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a stream client exited early")
        reply: dict[str, Any] = json.loads(line)
        return reply


async def start_clients(
    host: str, port: int, token: str, paths: list[str], *, count: int, concurrency: int
) -> list[Client]:
    """`count` client processes sharing `paths`; returns once every one has opened its streams."""
    clients = []
    for index in range(count):
        share = paths[index::count]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scripts.bench_sse_client",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**24,
        )  # fmt: skip
        assert proc.stdin is not None
        config = {"host": host, "port": port, "token": token, "paths": share, "open_concurrency": concurrency}
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        await proc.stdin.drain()
        clients.append(Client(proc, len(share)))

    async def opened(client: Client) -> None:
        assert client.proc.stdout is not None
        line = await client.proc.stdout.readline()
        if not line:
            raise RuntimeError("a stream client exited before opening its streams")
        reply = json.loads(line)
        client.opened, client.failed, client.failure_sample = reply["opened"], reply["failed"], reply["failure_sample"]

    await asyncio.gather(*(opened(c) for c in clients))
    return clients


async def stop_clients(clients: list[Client]) -> None:
    for client in clients:
        if client.proc.returncode is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError, ConnectionResetError):
                await client.command("stop")
            await client.proc.wait()


def merge(reports: list[dict[str, Any]], phase: int) -> dict[int, int]:
    merged: dict[int, int] = {}
    for report in reports:
        for bucket, count in report["phases"].get(str(phase), {}).items():
            merged[int(bucket)] = merged.get(int(bucket), 0) + count
    return merged


def quantile_ms(histogram: dict[int, int], q: float) -> float:
    """The `q` quantile of a bucket histogram, as the upper edge of its bucket, in ms."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round((bucket + 1) * BUCKET_US / 1000, 1)
    return round((max(histogram) + 1) * BUCKET_US / 1000, 1)


# -- the measurement --------------------------------------------------------------------------------


class ManyStreams:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs = [(str(r[0]), str(r[1])) for r in json.loads(Path(args.runs_file).read_text(encoding="utf-8"))]
        self.cpu_pids = {"server": args.server_pid, **dict(self.named_pids(args.cpu_pid))}

    @staticmethod
    def named_pids(items: list[str]) -> list[tuple[str, int]]:
        return [(name, int(pid)) for name, _, pid in (item.partition("=") for item in items)]

    def path(self, run: tuple[str, str]) -> str:
        return f"/api/v1/workflows/runs/{run[0]}/{run[1]}/stream?skipHistory=true"

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.cpu_pids.items()}

    async def deliveries(self, clients: list[Client], phase: int, expected: int, wait_s: float) -> list[dict[str, Any]]:
        """Ask the clients until `expected` deliveries of `phase` arrived (or `wait_s` seconds passed)."""
        deadline = time.monotonic() + wait_s
        while True:
            reports = [await c.command("report") for c in clients]
            got = sum(merge(reports, phase).values())
            if got >= expected or time.monotonic() > deadline:
                return reports
            await asyncio.sleep(0.25)

    async def phase(
        self, clients: list[Client], poster: Poster, phase: int, run_ids: list[str], *, rate: float, per_post: int
    ) -> dict[str, Any]:
        args = self.args
        before_cpu = self.cpu()
        client_cpu = sum(r["cpu_s"] for r in [await c.command("report") for c in clients])
        await poster.refresh()
        posts_ok_before, posts_failed_before = poster.ok, poster.failed
        posts, took = await poster.at_rate(run_ids, rate, args.seconds, phase)
        seconds = max(took, posts / rate)  # the posting window, even when the last post returned early
        during_cpu = self.cpu()
        posted = poster.ok - posts_ok_before
        failed = poster.failed - posts_failed_before
        expected = posted * per_post
        reports = await self.deliveries(clients, phase, expected, args.drain_timeout)
        after_cpu = self.cpu()
        histogram = merge(reports, phase)
        delivered = sum(histogram.values())
        server_cpu = after_cpu["server"] - before_cpu["server"]
        clients_cpu = sum(r["cpu_s"] for r in reports) - client_cpu
        p99 = quantile_ms(histogram, 0.99)
        return {
            "phase": phase,
            "posts_per_s": rate,
            "posts": posts,
            "posts_ok": posted,
            "posts_failed": failed,
            "post_seconds": round(seconds, 2),
            "expected_deliveries": expected,
            "deliveries": delivered,
            "deliveries_per_s": round(delivered / seconds, 1),
            "latency_p50_ms": quantile_ms(histogram, 0.50),
            "latency_p99_ms": p99,
            "latency_max_ms": quantile_ms(histogram, 1.0),
            # A failed post counts against the phase: its deliveries are not in `expected`.
            "within_bound": p99 < args.max_p99_ms and delivered >= expected and not failed,
            # Busy share of one core while posting (the server is single-threaded for this work).
            "server_cpu_share": round((during_cpu["server"] - before_cpu["server"]) / seconds, 3),
            "server_cpu_us_per_delivery": round(server_cpu * 1e6 / delivered, 2) if delivered else None,
            "clients_cpu_share": round(clients_cpu / seconds, 3),
            "backend_cpu_share": {
                name: round((during_cpu[name] - before_cpu[name]) / seconds, 3)
                for name in self.cpu_pids
                if name != "server"
            },
            "closed_streams": sum(r["closed"] for r in reports),
        }

    async def warm_up(self, poster: Poster) -> None:
        """A few streams and one post first: first-use imports and caches are not per-stream memory."""
        run = self.runs[0]
        clients = await start_clients(
            self.args.host, self.args.port, self.args.token, [self.path(run)] * 20, count=1, concurrency=20
        )
        await asyncio.sleep(0.3)
        await poster.post(run[1], 9999)
        await self.deliveries(clients, 9999, clients[0].opened, 10)
        await stop_clients(clients)
        await asyncio.sleep(self.args.settle)

    async def run(self) -> dict[str, Any]:
        args = self.args
        if args.shape == "spread":
            runs = self.runs
            per_run = args.streams_per_run
        else:
            runs = self.runs[:1]
            per_run = args.streams
        paths = [self.path(run) for run in runs for _ in range(per_run)]
        poster = Poster(args.host, args.port, args.token, args.post_connections)
        await poster.start()
        await self.warm_up(poster)
        rss_before = rss_kb(args.server_pid)
        cpu_before_open = self.cpu()["server"]
        opening = time.perf_counter()
        clients = await start_clients(
            args.host, args.port, args.token, paths, count=args.clients, concurrency=args.open_concurrency
        )
        open_seconds = time.perf_counter() - opening
        open_cpu = self.cpu()["server"] - cpu_before_open
        await asyncio.sleep(args.settle)
        rss_open = rss_kb(args.server_pid)
        opened = sum(c.opened for c in clients)
        result: dict[str, Any] = {
            "shape": args.shape,
            "streams": len(paths),
            "runs": len(runs),
            "streams_per_run": per_run,
            "clients": args.clients,
            "opened": opened,
            "open_failures": sum(c.failed for c in clients),
            "open_failure_sample": [s for c in clients for s in c.failure_sample][:3],
            "open_seconds": round(open_seconds, 1),
            "server_cpu_ms_per_open": round(open_cpu * 1000 / opened, 2) if opened else None,
            "rss_before_kb": rss_before,
            "rss_open_kb": rss_open,
            "kb_per_stream": round((rss_open - rss_before) / opened, 2) if opened else 0.0,
            "phases": [],
        }
        try:
            run_ids = [run[1] for run in runs]
            if args.shape == "spread":
                result["phases"].append(await self.phase(clients, poster, 0, run_ids, rate=args.rate, per_post=per_run))
            else:
                for index, rate in enumerate(float(r) for r in args.rates.split(",")):
                    measured = await self.phase(clients, poster, index, run_ids, rate=rate, per_post=opened)
                    result["phases"].append(measured)
                    print(f"  fanout {rate:g} posts/s: {json.dumps(measured)}", file=sys.stderr, flush=True)
                    if not measured["within_bound"]:
                        break
                    await asyncio.sleep(args.settle)
        finally:
            await stop_clients(clients)
            await poster.close()
        result["post_statuses"] = {str(k): v for k, v in poster.statuses.items()}
        result["post_failures"] = poster.failed
        passing = [p for p in result["phases"] if p["within_bound"]]
        result["sustained_deliveries_per_s"] = max((p["deliveries_per_s"] for p in passing), default=0.0)
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="thousands of SSE streams on one process (prints JSON)")
    parser.add_argument("--shape", choices=["spread", "fanout"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID", help="also meter this process")
    parser.add_argument("--runs-file", required=True, help="JSON list of [workflow_id, run_id]")
    parser.add_argument("--streams-per-run", type=int, default=10, help="spread: streams on each run")
    parser.add_argument("--streams", type=int, default=10_000, help="fanout: streams on the one run")
    parser.add_argument("--rate", type=float, default=200.0, help="spread: posts per second")
    parser.add_argument("--rates", default="1,2,5,10", help="fanout: posts per second, phase by phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="posting time of each phase")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--post-connections", type=int, default=16)
    parser.add_argument("--open-concurrency", type=int, default=64, help="per client process")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--max-p99-ms", type=float, default=250.0)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    raise_open_files_limit()
    print(orjson.dumps(asyncio.run(ManyStreams(args).run())).decode())


if __name__ == "__main__":
    main()
