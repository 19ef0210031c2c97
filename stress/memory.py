"""Where a backfill's memory goes: the records it writes, or the runtime itself?

Runs the same backfill at two sizes under tracemalloc and attributes what is
still allocated at the end to the module that allocated it. Growth that
belongs to the store (records, their indexes, the stored values) is expected;
the runtime's own share (backfill, runs, executors) must not grow with the
number of finished partitions beyond the partition list the backfill was given.
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from collections import Counter
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs

from .report import emit
from .runtime import daily

STORE = ("flowstone/store/", "flowstone/io/")
RUNTIME = ("flowstone/runtime/", "flowstone/actors/mailbox.py", "flowstone/actors/supervisor.py")


async def _backfill(count: int) -> Counter[str]:
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with fs.open_runtime(daily(False)) as rt:
        gc.collect()
        tracemalloc.start(1)
        backfill = await rt.backfill("events", partitions=days, max_parallel=20)
        status = await rt.wait_backfill(backfill)
        assert status.succeeded == count, status
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
    by_part: Counter[str] = Counter()
    for stat in snapshot.statistics("filename"):
        name = stat.traceback[0].filename.replace("\\", "/")
        part = "store" if any(s in name for s in STORE) else "runtime" if any(r in name for r in RUNTIME) else "other"
        by_part[part] += stat.size
    return by_part


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress memory", description=__doc__)
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--large", type=int, default=20_000)
    args = parser.parse_args(argv)
    small = anyio.run(_backfill, args.small)
    large = anyio.run(_backfill, args.large)
    extra = args.large - args.small
    rows = [
        {
            "allocated_by": part,
            f"bytes_at_{args.small}": small[part],
            f"bytes_at_{args.large}": large[part],
            "bytes_per_extra_partition": (large[part] - small[part]) / extra,
        }
        for part in ("store", "runtime", "other")
    ]
    return emit("memory", rows, {"small": args.small, "large": args.large})
