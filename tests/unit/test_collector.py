"""When the server runs full garbage collections (web/collector.py), on CPython's real collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

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
    """Full collections CPython runs while long-lived objects pile up: as many new ones as every
    object already tracked, far past its rule's quarter."""
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


def test_cpython_runs_full_collections_as_long_lived_objects_pile_up(thresholds: None) -> None:
    # What the policy takes away: without it, this workload costs full passes.
    assert full_collections_while_promoting() >= 1


def test_once_installed_cpython_runs_no_full_collection_of_its_own(thresholds: None) -> None:
    young, middle, _ = gc.get_threshold()
    FullCollections.install()
    assert gc.get_threshold()[:2] == (young, middle)  # the young collections are CPython's still
    assert full_collections_while_promoting() == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Heap:
    """The allocator's block count, as the test sets it, and the passes run on it."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.passes = 0

    def count(self) -> int:
        return self.blocks

    def collect(self) -> int:
        self.passes += 1
        return 0


def collector_on(heap: Heap, clock: Clock) -> FullCollections:
    return FullCollections(
        growth=0.25,
        min_growth=100,
        max_interval=600,
        check_every=1,
        clock=clock,
        collect=heap.collect,
        blocks=heap.count,
    )


def test_a_full_pass_runs_once_the_heap_grew_by_a_quarter() -> None:
    heap, clock = Heap(blocks=10_000), Clock()
    collector = collector_on(heap, clock)
    heap.blocks = 12_499
    clock.now = 1
    collector.tick()
    assert heap.passes == 0
    heap.blocks = 12_500
    clock.now = 2
    collector.tick()
    assert heap.passes == 1
    # Counted from what the pass left (12,500 here): renewed objects, replacing the ones they
    # succeed, leave the count as it is and never trigger it.
    for second in range(3, 100):
        clock.now = second
        collector.tick()
    assert heap.passes == 1
    heap.blocks = 15_624
    clock.now = 100
    collector.tick()
    assert heap.passes == 1
    heap.blocks = 15_625
    clock.now = 101
    collector.tick()
    assert heap.passes == 2


def test_a_small_heap_is_not_walked_for_less_than_min_growth() -> None:
    heap, clock = Heap(blocks=100), Clock()
    collector = collector_on(heap, clock)
    heap.blocks = 199  # +99 %, but fewer than 100 blocks more
    clock.now = 1
    collector.tick()
    assert heap.passes == 0
    heap.blocks = 200
    clock.now = 2
    collector.tick()
    assert heap.passes == 1


def test_the_heap_is_counted_at_most_once_per_check_interval() -> None:
    heap, clock = Heap(blocks=10_000), Clock()
    collector = collector_on(heap, clock)
    heap.blocks = 20_000
    clock.now = 0.5
    collector.tick()
    assert heap.passes == 0
    clock.now = 1.0
    collector.tick()
    assert heap.passes == 1


def test_a_full_pass_runs_at_least_every_interval() -> None:
    heap, clock = Heap(blocks=10_000), Clock()
    collector = collector_on(heap, clock)
    clock.now = 599
    collector.tick()
    assert heap.passes == 0
    clock.now = 600
    collector.tick()
    assert heap.passes == 1
    clock.now = 1199
    collector.tick()  # the interval counts from the last pass
    assert heap.passes == 1
    clock.now = 1200
    collector.tick()
    assert heap.passes == 2


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_pass_frees_old_reference_cycles_that_cpython_no_longer_would(thresholds: None) -> None:
    collector = FullCollections.install()
    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    gc.collect(1)
    gc.collect(1)  # promoted to the oldest generation, as a long-lived connection's objects are
    del first, second
    full_collections_while_promoting()
    assert gone() is not None  # garbage, waiting for a full pass
    collector.run("test")
    assert gone() is None
