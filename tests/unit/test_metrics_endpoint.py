"""The `/metrics` endpoint on its own port (`web.metrics.start_metrics_server`), and the sum of
every worker process in multiprocess mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from core import metrics
from web.metrics import MetricsServer, start_metrics_server

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


# -- several processes ------------------------------------------------------------------------------

# A worker: records `requests` answers and opens `streams` streams, says so, then holds them until
# told to go (its standard input closes).
WORKER = """
import sys
from core import metrics
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


def test_multiprocess_mode_needs_its_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    with pytest.raises(ValueError):
        start_metrics_server("127.0.0.1", 0, multiprocess=True)
