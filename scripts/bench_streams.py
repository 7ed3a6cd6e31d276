"""N concurrent SSE streams on one API process and one poster: POST→receipt latency and memory.

Opens `streams` streams of one running run (`skipHistory=true`, raw HTTP/1.1 over asyncio
sockets: a thousand httpx streams would cost the client more than the server), reads the server's
VmRSS before the first and after the last one is open, then posts `posts` updates through the API,
one every `interval` seconds. Each update carries its send time (`details.bench_sent_ns`,
`time.time_ns()` taken just before the request is written); every stream records, for every
update it receives, receipt time minus send time. Poster and streams share this process and its
clock. Prints one JSON object.

    python -m scripts.bench_streams --port 8000 --workflow-id W --run-id R --token T --server-pid P
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx
import orjson

from scripts.bench_load import percentile
from scripts.bench_proc import raise_open_files_limit, rss_kb

SENT = "bench_sent_ns"


@dataclass
class Tally:
    latencies_ns: list[int] = field(default_factory=list)
    per_stream: dict[int, int] = field(default_factory=dict)
    slowest_by_post: dict[int, int] = field(default_factory=dict)  # seq -> slowest delivery (ns)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def record(self, stream: int, frame: bytes, received_ns: int) -> None:
        for line in frame.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            details = orjson.loads(line[6:]).get("details")
            if isinstance(details, dict) and isinstance(details.get(SENT), int):
                latency = received_ns - details[SENT]
                self.latencies_ns.append(latency)
                seq = details.get("seq", 0)
                self.slowest_by_post[seq] = max(self.slowest_by_post.get(seq, 0), latency)
                self.per_stream[stream] = self.per_stream.get(stream, 0) + 1
                if self.expected and len(self.latencies_ns) >= self.expected:
                    self.all_in.set()


async def open_stream(
    host: str, port: int, path: str, token: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """Send the GET and read the response head; (reader, writer, chunked). Raises on non-200."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    status = await reader.readline()
    head = b""
    while (line := await reader.readline()) not in (b"\r\n", b""):
        head += line.lower()
    if b" 200 " not in status:
        writer.close()
        raise RuntimeError(f"stream answered {status.decode(errors='replace').strip()}")
    return reader, writer, b"transfer-encoding: chunked" in head


async def consume(stream: int, reader: asyncio.StreamReader, chunked: bool, tally: Tally) -> None:
    """Read SSE frames until the server closes the stream; each frame is stamped on arrival."""
    buffer = b""
    while True:
        if chunked:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65_536)
            if not data:
                return
        received = time.time_ns()
        buffer += data
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            tally.record(stream, frame, received)


class StreamBench:
    """The streams, the poster and the server's memory, for one run of the measurement."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = f"/api/v1/workflows/runs/{args.workflow_id}/{args.run_id}/stream?skipHistory=true"
        base = f"http://{args.host}:{args.port}/api/v1"
        self.http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {args.token}"})
        self.seq = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.Task[None]] = []
        self.failures: list[str] = []

    async def post(self) -> int:
        """Post one update stamped with its send time; the HTTP status."""
        self.seq += 1
        body = {"type": "BENCH", "message": "bench", "details": {SENT: time.time_ns(), "seq": self.seq}}
        response = await self.http.post(f"/workflows/runs/{self.args.run_id}/updates", content=orjson.dumps(body),
                                        headers={"Content-Type": "application/json"})  # fmt: skip
        return response.status_code

    async def open(self, index: int, tally: Tally, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                reader, writer, chunked = await open_stream(self.args.host, self.args.port, self.path, self.args.token)
            except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                return
        self.writers.append(writer)
        self.readers.append(asyncio.create_task(consume(index, reader, chunked, tally)))

    async def close_all(self) -> None:
        for writer in self.writers:
            writer.close()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.writers.clear()
        self.readers.clear()

    async def wait_for(self, tally: Tally) -> None:
        if tally.expected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.args.drain_timeout):
                    await tally.all_in.wait()

    async def warm_up(self) -> None:
        """One stream and one post first: first-use imports and caches are not per-stream memory."""
        warm = Tally(expected=1)
        await self.open(-1, warm, asyncio.Semaphore(1))
        await asyncio.sleep(0.2)
        await self.post()
        await self.wait_for(warm)
        await self.close_all()
        await asyncio.sleep(self.args.settle)

    async def run(self) -> dict[str, object]:
        args = self.args
        await self.warm_up()
        tally = Tally()
        rss_before = rss_kb(args.server_pid)
        gate = asyncio.Semaphore(args.open_concurrency)
        opening = time.perf_counter()
        await asyncio.gather(*(self.open(i, tally, gate) for i in range(args.streams)))
        open_seconds = time.perf_counter() - opening
        await asyncio.sleep(args.settle)  # let the server finish the handlers' first steps
        rss_open = rss_kb(args.server_pid)
        opened = len(self.writers)

        tally.expected = opened * args.posts
        # This process's own garbage collections would stamp receipts late: a full collection over
        # a thousand streams' objects takes tens of milliseconds. Only the server's pauses count.
        gc.collect()
        gc.freeze()
        gc.disable()
        post_errors = 0
        for _ in range(args.posts):
            tick = time.perf_counter()
            if await self.post() != 200:
                post_errors += 1
            await asyncio.sleep(max(0.0, args.interval - (time.perf_counter() - tick)))
        await self.wait_for(tally)
        gc.enable()
        gc.unfreeze()
        rss_posts = rss_kb(args.server_pid)
        await self.close_all()
        await self.http.aclose()

        latencies_ms = sorted(ns / 1e6 for ns in tally.latencies_ns)
        return {
            "streams": args.streams,
            "opened": opened,
            "open_failures": len(self.failures),
            "open_failure_sample": self.failures[:3],
            "open_seconds": round(open_seconds, 3),
            "posts": args.posts,
            "post_interval_s": args.interval,
            "post_errors": post_errors,
            "expected_deliveries": tally.expected,
            "deliveries": len(latencies_ms),
            "latency_p50_ms": round(statistics.median(latencies_ms), 3) if latencies_ms else 0.0,
            "latency_p99_ms": round(percentile(latencies_ms, 0.99), 3),
            "latency_max_ms": round(latencies_ms[-1], 3) if latencies_ms else 0.0,
            # Per post, in posting order: its slowest delivery. Spikes that come back at a fixed
            # period point at periodic server work (e.g. every stream polling the run's status).
            "slowest_delivery_by_post_ms": [
                round(tally.slowest_by_post[k] / 1e6, 1) for k in sorted(tally.slowest_by_post)
            ],
            "rss_before_kb": rss_before,
            "rss_open_kb": rss_open,
            "rss_after_posts_kb": rss_posts,
            "kb_per_stream": round((rss_open - rss_before) / opened, 2) if opened else 0.0,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description="N SSE streams + one poster (prints JSON)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workflow-id", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--posts", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--open-concurrency", type=int, default=32)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args()
    raise_open_files_limit()
    print(json.dumps(asyncio.run(StreamBench(args).run())))


if __name__ == "__main__":
    main()
