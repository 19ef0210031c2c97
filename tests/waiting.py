"""Synchronising tests on the runtime's state, never on time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


async def until(predicate: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    """Wait for ``predicate()`` (an async check that talks to the runtime, so each
    try lets other tasks run) to hold; fail the test after ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not await predicate():
            await anyio.lowlevel.checkpoint()
