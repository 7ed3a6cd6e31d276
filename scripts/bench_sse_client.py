"""One client process of the many-streams benchmark: opens SSE streams and stamps what they receive.

Thousands of streams read from Python cost the client more than the server unless the client does
almost nothing per read: each stream is a bare `asyncio.Protocol` (uvloop when installed) that
checks the response head once, then, for every read, takes the clock once and finds the benchmark's
stamp in the bytes with one compiled regex (no SSE parsing, no chunk decoding: a stamp never
straddles a frame, and a read that ends inside a frame keeps its tail for the next one).

The posts carry `details: {"bench_sent_ns": <time.time_ns() at send>, "phase": <n>}`; a delivery's
latency is receipt time minus send time, in microseconds, kept per phase as a histogram of
100 µs buckets (cheap to merge across client processes).

Driven by its parent over stdin/stdout, one JSON object per line:

    stdin  {"host": ..., "port": ..., "token": ..., "paths": [...], "open_concurrency": n}
    stdout {"opened": n, "failed": f, "failure_sample": [...]}          once every stream is open
    stdin  "report"  ->  stdout {"phases": {phase: {bucket: count}}, "deliveries": n, "cpu_s": s,
                                 "closed": n}
    stdin  "stop"    ->  the same, then the streams are closed and the process exits

    echo '{"host": "127.0.0.1", "port": 8000, "token": "...", "paths": [...]}' | python -m scripts.bench_sse_client
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import resource
import sys
import time
from collections import Counter
from typing import Any, cast

STAMP = re.compile(rb'"bench_sent_ns":(\d+),"phase":(\d+)')
BUCKET_US = 100


class Tally:
    """Every delivery's latency, per phase, in `BUCKET_US` buckets."""

    def __init__(self) -> None:
        self.phases: dict[int, Counter[int]] = {}
        self.deliveries = 0
        self.closed = 0

    def record(self, data: bytes, received_ns: int) -> None:
        for match in STAMP.finditer(data):
            phase = int(match[2])
            bucket = (received_ns - int(match[1])) // (BUCKET_US * 1000)
            counter = self.phases.get(phase)
            if counter is None:
                counter = self.phases[phase] = Counter()
            counter[bucket] += 1
            self.deliveries += 1

    def as_json(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "phases": {str(p): {str(b): n for b, n in c.items()} for p, c in self.phases.items()},
            "deliveries": self.deliveries,
            "closed": self.closed,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        }


class StreamProtocol(asyncio.Protocol):
    """One SSE stream: the GET, the head checked once, then stamps found in every read."""

    __slots__ = ("head", "opened", "request", "tail", "tally", "transport")

    def __init__(self, request: bytes, tally: Tally, opened: asyncio.Future[None]) -> None:
        self.request = request
        self.tally = tally
        self.opened: asyncio.Future[None] | None = opened
        self.head = b""
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        received = time.time_ns()
        if self.opened is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            opened, self.opened = self.opened, None
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                opened.set_exception(RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace")))
                return
            opened.set_result(None)
        data = self.tail + data if self.tail else data
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.tail = data
            return
        self.tail = data[cut + 2 :]
        self.tally.record(data[:cut], received)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the response head"))
        self.tally.closed += 1


async def open_all(config: dict[str, Any], tally: Tally) -> tuple[list[asyncio.Transport], list[str]]:
    loop = asyncio.get_running_loop()
    host, port, token = config["host"], int(config["port"]), config["token"]
    gate = asyncio.Semaphore(int(config.get("open_concurrency", 64)))
    transports: list[asyncio.Transport] = []
    failures: list[str] = []

    async def open_one(path: str) -> None:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        async with gate:
            opened: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(lambda: StreamProtocol(request, tally, opened), host, port)
                await asyncio.wait_for(opened, 60)
            except (OSError, RuntimeError, ConnectionError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
        transports.append(transport)

    await asyncio.gather(*(open_one(path) for path in config["paths"]))
    return transports, failures


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main_async(config: dict[str, Any]) -> None:
    tally = Tally()
    transports, failures = await open_all(config, tally)
    # This process's own collections would stamp receipts late; only the server's pauses count.
    gc.collect()
    gc.freeze()
    gc.disable()
    emit({"opened": len(transports), "failed": len(failures), "failure_sample": failures[:3]})
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    while line := (await commands.readline()).strip():
        emit(tally.as_json())
        if line == b"stop":
            break
    for transport in transports:
        transport.abort()


def main() -> None:
    # The paths come on stdin: ten thousand of them are more than one argument may hold.
    config = json.loads(sys.stdin.readline())
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(config))
    else:
        uvloop.run(main_async(config))


if __name__ == "__main__":
    main()
