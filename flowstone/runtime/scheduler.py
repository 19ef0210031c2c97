"""Running schedules: each tick claimed once in the store, then materialized.

``run_schedules(rt, schedules, owner, clock=...)`` loops until cancelled. At each
wake-up it asks every schedule which ticks are due (``Schedule.due``: the
``catch_up`` rule over the ticks since the newest one recorded), claims each in
the store (``claim_tick``: a tick is recorded once, so a restart or a second
scheduler never runs it again), materializes it in a task of its own, and
records how it ended (``finish_tick``). Then it sleeps until the next tick. The
runs go in the task group given as ``work`` (the daemon's, which lets them finish
within a grace period when it stops), else in one of the scheduler's own.

The clock is injected: ``SystemClock`` in production, and a clock the tests move
(``flowstone.testing.ManualClock``) to jump through days and DST nights without
waiting. A schedule first seen now starts now: its past ticks are not caught up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from ..errors import FlowstoneError, MaterializationFailed
from ..plumbing.clock import utcnow
from ..schedules import Schedule

__all__ = ["Clock", "SystemClock", "run_schedules", "run_tick"]

log = logging.getLogger("flowstone.daemon")


class Clock(Protocol):
    """What the scheduler reads the time from and sleeps on."""

    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime) -> None: ...


class SystemClock:
    """The wall clock (UTC)."""

    def now(self) -> datetime:
        return utcnow()

    async def sleep_until(self, when: datetime) -> None:
        await anyio.sleep(max(0.0, (when - utcnow()).total_seconds()))


async def run_schedules(
    rt: Any, schedules: Sequence[Schedule], owner: str, *, clock: Clock | None = None, work: TaskGroup | None = None,
    since: datetime | None = None,
) -> None:
    """Run ``schedules`` on ``rt`` until cancelled (see the module doc). ``owner``
    names this scheduler in the tick records; a schedule with no tick recorded starts
    at ``since`` (default: now), so a loop started again after a failure catches up
    the ticks it missed meanwhile."""
    if work is None:
        async with anyio.create_task_group() as own:
            await run_schedules(rt, schedules, owner, clock=clock, work=own, since=since)
        return
    clock = clock or SystemClock()
    store = rt.store
    assets = {asset.name: asset for asset in await rt.assets()}
    definitions = {s.asset: assets[s.asset].partitioned_by for s in schedules}
    started = since or clock.now()
    recorded = await store.last_ticks()
    last = {s.name: recorded[s.name].at if s.name in recorded else started for s in schedules}
    if not schedules:
        await anyio.sleep_forever()
    while True:
        now = clock.now()
        for schedule in schedules:
            seen = list(schedule.ticks(last[schedule.name], now))  # listed once, for both uses
            for tick in schedule.keep(seen, now):
                if await store.claim_tick(schedule.name, tick, owner):
                    work.start_soon(run_tick, rt, schedule, definitions[schedule.asset], tick)
            if seen:  # the ticks catch_up dropped are behind us too
                last[schedule.name] = seen[-1]
        await clock.sleep_until(min(s.next_tick(max(last[s.name], now)) for s in schedules))


async def run_tick(rt: Any, schedule: Schedule, definition: Any, tick: datetime) -> None:
    """Materialize one claimed tick and record how it ended; a failure is the tick's,
    never the scheduler's (it goes on with the next ticks). Cancelled (the daemon
    stops), the tick is recorded ``cancelled`` before the cancellation goes on."""
    state, run_id, error = "succeeded", None, None
    log.info("schedule %s: tick %s runs %s", schedule.name, tick.isoformat(), schedule.asset)
    try:
        result = await rt.materialize(schedule.asset, schedule.partition_at(definition, tick))
        run_id = result.run_id
        if schedule.asset in result.skipped:
            state = "skipped"  # up to date: nothing to compute
    except MaterializationFailed as failure:
        state, error = "failed", str(failure)
        run_id = failure.result.run_id if failure.result is not None else None
    except FlowstoneError as failure:  # a partition out of range, access denied, ...
        state, error = "failed", str(failure)
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINISH_SECONDS):
            await _finish(rt, schedule, tick, "cancelled", None, "the daemon stopped before the tick's run ended")
        raise
    if error is not None:
        log.warning("schedule %s: the tick of %s failed: %s", schedule.name, tick.isoformat(), error)
    await _finish(rt, schedule, tick, state, run_id, error)


FINISH_SECONDS = 10.0
"""How long a cancelled tick may take to record that it was."""


async def _finish(rt: Any, schedule: Schedule, tick: datetime, state: str, run_id: Any, error: str | None) -> None:
    try:
        await rt.store.finish_tick(schedule.name, tick, state, run_id=run_id, error=error)
    except FlowstoneError as failure:  # the store is away: the tick stays "running" in it
        log.error("schedule %s: the end of the tick of %s was not recorded: %s", schedule.name, tick.isoformat(),
                  failure)
