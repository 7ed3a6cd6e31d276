"""Process placement for the benchmark: which core runs what, and children started there.

On a machine with two cores or more the load generator gets one core and every server the
benchmark compares (the project's API, the bare baseline, the direct-SDK harness) the others, so
that the generator's work never competes with the server being measured. Children are pinned with
`sched_setaffinity` (what `taskset` does) between fork and exec, get a high open-files limit (a
thousand SSE streams need a thousand sockets) and die with the benchmark (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cli.stack import Child, spawn

WANTED_OPEN_FILES = 65_536


@dataclass(frozen=True)
class Placement:
    """`generator`: the load generator's cores; `servers`: everything measured. Empty: unpinned."""

    generator: frozenset[int]
    servers: frozenset[int]

    @classmethod
    def detect(cls) -> Placement:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls(frozenset(), frozenset())
        return cls(frozenset(cores[:1]), frozenset(cores[1:]))

    @property
    def pinned(self) -> bool:
        return bool(self.generator)

    def describe(self) -> dict[str, list[int] | bool]:
        return {"pinned": self.pinned, "generator_cores": sorted(self.generator), "server_cores": sorted(self.servers)}


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise this process's soft RLIMIT_NOFILE to `wanted` (root may raise the hard limit too),
    else as far as the hard limit allows; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    unlimited = hard == resource.RLIM_INFINITY
    for limits in (
        (wanted, hard if unlimited else max(hard, wanted)),
        (wanted if unlimited else min(wanted, hard), hard),
    ):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def preexec(cores: frozenset[int]) -> Callable[[], None]:
    """What runs in the child between fork and exec: pin, raise the fd limit."""

    def setup() -> None:
        if cores:
            os.sched_setaffinity(0, cores)
        raise_open_files_limit()

    return setup


def pin_running(pid: int, cores: frozenset[int]) -> None:
    """Pin a running process, every thread it has now (threads it starts later inherit), to `cores`."""
    if not cores:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except OSError:
            continue  # a thread that has just ended


def spawn_pinned(
    name: str, argv: Sequence[str], log_dir: Path, cores: frozenset[int], env: dict[str, str] | None = None
) -> Child:
    """`cli.stack.spawn`, pinned to `cores` and with a raised open-files limit."""
    return spawn(name, argv, log_dir, env, setup=preexec(cores))


def run_pinned(argv: Sequence[str], cores: frozenset[int], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a measuring child to completion on `cores`; its stdout (it fails loudly otherwise)."""
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        preexec_fn=preexec(cores),  # see spawn_pinned
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} {' '.join(argv[1:4])}... exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return done.stdout


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time the named processes spend between `start()` and `per_request(n)`, per request."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def per_request(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request, by process name."""
        if requests <= 0:
            return {}
        return {
            name: round((cpu_seconds(pid) - self._start[name]) * 1e6 / requests, 1) for name, pid in self.pids.items()
        }
