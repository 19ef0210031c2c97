"""Backfills with records in the embedded SQLite store (issue #14 figures).

Each run uses a fresh file in a temporary folder on the local disk. Asset
functions are trivial ``async def``s with memory I/O: what is measured is
FlowStone's record keeping in SQLite, with WAL and the store's default
``synchronous=NORMAL`` (fsync at checkpoints) or ``--synchronous FULL`` (every
commit fsynced). The memory store's figure for the same backfill, measured in the
same run, is the runtime's own share: the machine's speed varies from day to day. The status read is the
command line's ``status``: the state of every partition of an asset.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import anyio

import flowstone as fs
from flowstone.store import SqliteStore

from .report import emit, median
from .runtime import collector_as_cli, daily


async def _backfill(path: Path, count: int, synchronous: str, tune_gc: bool) -> tuple[float, float]:
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with SqliteStore(path, synchronous=synchronous) as store:
        await store.list_all(limit=1)  # open and migrate before the clock starts
        async with fs.open_runtime(daily(False), store=store) as rt:
            with collector_as_cli(tune_gc):  # start-up is done: as the command line does (``--tune-gc``)
                start, cpu = time.perf_counter(), time.process_time()
                backfill = await rt.backfill("events", partitions=days, max_parallel=20)
                status = await rt.wait_backfill(backfill)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        records = await store.list_by_status("success", limit=count + 1)
    if status.succeeded != count or len(records) != count:
        raise SystemExit(f"backfill incomplete: {status} with {len(records)} success records")
    return elapsed, cpu


async def _backfill_in_memory(count: int) -> float:
    """The same backfill on the memory store: the runtime's own share, for comparison."""
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with fs.open_runtime(daily(False)) as rt:
        start = time.perf_counter()
        status = await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=20))
        elapsed = time.perf_counter() - start
    if status.succeeded != count:
        raise SystemExit(f"backfill incomplete: {status}")
    return elapsed


async def _read_status(path: Path) -> tuple[float, int]:
    async with SqliteStore(path) as store:
        await store.list_all(limit=1)
        start = time.perf_counter()
        states = await store.partition_states("events")
        return time.perf_counter() - start, len(states)


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress sqlite", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", type=int, default=10_000, help="partitions in the throughput run (0 skips it)")
    parser.add_argument("--status", type=int, default=100_000, help="partitions whose status is read (0 skips it)")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="NORMAL")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tune-gc", action="store_true",
                        help="set the garbage collector once each runtime is open, as the command line does")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flowstone-sqlite-", dir=".") as folder:
        def measure(count: int, label: str, target: dict[str, Any], repeat: int) -> Path:
            samples, busy = [], []
            for attempt in range(repeat):
                path = Path(folder) / f"{count}-{attempt}.db"
                elapsed, cpu = anyio.run(_backfill, path, count, args.synchronous, args.tune_gc,
                                        backend=args.backend)
                samples.append(elapsed)
                busy.append(cpu / elapsed)
            middle = median(samples)
            rows.append({
                "scenario": label, "median_ms": middle * 1e3, "best_ms": min(samples) * 1e3,
                "per_second": count / middle, "us_per_materialization": middle * 1e6 / count,
                "cpu_share": median(busy), **target,
            })
            return path

        for count in (366, args.big):
            if count:
                memory = [anyio.run(_backfill_in_memory, count, backend=args.backend) for _ in range(args.repeat)]
                rows.append({
                    "scenario": f"{count} partitions on the memory store (the runtime's own share)",
                    "median_ms": median(memory) * 1e3, "best_ms": min(memory) * 1e3,
                    "per_second": count / median(memory), "us_per_materialization": median(memory) * 1e6 / count,
                })
        sync = f"synchronous={args.synchronous}"
        measure(366, f"366 daily partitions, max_parallel=20, SQLite ({sync})", {"target_ms": 300}, args.repeat)
        if args.big:
            measure(args.big, f"{args.big} partitions, max_parallel=20, SQLite ({sync})",
                    {"target_per_second": 5000}, 1)
        if args.status:
            path = measure(args.status, f"{args.status} partitions (to read their status), SQLite ({sync})", {}, 1)
            reads = [anyio.run(_read_status, path, backend=args.backend) for _ in range(max(1, args.repeat))]
            if reads[0][1] != args.status:
                raise SystemExit(f"status read {reads[0][1]} partitions, expected {args.status}")
            rows.append({
                "scenario": f"status of {args.status} partitions (one asset)",
                "median_ms": median([r[0] for r in reads]) * 1e3, "best_ms": min(r[0] for r in reads) * 1e3,
                "target_ms": 200,
            })
    return emit(
        "sqlite", rows,
        {"backend": args.backend, "big": args.big, "status": args.status, "repeat": args.repeat,
         "synchronous": args.synchronous, "tune_gc": args.tune_gc},
    )
