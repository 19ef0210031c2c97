"""A clock the tests move: the scheduler sleeps on it, the test advances it."""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio

__all__ = ["ManualClock"]


class ManualClock:
    """Time that passes only when ``advance`` says so (for ``run_schedules(clock=...)``):
    jump through days and DST nights without waiting. ``sleeping`` counts the tasks
    asleep on it, so a test can wait until the scheduler has dealt with the present."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start
        self._sleepers: list[tuple[datetime, anyio.Event]] = []

    def now(self) -> datetime:
        return self._now

    @property
    def sleeping(self) -> int:
        return len(self._sleepers)

    async def sleep_until(self, when: datetime) -> None:
        if when <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        entry = (when, anyio.Event())
        self._sleepers.append(entry)
        try:
            await entry[1].wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, by: timedelta | None = None, *, to: datetime | None = None) -> None:
        """Move the time forward (``by`` a span, or ``to`` a time) and wake whoever's
        time has come."""
        target = to if to is not None else self._now + (by or timedelta())
        if target < self._now:
            raise ValueError(f"time does not go back: {target} < {self._now}")
        self._now = target
        for when, event in list(self._sleepers):
            if when <= target:
                self._sleepers.remove((when, event))
                event.set()
