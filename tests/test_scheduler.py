"""Running schedules on a clock the test moves: each tick once, DST nights, catch-up
after downtime, failures recorded, two schedulers on one store."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.runtime.scheduler import run_schedules
from flowstone.testing import ManualClock

pytestmark = pytest.mark.anyio

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")


def pipeline(calls: list, *, failing: bool = False) -> fs.Pipeline:
    p = fs.Pipeline("scheduled")

    @p.asset(code_version="1")
    async def report(ctx, deps):
        calls.append(ctx.run_id)
        if failing:
            raise ValueError("no data today")
        return len(calls)

    @p.asset(partitioned_by=fs.DailyPartitions(start=date(2026, 1, 1), timezone="America/New_York"))
    async def daily(ctx, deps):
        calls.append(ctx.partition)
        return 1

    @p.asset(partitioned_by=fs.HourlyPartitions(start=datetime(2025, 12, 31, tzinfo=timezone.utc)))
    async def hourly(ctx, deps):
        calls.append(ctx.partition)
        if failing:
            raise ValueError("no data this hour")
        return 1

    return p


async def settled(store, clock: ManualClock, sleepers: int = 1) -> None:
    """Until every scheduler sleeps again and no claimed tick is still running."""
    async def quiet() -> bool:
        if clock.sleeping < sleepers:  # looked at first: asleep, it has claimed what was due
            return False
        ticks = await store.last_ticks()
        return all(t.state != "running" for t in ticks.values())

    # Generous: under a loaded CI machine two stores on one file may wait for each
    # other's write lock (up to the store's busy timeout) without anything being wrong.
    await until(quiet, limit=30)


async def test_each_tick_runs_once_and_is_recorded(anyio_backend):
    calls: list = []
    clock = ManualClock(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    hourly = fs.Schedule("hourly", "0 * * * *")
    async with fs.open_runtime(pipeline(calls)) as rt, anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_schedules(rt, [hourly], "me", clock=clock))
        await settled(rt.store, clock)
        assert calls == []  # nothing was due at 00:30
        for hour in range(1, 4):
            clock.advance(to=datetime(2026, 1, 1, hour, tzinfo=UTC))
            await settled(rt.store, clock)
        assert calls == [datetime(2026, 1, 1, hour, tzinfo=UTC) for hour in (0, 1, 2)]  # the hour that ended
        [(name, last)] = (await rt.store.last_ticks()).items()
        assert (name, last.at, last.state) == ("hourly 0 * * * * UTC", datetime(2026, 1, 1, 3, tzinfo=UTC), "succeeded")
        tasks.cancel_scope.cancel()


async def test_a_tick_of_an_asset_that_is_up_to_date_is_recorded_as_skipped(anyio_backend):
    calls: list = []
    clock = ManualClock(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    every_hour = fs.Schedule("report", "0 * * * *")
    async with fs.open_runtime(pipeline(calls)) as rt, anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_schedules(rt, [every_hour], "me", clock=clock))
        await settled(rt.store, clock)  # asleep: it has started
        for hour in (1, 2):
            clock.advance(to=datetime(2026, 1, 1, hour, tzinfo=UTC))
            await settled(rt.store, clock)
        assert len(calls) == 1  # computed once; the second tick found nothing changed
        assert (await rt.store.last_ticks())[every_hour.name].state == "skipped"
        tasks.cancel_scope.cancel()


async def test_a_daily_schedule_across_the_fall_back_night_runs_once_for_the_day_before(anyio_backend):
    calls: list = []
    clock = ManualClock(datetime(2026, 10, 31, 12, tzinfo=NEW_YORK))
    nightly = fs.Schedule("daily", "30 1 * * *", timezone="America/New_York")
    async with fs.open_runtime(pipeline(calls)) as rt, anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_schedules(rt, [nightly], "me", clock=clock))
        await settled(rt.store, clock)
        for _step in range(1, 25):  # through the night, an hour at a time (01:00 twice)
            clock.advance(timedelta(hours=1))
            await settled(rt.store, clock)
        assert calls == [date(2026, 10, 31)]
        tasks.cancel_scope.cancel()


async def test_after_downtime_catch_up_latest_runs_only_the_newest_missed_tick(anyio_backend):
    calls: list = []
    clock = ManualClock(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    hourly = fs.Schedule("hourly", "0 * * * *")
    async with fs.open_runtime(pipeline(calls)) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_schedules(rt, [hourly], "me", clock=clock))
            await settled(rt.store, clock)  # asleep: it has started
            clock.advance(to=datetime(2026, 1, 1, 1, tzinfo=UTC))
            await settled(rt.store, clock)
            tasks.cancel_scope.cancel()  # the daemon stops
        clock.advance(to=datetime(2026, 1, 1, 6, 10, tzinfo=UTC))  # five ticks go by
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_schedules(rt, [hourly], "me", clock=clock))
            await settled(rt.store, clock)
            tasks.cancel_scope.cancel()
        assert calls == [datetime(2026, 1, 1, 0, tzinfo=UTC), datetime(2026, 1, 1, 5, tzinfo=UTC)]
        last = (await rt.store.last_ticks())[hourly.name]
        assert last.at == datetime(2026, 1, 1, 6, tzinfo=UTC)


async def test_a_failing_tick_is_recorded_and_the_scheduler_goes_on(anyio_backend):
    calls: list = []
    clock = ManualClock(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    hourly = fs.Schedule("hourly", "0 * * * *")
    async with fs.open_runtime(pipeline(calls, failing=True)) as rt, anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_schedules(rt, [hourly], "me", clock=clock))
        await settled(rt.store, clock)  # asleep: it has started
        for hour in (1, 2):
            clock.advance(to=datetime(2026, 1, 1, hour, tzinfo=UTC))
            await settled(rt.store, clock)
        last = (await rt.store.last_ticks())[hourly.name]
        assert (last.state, len(calls)) == ("failed", 2) and "no data this hour" in last.error
        tasks.cancel_scope.cancel()


async def test_two_schedulers_on_one_store_run_each_tick_once(anyio_backend, tmp_path):
    """As two daemons would: the store's tick record decides who runs a tick."""
    calls: list = []
    clock = ManualClock(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    hourly = fs.Schedule("hourly", "0 * * * *")
    path = tmp_path / "flowstone.db"
    async with fs.store.SqliteStore(path) as one, fs.store.SqliteStore(path) as two:
        async with fs.open_runtime(pipeline(calls), store=one) as first, fs.open_runtime(
            pipeline(calls), store=two
        ) as second, anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_schedules(first, [hourly], "first", clock=clock))
            tasks.start_soon(lambda: run_schedules(second, [hourly], "second", clock=clock))
            await settled(one, clock, sleepers=2)  # both asleep: both have started
            for hour in range(1, 6):
                clock.advance(to=datetime(2026, 1, 1, hour, tzinfo=UTC))
                await settled(one, clock, sleepers=2)
            tasks.cancel_scope.cancel()
    assert sorted(calls) == [datetime(2026, 1, 1, hour, tzinfo=UTC) for hour in range(5)]  # each hour once
