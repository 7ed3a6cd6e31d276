"""What the tests know of `workflow-runs serve --workers N` from outside: uvicorn's process manager
(the parent) binds the port before its workers have started, so a bound port is not yet a server;
each worker logs uvicorn's start-up line once it serves, and the workers are the parent's spawned
children, read from /proc."""

from __future__ import annotations

from pathlib import Path

STARTED = b'"msg":"Application startup complete."'  # uvicorn's line, once per worker


def log_size(path: Path) -> int:
    """Where a log opened for appending will write next: start-up lines before it are an earlier
    process's."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def started(log_path: Path, offset: int = 0) -> int:
    """How many workers logged their start-up past `offset` (replacements included)."""
    with log_path.open("rb") as log:
        log.seek(offset)
        return log.read().count(STARTED)


def worker_pids(parent: int) -> list[int]:
    """The pids of `parent`'s live worker processes (its resource tracker is not one)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if is_worker(int(pid))]


def is_worker(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) spawned worker."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone
        return False
    return state != "Z" and b"--multiprocessing-fork" in cmdline
