"""py-spy profiles of the project's server under load, summarised by own time (`--profile DIR`).

`record` attaches `py-spy record --format raw` (collapsed stacks) to the server for the length of
one measurement; `summarize` turns a raw file into the functions with the most own time (the leaf
frame of each sample), the most inclusive time, and a split of all samples by component (JWT,
validation, logging, Redis client, Temporal SDK, ...), so the report can say what holds a figure
back. Samples are of the server's busy time only (py-spy leaves idle samples out).
py-spy is a developer tool, not a project dependency: `pip install py-spy` into the venv.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from scripts.bench_proc import preexec

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def record(
    pid: int, seconds: float | None, output: Path, cores: frozenset[int], rate: int = 250
) -> subprocess.Popen[bytes]:
    """Start sampling `pid` into `output` (raw collapsed stacks) for `seconds`, or until `stop`."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    argv = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(output)]
    argv += ["--nonblocking"]  # never pause the server: its figures are being measured
    if seconds is not None:
        argv += ["--duration", str(max(1, round(seconds)))]
    return subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec(cores),  # noqa: PLW1509  # no threads in the benchmark process
    )


def stop(recorder: subprocess.Popen[bytes]) -> None:
    """End an open-ended recording: py-spy writes its output on SIGINT."""
    recorder.send_signal(signal.SIGINT)
    recorder.wait(timeout=60)


# Where a sample's time goes: the deepest frame of the stack that is not a generic helper decides.
# Ordered: the first component whose pattern is in that frame's file wins.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("JWT verification (PyJWT)", ("jwt/",)),
    ("request validation (connexion validators, jsonschema)", ("connexion/validators", "jsonschema")),
    ("parameter parsing (connexion decorators, uri_parsing)", ("connexion/decorators", "connexion/uri_parsing")),
    ("access log (logging, web/logs.py)", ("logging/", "web/logs.py")),
    ("request id (uuid4)", ("uuid.py",)),
    ("Redis client (redis-py)", ("redis/",)),
    ("Temporal SDK (temporalio, protobuf)", ("temporalio/", "protobuf/", "google/")),
    ("response shaping (pydantic)", ("pydantic",)),
    ("run view rendering (backends/run_view.py)", ("backends/run_view.py",)),
    ("JSON encoding (json)", ("json/",)),
    ("connexion (routing, security, middleware)", ("connexion/",)),
    ("starlette", ("starlette/",)),
    ("uvicorn HTTP protocol", ("uvicorn/",)),
    ("project code (core, backends, handlers, web, cli)", ("core/", "backends/", "handlers/", "web/", "cli/")),
)
_GENERIC = (
    "asyncio/", "<frozen", "typing.py", "abc.py", "inspect.py", "functools.py", "contextlib.py", "enum.py",
    "re/", "dataclasses.py", "copy.py", "collections/", "weakref", "contextvars", "anyio/", "<string>",
)  # fmt: skip
EVENT_LOOP = "event loop (uvloop C code: epoll, sockets, callbacks)"


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        if any(generic in frame for generic in _GENERIC):
            continue
        for name, patterns in COMPONENTS:
            if any(pattern in frame for pattern in patterns):
                return name
        return f"other: {frame}"
    return EVENT_LOOP


_REPOSITORY = str(Path(__file__).resolve().parents[1]) + "/"


def _short(frame: str) -> str:
    """`handle (site-packages/connexion/foo.py:12)` → `handle (connexion/foo.py)`."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", _REPOSITORY):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summarize(raw: Path, top: int = 15) -> dict[str, object]:
    """Own and inclusive sample shares (percent of all samples) of the busiest functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match["count"])
        frames = [_short(f) for f in match["stack"].split(";") if f.strip()]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        components[component(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: Counter[str]) -> list[list[object]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "components_pct": shares(components),
        "own_pct": shares(own),
        "inclusive_pct": shares(inclusive),
    }
