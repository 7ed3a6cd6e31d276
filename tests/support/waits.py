"""Waits on conditions the services cannot notify a test of: polled, always under a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll a condition until it holds (services are eventually consistent); its value, or fail at
    the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.2)


async def wait_until(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    """`wait_for` inside an event loop, for state other tasks change."""
    limit = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > limit:
            raise AssertionError(f"not met before the deadline: {what}")
        await asyncio.sleep(0.05)


async def wait_all(events: list[asyncio.Event], deadline: float) -> None:
    async with asyncio.timeout(deadline):
        await asyncio.gather(*(e.wait() for e in events))
