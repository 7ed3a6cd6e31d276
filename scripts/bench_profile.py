"""py-spy profiles of the project's server under load, summarised by own time (`--profile DIR`).

`record` attaches `py-spy record --format raw` (collapsed stacks) to the server for the length of
one measurement; `summarize` turns a raw file into the functions with the most own time (the leaf
frame of each sample) and the most inclusive time, so the report can say what holds a figure back.
py-spy is a developer tool, not a project dependency: `pip install py-spy` into the venv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from scripts.bench_proc import preexec

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def record(pid: int, seconds: float, output: Path, cores: frozenset[int], rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into `output` (raw collapsed stacks); wait on the result."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    argv = [
        binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
        "--format", "raw", "--output", str(output), "--nonblocking",
    ]  # fmt: skip
    return subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec(cores),  # noqa: PLW1509  # no threads in the benchmark process
    )


def _short(frame: str) -> str:
    """`handle (site-packages/connexion/foo.py:12)` → `handle (connexion/foo.py)`."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summarize(raw: Path, top: int = 15) -> dict[str, object]:
    """Own and inclusive sample shares (percent of all samples) of the busiest functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
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
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: Counter[str]) -> list[list[object]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "own_pct": shares(own), "inclusive_pct": shares(inclusive)}
