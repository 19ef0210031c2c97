"""Where plain functions run: a CPU-bound backfill with ``executor="thread"`` and ``"process"``.

Each partition's function is pure Python arithmetic (``--work`` loop turns, about
a third of a second each by default on this machine), so threads take turns on
the GIL while worker processes run side by side, one per CPU. The backfill has
``--partitions`` partitions (default 8) and as many parallel workers. Each
executor runs ``--repeat`` times in one runtime; the first process run includes
starting the worker processes (shown on its own row), the others reuse them.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from typing import Any

import anyio

import flowstone as fs

from .report import emit, median

DAILY = fs.DailyPartitions(start=date(2025, 1, 1))


def crunch(ctx: fs.Context, deps: dict[str, Any]) -> int:
    """CPU-bound and GIL-bound: a loop of integer arithmetic."""
    total = 0
    for i in range(ctx.asset.metadata["work"]):
        total = (total + i * i) % 1_000_003
    return total


async def _backfills(executor: str, partitions: int, work: int, repeat: int) -> list[float]:
    asset = fs.Asset(name="crunch", execute_fn=crunch, partitioned_by=DAILY, executor=executor,
                     metadata={"work": work})
    days = fs.partition_range(date(2025, 1, 1), date(2025, 1, partitions), "day")
    samples = []
    async with fs.open_runtime([asset]) as rt:
        for _ in range(repeat):
            began = time.perf_counter()
            status = await rt.wait_backfill(await rt.backfill("crunch", days, max_parallel=partitions, force=True))
            samples.append(time.perf_counter() - began)
            if status.succeeded != partitions:
                raise SystemExit(f"{executor}: {status.failed} partitions failed: {status.errors[:3]}")
    return samples


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress executors", description=__doc__)
    parser.add_argument("--partitions", type=int, default=8, help="partitions (and parallel workers) per backfill")
    parser.add_argument("--work", type=int, default=3_000_000, help="loop turns per partition")
    parser.add_argument("--repeat", type=int, default=3, help="backfills per executor (median of the warm ones)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    partitions, work, repeat = max(1, min(args.partitions, 31)), max(1, args.work), max(2, args.repeat)

    rows = []
    by_executor: dict[str, float] = {}
    for executor in ("thread", "process"):
        samples = anyio.run(_backfills, executor, partitions, work, repeat, backend=args.backend)
        warm = median(samples[1:])
        by_executor[executor] = warm
        if executor == "process":
            rows.append({"executor": "process, first (starts workers)", "partitions": partitions,
                         "seconds": samples[0], "partitions_per_s": partitions / samples[0]})
        rows.append({"executor": executor, "partitions": partitions, "seconds": warm,
                     "partitions_per_s": partitions / warm})
    rows.append({"executor": "speed-up, process over thread", "partitions": partitions,
                 "seconds": by_executor["thread"] / by_executor["process"]})
    return emit("executors", rows, {"partitions": partitions, "work": work, "repeat": repeat,
                                    "backend": args.backend, "cpus": os.cpu_count()})
