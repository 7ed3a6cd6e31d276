"""The `/metrics` endpoint on its own port (`web.metrics.start_metrics_server`): its answers, its
bounds (connections, head size, one deadline per connection), and the sum of every worker process
in multiprocess mode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess

from cli.main import WorkerSupervisor
from core import metrics
from core.settings import Settings
from web.metrics import MAX_HEAD_BYTES, MetricsServer, start_metrics_server

ROOT = Path(__file__).resolve().parents[2]
Key = tuple[str, frozenset[tuple[str, str]]]  # a sample's name and labels
# The supervisor's call when a worker process exits (prometheus-client leaves it unannotated).
mark_process_dead: Callable[[int], None] = multiprocess.mark_process_dead


def parsed(text: str) -> dict[Key, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    server = start_metrics_server("127.0.0.1", 0, multiprocess=False)
    try:
        yield server
    finally:
        server.close()


def test_metrics_are_served_in_the_text_format_on_their_own_port(server: MetricsServer) -> None:
    metrics.request_done("getWorkflowRun", 200, 0.003)
    answer = httpx.get(f"http://127.0.0.1:{server.port}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parsed(answer.text)
    key = ("workflow_runs_requests_total", frozenset({("operation", "getWorkflowRun"), ("status", "200")}))
    assert samples[key] >= 1
    # Every series is there from the start, with its help text, whatever was recorded yet.
    for name in ("workflow_runs_open_streams", "workflow_runs_stream_events_total"):
        assert (name, frozenset()) in samples
    assert "# HELP workflow_runs_streams_ended_total Update streams ended, by reason" in answer.text
    assert "_created" not in answer.text


def test_a_scraper_asking_for_openmetrics_gets_it(server: MetricsServer) -> None:
    answer = httpx.get(
        f"http://127.0.0.1:{server.port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    assert answer.text.endswith("# EOF\n")


def test_only_get_metrics_is_served(server: MetricsServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{base}/").status_code == 404
    assert httpx.get(f"{base}/api/v1/workflows/runs").status_code == 404
    refused = httpx.post(f"{base}/metrics")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"


def test_closing_frees_the_port() -> None:
    server = start_metrics_server("127.0.0.1", 0, multiprocess=False)
    port = server.port
    server.close()
    server.close()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")
    again = start_metrics_server("127.0.0.1", port, multiprocess=False)
    again.close()


# -- bounds -----------------------------------------------------------------------------------------


def connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port))


def read_to_eof(client: socket.socket) -> bytes:
    received = b""
    while chunk := client.recv(4096):
        received += chunk
    return received


def scrape_threads(server: MetricsServer) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"metrics-scrape-{server.port}"]


def test_connections_over_the_cap_are_answered_503_by_the_accepting_thread() -> None:
    server = start_metrics_server("127.0.0.1", 0, multiprocess=False, max_connections=2)
    idle = [connect(server) for _ in range(2)]  # connected, sending nothing: each holds its thread
    try:
        # Accepted in order: once these are answered, the two idle ones were admitted before them.
        for _ in range(5):
            with connect(server) as extra:
                answer = read_to_eof(extra)
            assert answer.startswith(b"HTTP/1.0 503 ") and b"\r\nRetry-After: 1\r\n" in answer
        assert server.connections == 2
        assert len(scrape_threads(server)) == 2  # none for the five refused

        # The idle ones leave: their threads end, and scrapes are served again.
        for client in idle:
            client.close()
        for thread in scrape_threads(server):
            thread.join()
        assert server.connections == 0
        assert httpx.get(f"http://127.0.0.1:{server.port}/metrics").status_code == 200
    finally:
        for client in idle:
            client.close()
        server.close()


def test_a_client_trickling_its_head_is_cut_off_at_the_deadline_of_the_whole_request() -> None:
    server = start_metrics_server("127.0.0.1", 0, multiprocess=False, request_seconds=0.2)
    try:
        with connect(server) as client:
            client.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
            # One more byte of the header each time the server stays silent for a while: no read of
            # the server waits long, so only a deadline over the whole request ends it.
            client.settimeout(0.02)
            received, ended = b"", False
            for _ in range(1000):  # far below MAX_HEAD_BYTES: the head's size is not what ends it
                try:
                    chunk = client.recv(4096)
                except TimeoutError:
                    try:
                        client.send(b"a")
                    except OSError:  # reset: the server closed
                        ended = True
                        break
                    continue
                except OSError:
                    ended = True
                    break
                if not chunk:
                    ended = True
                    break
                received += chunk
            assert ended, "the trickling client was still connected"
            assert received == b""  # cut off, never answered
        for thread in scrape_threads(server):
            thread.join()
        assert server.connections == 0
    finally:
        server.close()


def test_a_head_over_its_cap_is_refused_431() -> None:
    server = start_metrics_server("127.0.0.1", 0, multiprocess=False)
    try:
        with connect(server) as client:
            head = b"GET /metrics HTTP/1.0\r\nX-Large: "
            client.sendall(head + b"a" * (MAX_HEAD_BYTES - len(head)))  # not ended yet, and no room left
            answer = read_to_eof(client)
        assert answer.startswith(b"HTTP/1.0 431 ")
        # A scrape's usual head is served.
        assert httpx.get(f"http://127.0.0.1:{server.port}/metrics", headers={"X-Large": "a" * 4000}).status_code == 200
    finally:
        server.close()


# -- several processes ------------------------------------------------------------------------------

# A worker: records `requests` answers and opens `streams` streams, says so, then holds them until
# told to go (its standard input closes).
WORKER = """
import sys
from cli.main import WorkerSupervisor
from core import metrics
from core.settings import Settings
requests, streams = int(sys.argv[1]), int(sys.argv[2])
for _ in range(requests):
    metrics.request_done("postWorkflowRunUpdate", 200, 0.002)
held = [metrics.StreamRecord() for _ in range(streams)]
print("ready", flush=True)
sys.stdin.read()
"""


def worker(directory: Path, requests: int, streams: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(requests), str(streams)],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def test_one_scrape_sums_every_worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    requests: Key = (
        "workflow_runs_requests_total",
        frozenset({("operation", "postWorkflowRunUpdate"), ("status", "200")}),
    )
    timed: Key = ("workflow_runs_request_seconds_count", frozenset({("operation", "postWorkflowRunUpdate")}))
    open_streams: Key = ("workflow_runs_open_streams", frozenset())
    first, second = worker(tmp_path, 3, 2), worker(tmp_path, 5, 1)
    server = start_metrics_server("127.0.0.1", 0, multiprocess=True)
    try:

        def scraped() -> dict[Key, float]:
            return parsed(httpx.get(f"http://127.0.0.1:{server.port}/metrics").text)

        samples = scraped()
        assert samples[requests] == 8
        assert samples[open_streams] == 3
        assert samples[timed] == 8

        # A worker killed with its streams open: its counts stay, its open streams go once the
        # supervisor marks it dead.
        first.send_signal(signal.SIGKILL)
        first.wait()
        mark_process_dead(first.pid)
        samples = scraped()
        assert samples[requests] == 8
        assert samples[open_streams] == 1
    finally:
        server.close()
        for process in (first, second):
            if process.poll() is None:
                process.kill()
            process.wait()
            assert process.stdin is not None and process.stdout is not None
            process.stdin.close()
            process.stdout.close()


class FakeWorker:
    """A worker process as uvicorn's supervisor sees it: alive, ready, stopped when told."""

    pids = iter(range(4_000_000, 5_000_000))

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.pid = next(self.pids)
        self.exitcode: int | None = None

    def start(self) -> None:
        pass

    def wait_until_ready(self, timeout: float, should_exit: threading.Event | None = None) -> bool:
        return True

    def is_alive(self, timeout: float = 5) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        self.exitcode = 0

    def kill(self) -> None:
        self.exitcode = -9

    def join(self) -> None:
        pass


@pytest.mark.parametrize(("signal_name", "leaving"), [("SIGHUP", [0, 1]), ("SIGTTOU", [1])])
def test_workers_the_supervisor_replaces_or_stops_on_a_signal_are_marked_dead(
    signal_name: str, leaving: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uvicorn_multiprocess, "Process", FakeWorker)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest keeps its handlers
    config = uvicorn.Config("web.app:app_from_env", workers=2, log_config=None)
    supervisor = WorkerSupervisor(config, [], settings=Settings(), metrics_dir=str(tmp_path))
    supervisor.init_processes()
    workers = list(supervisor.processes)
    for worker in workers:  # what a worker with open streams leaves: a live gauge, a counter
        (tmp_path / f"gauge_livesum_{worker.pid}.db").touch()
        (tmp_path / f"counter_{worker.pid}.db").touch()

    supervisor.signal_queue.append(getattr(signal, signal_name))
    supervisor.handle_signals()

    gone = [workers[i] for i in leaving]
    assert all(worker not in supervisor.processes for worker in gone)
    for worker in workers:
        assert (tmp_path / f"gauge_livesum_{worker.pid}.db").exists() == (worker not in gone)
        assert (tmp_path / f"counter_{worker.pid}.db").exists()  # counts stay in the sum


def test_multiprocess_mode_needs_its_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    with pytest.raises(ValueError):
        start_metrics_server("127.0.0.1", 0, multiprocess=True)
