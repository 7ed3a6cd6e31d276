"""Raw-socket and process-memory tools for the hostile tests: what a hostile client does that an HTTP
library will not (an endless request head, connections that never send a request), and a sampler of
the API process's resident memory while it is under such load."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

MIB = 1 << 20


def vm_rss(pid: int) -> int:
    """Resident set size of `pid` in bytes (`VmRSS` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class RssSampler:
    """Samples a process's RSS in a thread while the `with` block runs; `peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.before = vm_rss(pid)
        self.peak = self.before
        self.after = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        # Sampling at an interval is the measurement itself, not a wait for some other event.
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, vm_rss(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self.after = vm_rss(self.pid)
        self.peak = max(self.peak, self.after)

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def report(self, what: str) -> str:
        return (
            f"{what}: API RSS before {self.before / MIB:.1f} MiB, peak {self.peak / MIB:.1f} MiB, "
            f"after {self.after / MIB:.1f} MiB, growth {self.growth / MIB:.1f} MiB"
        )


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it); return the
    new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class HeadOutcome:
    """What became of one oversized request head."""

    sent: int = 0  # bytes of the head the kernel accepted from us
    status_line: bytes = b""  # the server's status line, when it answered
    closed: bool = False  # the server closed (EOF) or reset the connection
    stalled: bool = False  # the server neither read nor answered for the socket timeout

    @property
    def answered_431(self) -> bool:
        return self.status_line.startswith(b"HTTP/1.1 431")

    def refused(self, within: int) -> bool:
        return self.answered_431 or (self.closed and self.sent < within)


def send_oversized_head(
    port: int, path: str, value_bytes: int, *, chunk: int = 64 * 1024, timeout: float = 5.0
) -> HeadOutcome:
    """Send `GET path`, then one header whose value is `value_bytes` long, in chunks; stop as soon as
    the server answers or closes. The send buffer is kept small so that `sent` counts what the
    server's side took, not what our own kernel buffered."""
    outcome = HeadOutcome()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Filler: ".encode()
        try:
            sock.sendall(head)
            outcome.sent = len(head)
            value = b"a" * chunk
            remaining = value_bytes
            while remaining > 0:
                if _readable(sock) and _read_answer(sock, outcome):
                    return outcome
                outcome.sent += (sent := sock.send(value[: min(chunk, remaining)]))
                remaining -= sent
        except (BrokenPipeError, ConnectionResetError):
            outcome.closed = True
        except TimeoutError:
            outcome.stalled = True
        # Whatever stopped the sending, the server's answer (or its close) may be waiting.
        with contextlib.suppress(TimeoutError):
            _read_answer(sock, outcome)
    return outcome


def _readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def _read_answer(sock: socket.socket, outcome: HeadOutcome) -> bool:
    """Read what the server sent; True when it answered or closed."""
    try:
        data = sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        outcome.closed = True
        return True
    if not data:
        outcome.closed = True
        return True
    outcome.status_line = data.split(b"\r\n", 1)[0]
    return True


@dataclass
class IdleSockets:
    """Connections that send nothing, or only the start of a request line, and are then left alone."""

    port: int
    count: int
    partial: bytes = b"GET /api/v1/workflows/ru"
    opened_at: dict[socket.socket, float] = field(default_factory=dict)
    closed_after: list[float] = field(default_factory=list)
    answered: int = 0  # connections on which the server wrote something before closing

    def open(self, timeout: float = 5.0) -> None:
        for i in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.opened_at[sock] = time.monotonic()
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", self.port))
            if i % 2:
                sock.sendall(self.partial)
            sock.setblocking(False)

    @property
    def still_open(self) -> int:
        return len(self.opened_at)

    def poll_closed(self) -> int:
        """Without waiting: how many of the sockets the server has closed by now (not consumed)."""
        with selectors.DefaultSelector() as sel:
            for sock in self.opened_at:
                sel.register(sock, selectors.EVENT_READ)
            return len(sel.select(0))

    def wait_closed(self, deadline: float) -> None:
        """Wait on all the sockets at once until the server has closed each, or until `deadline`
        (monotonic); closed ones are recorded in `closed_after` (seconds since each was opened)."""
        answered: set[socket.socket] = set()
        with selectors.DefaultSelector() as sel:
            for sock in self.opened_at:
                sel.register(sock, selectors.EVENT_READ)
            while self.opened_at and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    fileobj = key.fileobj
                    assert isinstance(fileobj, socket.socket)
                    sock = fileobj
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data:
                        answered.add(sock)
                        continue
                    sel.unregister(sock)
                    self.closed_after.append(time.monotonic() - self.opened_at.pop(sock))
                    sock.close()
        self.answered = len(answered)

    def close(self) -> None:
        for sock in self.opened_at:
            sock.close()
        self.opened_at.clear()


def chunked(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    """`data` as an iterator of pieces: httpx sends such a body with `Transfer-Encoding: chunked`."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
