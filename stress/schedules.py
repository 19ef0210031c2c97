"""Schedules at speed (issue #15 figure): many schedules through an accelerated hour.

``--schedules`` schedules (every minute, every 5 minutes, every 15 minutes, in
turn) on trivial hourly-partitioned assets run for ``--minutes`` minutes of
injected-clock time (``flowstone.testing.ManualClock``), the clock advanced a
minute at a time once the scheduler has dealt with the previous one. Then every
tick is checked: each one due was recorded exactly once, none is missing and
none still running. Prints how long the accelerated run took.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio

import flowstone as fs
from flowstone.runtime.scheduler import run_schedules
from flowstone.testing import ManualClock

from .report import emit

CRONS = ("* * * * *", "*/5 * * * *", "*/15 * * * *")


def _pipeline(count: int) -> tuple[fs.Pipeline, list[fs.Schedule]]:
    pipeline = fs.Pipeline("scheduled")
    hours = fs.HourlyPartitions(start=datetime(2025, 12, 31, tzinfo=timezone.utc))
    schedules = []
    for index in range(count):
        async def work(ctx: Any, deps: Any) -> int:
            return 1

        pipeline.add(fs.Asset(name=f"asset_{index}", execute_fn=work, partitioned_by=hours, code_version="1"))
        schedules.append(pipeline.schedule(f"asset_{index}", CRONS[index % len(CRONS)]))
    return pipeline, schedules


async def _run(count: int, minutes: int, store_kind: str, folder: str) -> dict[str, Any]:
    pipeline, schedules = _pipeline(count)
    start = datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc)
    clock = ManualClock(start)
    store = fs.store.SqliteStore(f"{folder}/schedules.db") if store_kind == "sqlite" else None
    claimed: dict[tuple[str, datetime], int] = {}
    began = time.perf_counter()
    async with fs.open_runtime(pipeline, store=store) as rt:
        original = rt.store.claim_tick

        async def counting(schedule: str, at: datetime, owner: str) -> bool:
            won: bool = await original(schedule, at, owner)
            if won:
                claimed[(schedule, at)] = claimed.get((schedule, at), 0) + 1
            return won

        rt.store.claim_tick = counting  # type: ignore[method-assign]  # counts what the scheduler claims
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_schedules(rt, schedules, "stress", clock=clock))
            for _ in range(minutes):
                await _settled(rt.store, clock)
                clock.advance(timedelta(minutes=1))
            await _settled(rt.store, clock)
            tasks.cancel_scope.cancel()
        last = await rt.store.last_ticks()
    elapsed = time.perf_counter() - began
    if store is not None:
        await store.close()
    expected = {(s.name, t) for s in schedules for t in s.ticks(start, start + timedelta(minutes=minutes))}
    doubled = sum(1 for n in claimed.values() if n > 1)
    missing = len(expected - set(claimed))
    extra = len(set(claimed) - expected)
    running = sum(1 for t in last.values() if t.state == "running")
    if doubled or missing or extra or running:
        raise SystemExit(f"ticks wrong: {doubled} doubled, {missing} missing, {extra} unexpected, {running} running")
    return {"ticks": len(expected), "seconds": elapsed, "ticks_per_second": len(expected) / elapsed}


async def _settled(store: Any, clock: ManualClock) -> None:
    while True:
        if clock.sleeping >= 1 and all(t.state != "running" for t in (await store.last_ticks()).values()):
            return
        await anyio.lowlevel.checkpoint()


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress schedules", description=__doc__)
    parser.add_argument("--schedules", type=int, default=100)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flowstone-schedules-") as folder:
        outcome = anyio.run(_run, args.schedules, args.minutes, args.store, folder, backend=args.backend)
    rows = [{
        "scenario": f"{args.schedules} schedules through {args.minutes} accelerated minutes ({args.store} store)",
        **outcome, "doubled": 0, "missing": 0,
    }]
    return emit("schedules", rows, vars(args))
