"""When the server runs full garbage collections (web/collector.py), on CPython's real collector."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from cli import main as cli
from tests.support.fakes import app_settings
from web.collector import FullCollections


@pytest.fixture
def thresholds() -> Iterator[None]:
    """Whatever a test installs, the rest of the session keeps CPython's thresholds."""
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def full_collections_while_promoting() -> int:
    """Full collections CPython runs while long-lived objects pile up (`pile_up`), counted from
    a full pass first, so that its rule counts from this heap (an earlier test may have frozen a
    larger one)."""
    gc.collect()
    return pile_up()


def pile_up() -> int:
    """Full collections run while as many new long-lived objects as every object tracked pile up,
    far past CPython's quarter."""
    generations: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            generations.append(info["generation"])

    kept: list[list[int]] = []
    gc.callbacks.append(record)
    try:
        for index in range(max(200_000, len(gc.get_objects()))):
            kept.append([index])
    finally:
        gc.callbacks.remove(record)
    return generations.count(2)


def test_once_installed_cpython_runs_no_full_collection_of_its_own(thresholds: None) -> None:
    assert full_collections_while_promoting() >= 1  # what the policy takes away
    young, middle, _ = gc.get_threshold()
    FullCollections.install()
    assert gc.get_threshold()[:2] == (young, middle)  # the young collections are CPython's still
    assert full_collections_while_promoting() == 0


def test_the_server_installs_it_and_runs_it_on_its_loop(thresholds: None) -> None:
    server = cli.graceful_server(app_settings("collector-test-secret-" + "x" * 40), port=0)
    assert isinstance(server.collector, FullCollections)
    assert gc.get_threshold()[2] == 1 << 30  # CPython's own full pass: never


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_an_old_cycle_waits_for_the_servers_pass(thresholds: None) -> None:
    collector = FullCollections.install()
    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    gc.collect(1)  # promoted to the oldest generation, as a long-lived connection's objects are
    del first, second
    assert pile_up() == 0
    assert gone() is not None  # garbage, but no full pass ran
    collector.run("test")
    assert gone() is None


class Process:
    """The figures the collector reads, as a test sets them, and the passes run."""

    def __init__(self, blocks: int = 10_000, rss: int = 1_000 << 20) -> None:
        self.now = 0.0
        self.blocks = blocks
        self.rss = rss
        self.passes = 0
        self.walks = True  # False: another thread was collecting, the pass walked nothing
        self.passed = asyncio.Event()

    def collect(self) -> int:
        if self.walks:
            self.passes += 1
            self.passed.set()
        return 0

    def collector(self, **overrides: float) -> FullCollections:
        return FullCollections(
            growth=0.25,
            min_growth=int(overrides.get("min_growth", 100)),
            min_rss_growth=int(overrides.get("min_rss_growth", 1 << 20)),
            max_interval=600,
            check_every=overrides.get("check_every", 1),
            clock=lambda: self.now,
            collect=self.collect,
            blocks=lambda: self.blocks,
            rss=lambda: self.rss,
            passes=lambda: self.passes,
        )


def test_a_pass_runs_once_the_allocations_grew_by_a_quarter() -> None:
    process = Process(blocks=10_000)
    collector = process.collector()
    process.blocks = 12_499
    collector.tick()
    assert process.passes == 0
    process.blocks = 12_500
    collector.tick()
    assert process.passes == 1
    # Counted from what the pass left (12,500 here): renewed objects, replacing the ones they
    # succeed, leave the count as it is and never trigger it.
    for _ in range(100):
        collector.tick()
    assert process.passes == 1
    process.blocks = 15_624
    collector.tick()
    assert process.passes == 1
    process.blocks = 15_625
    collector.tick()
    assert process.passes == 2


def test_a_small_heap_is_not_walked_for_less_than_min_growth() -> None:
    process = Process(blocks=100)
    collector = process.collector(min_growth=100)
    process.blocks = 199  # +99 %, but fewer than 100 more
    collector.tick()
    assert process.passes == 0
    process.blocks = 200
    collector.tick()
    assert process.passes == 1


def test_a_pass_runs_once_resident_memory_grew_by_a_quarter() -> None:
    # Cycles holding large buffers: one allocation each, megabytes of memory.
    process = Process(rss=400 << 20)
    collector = process.collector(min_rss_growth=64 << 20)
    process.rss = (500 << 20) - 1
    collector.tick()
    assert process.passes == 0
    process.rss = 500 << 20
    collector.tick()
    assert process.passes == 1
    assert collector.resident == 500 << 20


def test_a_pass_runs_at_least_every_interval() -> None:
    process = Process()
    collector = process.collector()
    process.now = 599
    collector.tick()
    assert process.passes == 0
    process.now = 600
    collector.tick()
    assert process.passes == 1
    process.now = 1199
    collector.tick()  # the interval counts from the last pass
    assert process.passes == 1
    process.now = 1200
    collector.tick()
    assert process.passes == 2


def test_a_pass_that_walked_nothing_is_still_owed() -> None:
    process = Process(blocks=10_000)
    collector = process.collector()
    process.blocks = 20_000
    process.walks = False
    collector.tick()
    assert collector.runs == 0 and collector.held == 10_000
    process.walks = True
    collector.tick()
    assert collector.runs == 1 and collector.held == 20_000


async def test_started_it_checks_on_the_loop_until_stopped() -> None:
    # No connection or request involved: an idle process collects too.
    process = Process(blocks=10_000)
    collector = process.collector(check_every=0.01)
    process.blocks = 20_000
    collector.start(asyncio.get_running_loop())
    assert collector.checking
    try:
        await asyncio.wait_for(process.passed.wait(), 10)
    finally:
        collector.stop()
    assert collector.runs == 1
    assert not collector.checking  # no timer left behind
