"""The daemon in one process, on a clock the test moves: the role, a grace period for
work in flight at stop, ticks a dead daemon left, backfills resumed, a lost hold."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.runtime.daemon import ROLE, run_daemon
from flowstone.testing import ManualClock

pytestmark = pytest.mark.anyio

UTC = timezone.utc
START = datetime(2026, 3, 1, 5, 59, 30, tzinfo=UTC)
DAYS = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 1, 20))


class Gate:
    """What the test lets a run do: each run says it started, then waits to be let go."""

    def __init__(self) -> None:
        self.started = 0
        self.release = anyio.Event()


def pipeline(gate: Gate) -> fs.Pipeline:
    p = fs.Pipeline("daemon")

    @p.asset(code_version="1")
    async def report(ctx, deps):
        gate.started += 1
        await gate.release.wait()
        return 1

    @p.asset(partitioned_by=DAYS, code_version="1")
    async def daily(ctx, deps):
        gate.started += 1
        await gate.release.wait()
        return ctx.partition.day

    p.schedule("report", "0 6 * * *")
    return p


async def _first_tick_started(tasks, rt, p, stop, clock, gate, **options) -> None:
    """Start the daemon ("d1") in ``tasks``; move the clock to 06:00 and wait until the
    tick's run is inside the asset function."""
    tasks.start_soon(lambda: run_daemon(rt, p.schedules, stop=stop, owner="d1", clock=clock, **options))
    await until(lambda: _asleep(clock))
    clock.advance(timedelta(seconds=30))

    async def started() -> bool:
        return gate.started == 1

    await until(started)


async def test_stopping_lets_work_in_flight_finish_within_the_grace(anyio_backend):
    gate, clock, stop = Gate(), ManualClock(START), anyio.Event()
    p = pipeline(gate)
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            await _first_tick_started(tasks, rt, p, stop, clock, gate, grace=60)  # waits at the gate
            assert (await store.role_holder(ROLE)).owner == "d1"
            stop.set()  # no more work is taken; the tick in flight may finish

            async def no_scheduler() -> bool:
                return clock.sleeping == 0

            await until(no_scheduler)
            clock.advance(timedelta(days=1))
            gate.release.set()
        [(_, tick)] = (await store.last_ticks()).items()
        assert (tick.at, tick.state) == (START + timedelta(seconds=30), "succeeded")  # and no tick of the next day
        assert await store.role_holder(ROLE) is None  # released: a standby takes over at once


async def test_work_still_running_when_the_grace_ends_is_cancelled_and_recorded(anyio_backend):
    gate, clock, stop = Gate(), ManualClock(START), anyio.Event()
    p = pipeline(gate)
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            await _first_tick_started(tasks, rt, p, stop, clock, gate, grace=0.05)  # waits at the gate
            stop.set()  # the gate never opens
        [(_, tick)] = (await store.last_ticks()).items()
        assert (tick.state, tick.error) == ("cancelled", "the daemon stopped before the tick's run ended")
        [record] = await store.list_all()
        assert record.status is fs.Status.CANCELLED  # every record terminal


async def test_a_standby_waits_and_a_new_daemon_reruns_the_ticks_a_dead_one_left(anyio_backend):
    gate, clock, stop = Gate(), ManualClock(START), anyio.Event()
    gate.release.set()
    p = pipeline(gate)
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        # A daemon died holding the role, in the middle of the 06:00 tick.
        assert (await store.claim_role(ROLE, "dead", 0.2)).owner == "dead"
        orphan = START + timedelta(seconds=30)
        assert await store.claim_tick(p.schedules[0].name, orphan, "dead")
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_daemon(rt, p.schedules, stop=stop, owner="d2", clock=clock, hold=0.3))

            async def rerun() -> bool:
                ticks = await store.last_ticks()
                return bool(ticks) and ticks[p.schedules[0].name].state == "succeeded"

            await until(rerun)  # after the dead one's hold lapsed (0.2 s)
            holder = await store.role_holder(ROLE)
            assert (holder.owner, holder.fence) == ("d2", 2)
            stop.set()
        [(_, tick)] = (await store.last_ticks()).items()
        assert (tick.at, tick.owner, tick.state) == (orphan, "dead", "succeeded") and gate.started == 1
        assert await store.unfinished_ticks() == []


async def test_interrupted_backfills_are_resumed_and_cancelled_ones_are_not(anyio_backend):
    gate, stop = Gate(), anyio.Event()
    gate.release.set()
    p = pipeline(gate)
    store = fs.store.MemoryStore()
    async with store, fs.open_runtime(pipeline(Gate()), store=store) as rt:  # its gate stays shut
        cancelled = await rt.backfill("daily", DAYS.keys(date(2026, 1, 11), date(2026, 1, 20)), max_parallel=1)
        await rt.cancel_backfill(cancelled)
    # A runtime stops under a running backfill: it is saved interrupted.
    held = Gate()
    async with store, fs.open_runtime(pipeline(held), store=store) as rt:
        interrupted = await rt.backfill("daily", DAYS.keys(date(2026, 1, 1), date(2026, 1, 10)), max_parallel=2)

        async def running() -> bool:
            return held.started == 2

        await until(running)
    async with store, fs.open_runtime(p, store=store) as rt:
        assert (await rt.backfill_status(interrupted)).interrupted
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_daemon(rt, p.schedules, stop=stop, owner="d", clock=ManualClock(START)))

            async def finished() -> bool:
                return (await rt.backfill_status(interrupted)).state == "succeeded"

            await until(finished)
            stop.set()
        assert (await rt.backfill_status(interrupted)).succeeded == 10
        again = await rt.backfill_status(cancelled)
        assert (again.state, again.interrupted, again.succeeded) == ("cancelled", False, 0)  # left alone


async def test_a_daemon_that_loses_its_hold_stops_its_work_and_stands_by(anyio_backend):
    gate, clock, stop = Gate(), ManualClock(START), anyio.Event()
    p = pipeline(gate)
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            await _first_tick_started(tasks, rt, p, stop, clock, gate, hold=0.3)  # waits at the gate
            # Another daemon takes the role (as if d1 had been silent past its hold).
            await store.release_role(ROLE, "d1")
            assert (await store.claim_role(ROLE, "d2", 60)).owner == "d2"

            async def stopped_its_tick() -> bool:
                ticks = await store.last_ticks()
                return ticks[p.schedules[0].name].state == "cancelled"

            await until(stopped_its_tick)  # at its next renewal, without waiting for any grace
            assert (await store.role_holder(ROLE)).owner == "d2"  # d1 stands by; it takes nothing back
            stop.set()


async def _asleep(clock: ManualClock) -> bool:
    await anyio.lowlevel.checkpoint()
    return clock.sleeping >= 1


async def test_the_daemon_outlives_a_store_failure_and_goes_on_once_it_is_back(anyio_backend, pg_database, caplog):
    from pgfixtures import admin, run_sync

    from flowstone.store.postgres import PostgresStore

    async def as_admin(statement: str) -> None:  # on a thread of its own: asyncpg, under either backend
        await anyio.to_thread.run_sync(run_sync, admin, pg_database.admin_dsn, statement)

    gate, clock, stop = Gate(), ManualClock(START), anyio.Event()
    gate.release.set()
    p = pipeline(gate)
    name = p.schedules[0].name
    async with PostgresStore(pg_database.dsn) as store, fs.open_runtime(p, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_daemon(rt, p.schedules, stop=stop, owner="d1", clock=clock))
            await until(lambda: _asleep(clock), limit=30)
            # The ticks' table goes away (as a failed migration or an operator might do it).
            await as_admin("ALTER TABLE flowstone_ticks RENAME TO flowstone_ticks_away")
            clock.advance(timedelta(seconds=30))  # 06:00: claiming the tick fails; the daemon lives on

            async def failed() -> bool:  # the schedules' loop failed; it starts again after a pause
                await anyio.lowlevel.checkpoint()
                return any("the schedules failed (DatabaseError" in r.getMessage() for r in caplog.records)

            await until(failed, limit=30)
            await as_admin("ALTER TABLE flowstone_ticks_away RENAME TO flowstone_ticks")

            async def ran() -> bool:
                ticks = await store.last_ticks()
                return name in ticks and ticks[name].state == "succeeded"

            await until(ran, limit=30)  # started again: the 06:00 tick is caught up ("latest")
            assert (await store.role_holder("daemon")).owner == "d1"  # it never stopped being the daemon
            stop.set()
        assert (await store.last_ticks())[name].at == START + timedelta(seconds=30)
