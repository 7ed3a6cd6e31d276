"""HTTP load generation for the benchmark: wrk when it is installed, else a raw asyncio HTTP/1.1 loop.

Both keep `connections` keep-alive connections busy for `duration` seconds, one request at a time
each, and report requests per second, latency percentiles and how many answers were not 2xx (a
figure built on errors is worthless, so the benchmark refuses it). The generator runs pinned on its
own core (`scripts.bench_proc`).

    python -m scripts.bench_load --url URL [--method POST --body JSON] [--header 'K: V' ...]
           [--connections 32] [--duration 10]      # the Python generator; prints one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scripts.bench_proc import run_pinned


@dataclass(frozen=True)
class Load:
    """One request, repeated: what every generator is given."""

    url: str
    method: str = "GET"
    body: bytes | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class LoadResult:
    generator: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    # CPU microseconds per request of the processes watched (the server measured, Redis, Temporal).
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def wrk_path() -> str | None:
    return shutil.which("wrk")


# -- wrk ------------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _lua_string(value: str) -> str:
    """A double-quoted Lua string literal (`x[[...]]` would parse as a call, hence no long brackets)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\0", "\\0") + '"'


def wrk_script(load: Load) -> str:
    lines = [f"wrk.method = {_lua_string(load.method)}"]
    if load.body is not None:
        lines.append(f"wrk.body = {_lua_string(load.body.decode())}")
    for name, value in (load.headers or {}).items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    return "\n".join(lines) + "\n"


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk latency: {text!r}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str, seconds: float) -> LoadResult:
    """The figures of `wrk --latency` output."""
    requests = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.MULTILINE)
    if requests is None or rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    percentiles = dict(re.findall(r"^\s*(50|99)%\s+(\S+)$", output, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return LoadResult(
        generator="wrk",
        requests=int(requests[1]),
        seconds=_latency_ms(requests[2] + requests[3]) / 1000 or seconds,
        rps=float(rps[1]),
        p50_ms=_latency_ms(percentiles["50"]) if "50" in percentiles else 0.0,
        p99_ms=_latency_ms(percentiles["99"]) if "99" in percentiles else 0.0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def run_wrk(load: Load, *, connections: int, duration: float, cores: frozenset[int]) -> LoadResult:
    wrk = wrk_path()
    assert wrk is not None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as script:
        script.write(wrk_script(load))
        script.flush()
        argv = [
            wrk, "-t1", f"-c{connections}", f"-d{max(duration, 1.0):g}s", "--latency", "--timeout", "10s",
            "-s", script.name, load.url,
        ]  # fmt: skip
        output = run_pinned(argv, cores, timeout=duration + 60)
    return parse_wrk(output, duration)


# -- the Python generator ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def raw_request(load: Load) -> tuple[str, int, bytes]:
    """(host, port, the request's bytes), built once and written as they are for every request."""
    url = urlsplit(load.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = url.path + (f"?{url.query}" if url.query else "")
    lines = [f"{load.method} {target} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in (load.headers or {}).items()]
    if load.body is not None:
        lines.append(f"Content-Length: {len(load.body)}")
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (load.body or b"")


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked body); its status code."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if chunked:
        while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readline()
    elif length:
        await reader.readexactly(length)
    return status


async def python_load(load: Load, *, connections: int, duration: float) -> LoadResult:
    """`connections` keep-alive HTTP/1.1 connections over raw asyncio streams (uvloop when
    installed: see main), one request in flight on each: an httpx client tops out near 400 req/s on one core,
    far below what the servers answer, so it would measure itself."""
    host, port, request = raw_request(load)
    latencies: list[float] = []
    non_2xx = errors = 0

    async def loop(deadline: float) -> None:
        nonlocal non_2xx, errors
        reader = writer = None
        while (start := time.perf_counter()) < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port, limit=2**20)
                assert reader is not None
                writer.write(request)
                status = await read_response(reader)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            if not 200 <= status < 300:
                non_2xx += 1
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop(started + duration) for _ in range(connections)))
    seconds = time.perf_counter() - started
    latencies.sort()
    count = len(latencies)
    return LoadResult(
        generator="python-asyncio",
        requests=count,
        seconds=round(seconds, 3),
        rps=round(count / seconds, 1),
        p50_ms=round(statistics.median(latencies), 3) if latencies else 0.0,
        p99_ms=round(percentile(latencies, 0.99), 3),
        non_2xx=non_2xx,
        errors=errors,
    )


def run_python(load: Load, *, connections: int, duration: float, cores: frozenset[int]) -> LoadResult:
    """The Python generator in a child process of its own, pinned like wrk would be."""
    import sys

    argv = [
        sys.executable, "-m", "scripts.bench_load", "--url", load.url, "--method", load.method,
        "--connections", str(connections), "--duration", str(duration),
    ]  # fmt: skip
    if load.body is not None:
        argv += ["--body", load.body.decode()]
    for name, value in (load.headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    data = json.loads(run_pinned(argv, cores, timeout=duration + 60, env=_child_env()))
    return LoadResult(**data)


def _child_env() -> dict[str, str]:
    import os

    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def generate(load: Load, *, generator: str, connections: int, duration: float, cores: frozenset[int]) -> LoadResult:
    """`generator`: "wrk" or "python"."""
    if generator == "wrk":
        return run_wrk(load, connections=connections, duration=duration, cores=cores)
    return run_python(load, connections=connections, duration=duration, cores=cores)


def main() -> None:
    parser = argparse.ArgumentParser(description="the benchmark's Python load generator (prints JSON)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    load = Load(args.url, args.method, args.body.encode() if args.body is not None else None, headers)
    run: Callable[[Coroutine[Any, Any, LoadResult]], LoadResult] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # what uvicorn runs the servers on; cheaper per request than asyncio's loop

        run = uvloop.run
    result = run(python_load(load, connections=args.connections, duration=args.duration))
    print(json.dumps(result.as_json()))


if __name__ == "__main__":
    main()
