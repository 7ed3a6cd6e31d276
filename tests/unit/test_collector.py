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


class Collect:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return 0


def test_a_full_pass_runs_once_as_many_connections_closed_as_are_open() -> None:
    collect = Collect()
    collector = FullCollections(min_closed=3, max_interval=60, clock=Clock(), collect=collect)
    for _ in range(9):
        collector.connection_closed(open_connections=10)
    assert collect.calls == 0
    collector.connection_closed(open_connections=10)
    assert collect.calls == 1
    for _ in range(10):  # counted afresh from that pass
        collector.connection_closed(open_connections=10)
    assert collect.calls == 2


def test_with_few_connections_open_min_closed_closes_are_needed() -> None:
    collect = Collect()
    collector = FullCollections(min_closed=3, max_interval=60, clock=Clock(), collect=collect)
    collector.connection_closed(open_connections=0)
    collector.connection_closed(open_connections=0)
    assert collect.calls == 0
    collector.connection_closed(open_connections=0)
    assert collect.calls == 1


def test_after_a_pass_as_many_closes_as_were_open_then_are_needed() -> None:
    # A mass disconnect: every one of 10 connections gone, the next pass waits for all 10 closes,
    # not one pass per `min_closed` while the heap still holds what they leave.
    collect = Collect()
    collector = FullCollections(min_closed=2, max_interval=60, clock=Clock(), collect=collect)
    collector.run("test", open_connections=10)
    for open_now in range(9, 0, -1):
        collector.connection_closed(open_connections=open_now)
    assert collect.calls == 1
    collector.connection_closed(open_connections=0)
    assert collect.calls == 2


def test_a_full_pass_runs_at_least_every_interval() -> None:
    clock, collect = Clock(), Collect()
    collector = FullCollections(min_closed=1000, max_interval=60, clock=clock, collect=collect)
    clock.now = 59.0
    collector.tick(open_connections=0)
    assert collect.calls == 0
    clock.now = 60.0
    collector.tick(open_connections=0)
    assert collect.calls == 1
    clock.now = 119.0
    collector.tick(open_connections=0)  # the interval counts from the last pass
    assert collect.calls == 1
    collector.connection_closed(open_connections=0)
    clock.now = 121.0
    collector.tick(open_connections=0)
    assert collect.calls == 2
    assert collector.closed == 0


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
    collector.run("test", open_connections=0)
    assert gone() is None
