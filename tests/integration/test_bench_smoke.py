"""The benchmark keeps working: a smoke run (`python -m scripts.bench --smoke`) yields every figure.

No timing is asserted: this machine is shared and its figures are noise at smoke durations. The
real run is `make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
UPDATE_FIGURES = ("post", "get_20", "get_1000", "post_running_run")
RUN_FIGURES = ("details", "list")
RATE_FIELDS = ("server_rps", "baseline_rps", "ratio", "server_p50_ms", "baseline_p50_ms")
STREAM_FIELDS = ("opened", "deliveries", "latency_p50_ms", "latency_p99_ms", "rss_before_kb", "rss_open_kb")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--smoke", "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,  # the API is restarted before each stream group
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "POST update (append one)" in done.stdout  # the table was printed
    data: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
    return data


def positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@pytest.mark.parametrize("name", UPDATE_FIGURES)
def test_update_figures(report: dict[str, Any], name: str) -> None:
    figure = report["updates"][name]
    for key in RATE_FIELDS:
        assert positive(figure[key]), (name, key, figure[key])
    assert figure["rounds"]["server"] and figure["rounds"]["baseline"]


@pytest.mark.parametrize("name", RUN_FIGURES)
def test_run_figures(report: dict[str, Any], name: str) -> None:
    figure = report["runs"][name]
    for key in RATE_FIELDS:
        assert positive(figure[key]), (name, key, figure[key])


def test_stream_figures(report: dict[str, Any]) -> None:
    streams = report["streams"]
    for key in STREAM_FIELDS:
        assert positive(streams[key]), (key, streams[key])
    assert streams["opened"] == streams["streams"]
    assert streams["deliveries"] == streams["expected_deliveries"] == streams["opened"] * streams["posts"]
    # Memory per stream is a difference of two RSS readings: a number, not necessarily > 0 at 20.
    assert isinstance(streams["kb_per_stream"], int | float)


@pytest.mark.parametrize("group", ["streams10k", "fanout"])
def test_many_stream_figures(report: dict[str, Any], group: str) -> None:
    figure = report[group]
    assert figure["opened"] == figure["streams"] > 0
    assert figure["phases"], figure
    for phase in figure["phases"]:
        assert phase["deliveries"] == phase["expected_deliveries"] > 0, phase
        assert positive(phase["latency_p99_ms"]), phase
    assert isinstance(figure["kb_per_stream"], int | float)


def test_seeds_and_meta(report: dict[str, Any]) -> None:
    assert report["seeds"]["get_20"] == 20
    assert report["seeds"]["get_1000"] == 1000
    assert positive(report["seeds"]["list_runs"])
    assert positive(report["seeds"]["details_history_events"])
    assert report["meta"]["smoke"] is True
    assert report["meta"]["generator"] in ("wrk", "python")
