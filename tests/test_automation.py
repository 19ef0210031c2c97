"""Automation (fs.Eager, fs.OnMissing) and sensors, run by the daemon on both backends."""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.runtime.daemon import run_daemon

DAYS = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 1, 6))
FAST = 0.005
"""Seconds between two looks of the automation in these tests."""


# ---------------------------------------------------------------- definitions

def test_automation_and_sensors_are_checked_where_they_are_defined():
    with pytest.raises(fs.DefinitionError, match="follows upstream assets, and this asset has none"):
        @fs.asset(automation=fs.Eager())
        async def alone(ctx, deps):
            return 1
    with pytest.raises(fs.DefinitionError, match=r"automation: must be fs\.Eager"):
        @fs.asset(automation="eager")
        async def typo(ctx, deps):
            return 1
    p = fs.Pipeline("sensors")
    with pytest.raises(fs.DefinitionError, match="async def taking"):
        @p.sensor
        def blocking(ctx):
            return []
    with pytest.raises(fs.DefinitionError, match="interval"):
        @p.sensor(interval=0)
        async def never(ctx):
            return []

    @p.sensor
    async def twice(ctx):
        return []

    assert p.sensors[0].interval == 30 and p.sensors[0].name == "twice"
    p.add_sensor(fs.Sensor("twice", twice.fn))
    with pytest.raises(fs.DefinitionError, match="two sensors are called 'twice'"):
        p.validate()


# ------------------------------------------------------------------ running

class Calls(Counter):
    """How often each (asset, partition key) was computed."""


def automated(calls: Calls, *, failing: str | None = None) -> fs.Pipeline:
    p = fs.Pipeline("automated")

    @p.asset(partitioned_by=DAYS, code_version="1")
    async def raw(ctx, deps):
        calls["raw", ctx.partition_key] += 1
        return ctx.partition.day

    @p.asset(depends_on=["raw"], partitioned_by=DAYS, code_version="1", automation=fs.Eager())
    async def clean(ctx, deps):
        calls["clean", ctx.partition_key] += 1
        if ctx.partition_key == failing:
            raise ValueError("bad data")
        return deps["raw"] * 10

    @p.asset(partitioned_by=DAYS, code_version="1", automation=fs.OnMissing())
    async def calendar(ctx, deps):
        calls["calendar", ctx.partition_key] += 1
        if ctx.partition_key == failing:
            raise ValueError("no calendar that day")
        return ctx.partition.isoweekday()

    @p.asset(code_version="1", automation=fs.OnMissing())
    async def settings(ctx, deps):
        calls["settings", None] += 1
        return {"threshold": 3}

    return p


async def _daemon(rt, p, stop, **options):
    await run_daemon(rt, p.schedules, sensors=p.sensors, stop=stop, owner="d", automation_interval=FAST, **options)


@pytest.mark.anyio
async def test_eager_follows_each_upstream_change_once_and_a_failure_is_not_retried(anyio_backend):
    calls, stop = Calls(), anyio.Event()
    p = automated(calls, failing="2026-01-03")
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: _daemon(rt, p, stop))

            async def watching() -> bool:  # the first look sets the watermark: from now on
                return await store.load_cursor("automation:clean") is not None

            await until(watching)

            async def computed(asset: str, key: str) -> bool:
                return (await store.get(asset, key)).status in (fs.Status.SUCCESS, fs.Status.FAILED)

            for day in ("2026-01-01", "2026-01-03", "2026-01-05"):
                await rt.materialize("raw", date.fromisoformat(day))
                await until(lambda day=day: _exists(store, "clean", day))
                await until(lambda day=day: computed("clean", day))
            # Each change of raw made clean run once, after every look that followed it:
            # no loop on the success, and the failure on the 3rd is not tried again.
            assert [calls["clean", d] for d in ("2026-01-01", "2026-01-03", "2026-01-05")] == [1, 1, 1]
            assert (await store.get("clean", "2026-01-03")).status is fs.Status.FAILED
            assert await rt.load("clean", date(2026, 1, 5)) == 50
            assert ("clean", "2026-01-02") not in calls  # raw never changed there
            await rt.materialize("raw", date(2026, 1, 3), force=True)  # a new change: clean runs again
            await until(lambda: _calls_reach(calls, ("clean", "2026-01-03"), 2))
            stop.set()


@pytest.mark.anyio
async def test_a_watermark_kept_as_a_time_is_followed_once_then_the_stores_mark(anyio_backend, caplog):
    """A cursor an older daemon kept (a time) is read back the old way once, less the
    overlap for late writes, and replaced by the store's mark; a value that is neither
    is followed from now on, with a warning."""
    calls, stop = Calls(), anyio.Event()
    p = automated(calls)
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        done = await rt.materialize("raw", date(2026, 1, 1))
        kept = done.materializations["raw"].updated_at - timedelta(seconds=30)
        await store.save_cursor("automation:clean", kept.isoformat())
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: _daemon(rt, p, stop))
            await until(lambda: _exists(store, "clean", "2026-01-01"))

            async def marked() -> bool:
                return (await store.load_cursor("automation:clean")).value.startswith("memory:")

            await until(marked)
            await rt.materialize("raw", date(2026, 1, 2))  # followed from the mark
            await until(lambda: _exists(store, "clean", "2026-01-02"))
            await store.save_cursor("automation:clean", "sqlite:12")  # another store's
            await until(marked)
            await rt.materialize("raw", date(2026, 1, 3))
            await until(lambda: _exists(store, "clean", "2026-01-03"))
            stop.set()
    assert [calls["clean", d] for d in ("2026-01-01", "2026-01-02", "2026-01-03")] == [1, 1, 1]
    assert "'sqlite:12' is no mark of this store; following from now on" in caplog.text


@pytest.mark.anyio
async def test_a_burst_of_upstream_changes_is_followed_by_one_backfill(anyio_backend):
    """Behind an upstream backfill a look finds many changes: they go as one backfill
    (bounded, kept in the store, resumed by the next daemon), each partition once,
    and what is ready is asked of the store a thousand pairs at a time, not one."""
    from flowstone.runtime.automation import EAGER_ALONE, _follow_upstream

    days = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 3, 1))
    calls, p = Calls(), fs.Pipeline("burst")

    @p.asset(partitioned_by=days, code_version="1")
    async def raw(ctx, deps):
        return 1

    @p.asset(depends_on=["raw"], partitioned_by=days, code_version="1", automation=fs.Eager())
    async def clean(ctx, deps):
        calls["clean", ctx.partition_key] += 1
        return deps["raw"] + 1

    burst = list(days.keys())[:3 * EAGER_ALONE]
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        assets = {asset.name: asset for asset in await rt.assets()}
        _, start = await store.successes_after("raw", None)
        await rt.wait_backfill(await rt.backfill("raw", burst))
        asked = []
        lookup = store.latest_successes

        async def counting(pairs):
            asked.append(len(list(pairs)))
            return await lookup(pairs)

        store.latest_successes = counting
        async with anyio.create_task_group() as work:
            await _follow_upstream(rt, assets["clean"], assets, work, {}, start)
        [status] = [s for s in await store.list_backfill_statuses() if s.asset == "clean"]
        assert (status.asset, status.total, status.succeeded) == ("clean", len(burst), len(burst))
        assert asked[0] == len(burst)  # the look's one question; then the backfill's own, as it runs
    assert sorted(calls.values()) == [1] * len(burst)


@pytest.mark.anyio
async def test_a_look_that_finds_nothing_saves_a_newer_mark_only_now_and_then(anyio_backend, monkeypatch):
    """Other assets' successes move the store's mark; a look that finds nothing for
    its asset does not write it each time, only after ``MARK_REFRESH``."""
    from flowstone.runtime import automation

    p = automated(Calls())
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        assets = {asset.name: asset for asset in await rt.assets()}
        _, start = await store.successes_after("raw", None)
        looks: dict = {}
        async with anyio.create_task_group() as work:
            await automation._follow_upstream(rt, assets["clean"], assets, work, looks, start)
            assert (await store.load_cursor("automation:clean")).value == start
            await rt.materialize("calendar", date(2026, 1, 2))  # a success that moves the memory store's mark
            await automation._follow_upstream(rt, assets["clean"], assets, work, looks, start)
            assert (await store.load_cursor("automation:clean")).value == start  # nothing found: not written
            monkeypatch.setattr(automation, "MARK_REFRESH", -1.0)
            await automation._follow_upstream(rt, assets["clean"], assets, work, looks, start)
            assert (await store.load_cursor("automation:clean")).value != start


@pytest.mark.anyio
async def test_on_missing_fills_each_missing_partition_once(anyio_backend):
    calls, stop = Calls(), anyio.Event()
    p = automated(calls, failing="2026-01-04")
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        await rt.materialize("calendar", date(2026, 1, 2))  # already there: left alone
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: _daemon(rt, p, stop))

            async def filled() -> bool:
                states = await store.partition_states("calendar")
                return len(states) == 6 and fs.Status.RUNNING not in states.values() \
                    and await _exists(store, "settings", None)

            await until(filled)
            # Two more Eager changes, each seen by a later look: the failed partition was
            # looked at again since, and not run again.
            for day in ("2026-01-01", "2026-01-02"):
                await rt.materialize("raw", date.fromisoformat(day))
                await until(lambda day=day: _exists(store, "clean", day))
            stop.set()
    assert all(calls["calendar", day.isoformat()] == 1 for day in DAYS.keys())
    assert calls["settings", None] == 1


@pytest.mark.anyio
async def test_on_missing_remembers_only_what_failed_or_still_runs(anyio_backend):
    """A daemon's looks keep the partitions they filled until those succeed, not for
    as long as it runs: a failed one stays (it is not tried again), a filled one is
    forgotten, and filled again if its success is lost (moved by hand here)."""
    from flowstone.runtime import automation

    calls = Calls()
    p = automated(calls, failing="2026-01-04")
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        calendar = next(asset for asset in await rt.assets() if asset.name == "calendar")
        asked: dict = {}

        async def look() -> None:  # and wait for the backfill it started
            async with anyio.create_task_group() as work:
                await automation._fill_missing(rt, calendar, work, asked)

        await look()
        assert asked == {"calendar": {day.isoformat() for day in DAYS.keys()}}
        await look()
        assert asked == {"calendar": {"2026-01-04"}}
        assert calls["calendar", "2026-01-04"] == 1
        lost = await store.get("calendar", "2026-01-02")
        await store.update_status(lost.id, fs.Status.SUPERSEDED)
        await look()
        assert (await store.get("calendar", "2026-01-02")).status is fs.Status.SUCCESS
    assert calls["calendar", "2026-01-02"] == 2
    assert calls["calendar", "2026-01-04"] == 1


@pytest.mark.anyio
async def test_a_sensor_keeps_its_cursor_and_its_failures_are_recorded_and_retried(anyio_backend):
    seen, stop = [], anyio.Event()
    calls = Calls()
    p = automated(calls)

    @p.sensor(interval=FAST)
    async def new_days(ctx):
        seen.append((ctx.cursor, ctx.last_error))
        n = int(ctx.cursor or "0")
        if n == 2 and ctx.last_error is None:
            raise ConnectionError("the bucket is unreachable")
        if n == 3:
            return [fs.RunRequest("nope")]  # a bad request fails the call like an error
        ctx.cursor = str(n + 1)
        return [fs.RunRequest("raw", f"2026-01-0{n + 1}")] if n < 5 else []

    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: _daemon(rt, p, stop))

            async def failed_on_three() -> bool:
                return len(seen) >= 6

            await until(failed_on_three)
            stop.set()
        saved = await store.load_cursor("sensor:new_days")
    assert seen[:4] == [(None, None), ("1", None), ("2", None),
                        ("2", "ConnectionError: the bucket is unreachable")]  # the same cursor, called again
    assert seen[4] == ("3", None)
    assert seen[5][0] == "3" and "unknown asset 'nope'" in seen[5][1]  # the bad request kept the cursor
    assert saved.value == "3" and "unknown asset 'nope'" in saved.error
    assert {key for asset, key in calls if asset == "raw"} == {"2026-01-01", "2026-01-02", "2026-01-03"}


async def _exists(store, asset, key) -> bool:
    return await store.exists(asset, key)


async def _calls_reach(calls: Calls, key: tuple, count: int) -> bool:
    await anyio.lowlevel.checkpoint()
    return calls[key] >= count


def test_on_missing_looks_that_cost_much_are_spaced_to_a_share_of_the_time():
    """A look reads every partition's state: cheap ones follow the interval, costly
    ones (a million partitions) wait until looks take at most MISSING_SHARE."""
    from flowstone.runtime.automation import MISSING_SHARE, next_look

    assert next_look(100.0, 100.02, 10.0) == 110.0
    spent = 1.5
    due = next_look(100.0, 100.0 + spent, 10.0)
    assert due > 110.0 and spent / (due - 100.0) == pytest.approx(MISSING_SHARE)
