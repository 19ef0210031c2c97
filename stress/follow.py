"""What the daemon's look for an eager asset's new upstream successes costs.

Every ``AUTOMATION_SECONDS`` the active daemon asks, for each ``fs.Eager()`` asset,
what its upstream assets succeeded at since its last look. For each store (memory,
SQLite, and PostgreSQL on a throwaway cluster with fsync on, or ``--dsn``) and each
size, an upstream asset gets that many partitions' successes, then ``NEW`` more
after the store's mark; the look (``successes_after``) is timed against reading
every partition's current record (``partitions_of``: what a look read before it
asked for changes, and about what a look kept as a time read behind a backfill,
which read the last minute's successes again each time). Flat means the look costs
the same at every size: what happened since, not what is stored.

``--behind N`` adds the whole of it on the memory store: the daemon's automation,
looking every ``BEHIND_INTERVAL`` seconds, follows an eager asset while its upstream
asset is backfilled over N partitions in the same runtime; the row says when the
upstream backfill ended, when every partition had been followed, and the CPU spent.
"""

from __future__ import annotations

import argparse
import functools
import time
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs
from flowstone.runtime.automation import run_automation
from flowstone.store import MemoryStore, Status
from flowstone.store.leases import End, Start

from .report import emit, median
from .stores import add_store_options, on_each_store, server_of

NEW = 10
LOOKS = 5
BATCH = 500
BEHIND_INTERVAL = 1.0


async def _successes(store: Any, keys: range) -> Any:
    """A success of partition ``p<key>`` of ``up`` for each key, ``BATCH`` at a time; the last one."""
    last = None
    for first in range(keys.start, keys.stop, BATCH):
        begun = await store.begin_many("bench", 60.0, [
            Start({"asset_name": "up", "partition": f"p{key:08d}", "status": Status.RUNNING})
            for key in range(first, min(first + BATCH, keys.stop))
        ])
        done = await store.complete_many([End(record, Status.SUCCESS, lease, {}) for record, lease in begun])
        last = done[-1]
    return last


async def _measure(store: Any, count: int) -> dict[str, float]:
    await _successes(store, range(count))
    _, mark = await store.successes_after("up", None)
    await _successes(store, range(count, count + NEW))
    looks = []
    for _ in range(LOOKS):
        start = time.perf_counter()
        found, _ = await store.successes_after("up", mark)
        looks.append((time.perf_counter() - start) * 1e3)
    if len(found) != NEW:
        raise SystemExit(f"{type(store).__name__}: {len(found)} successes since the mark, not {NEW}")
    start = time.perf_counter()
    every = await store.partitions_of("up")
    whole = (time.perf_counter() - start) * 1e3
    if len(every) != count + NEW:
        raise SystemExit(f"{type(store).__name__}: {len(every)} partitions, not {count + NEW}")
    return {"look_ms": median(looks), "every_partition_ms": whole}


async def _behind(count: int) -> dict[str, Any]:
    """An eager follower behind an upstream backfill of ``count`` partitions (see the
    module's doc)."""
    days = fs.DailyPartitions(start=date(1950, 1, 1))
    pipeline = fs.Pipeline("behind")

    @pipeline.asset(partitioned_by=days, code_version="1")
    async def raw(ctx: Any, deps: Any) -> int:
        return 1

    @pipeline.asset(depends_on=["raw"], partitioned_by=days, code_version="1", automation=fs.Eager())
    async def clean(ctx: Any, deps: Any) -> int:
        return int(deps["raw"]) + 1

    keys = [date(1950, 1, 1) + timedelta(days=i) for i in range(count)]
    async with MemoryStore() as store, fs.open_runtime(pipeline, store=store) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(run_automation, rt, tasks, interval=BEHIND_INTERVAL))
            while await store.load_cursor("automation:clean") is None:  # its first look: from now on
                await anyio.sleep(0.01)
            cpu, start = time.process_time(), time.perf_counter()
            await rt.wait_backfill(await rt.backfill("raw", keys, max_parallel=20))
            upstream = time.perf_counter() - start
            while sum(state is Status.SUCCESS for state in (await store.partition_states("clean")).values()) < count:
                await anyio.sleep(0.1)
            followed, cpu = time.perf_counter() - start, time.process_time() - cpu
            tasks.cancel_scope.cancel()
    return {"store": "memory, behind a backfill", "partitions": count, "upstream_s": upstream,
            "all_followed_s": followed, "cpu_s": cpu}


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress follow", description=__doc__)
    parser.add_argument("--sizes", default="1000,100000", help="upstream partitions stored, comma-separated")
    parser.add_argument("--behind", type=int, default=0,
                        help="also follow an asset behind an upstream backfill of this many partitions (0: not)")
    add_store_options(parser)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = on_each_store("follow", _measure, sizes, args.dsn, args.backend)
    if args.behind:
        rows.append(anyio.run(_behind, args.behind, backend=args.backend))
    return emit("follow", rows, {"sizes": sizes, "backend": args.backend, "new": NEW, "looks": LOOKS,
                                 "behind": args.behind, "behind_interval_s": BEHIND_INTERVAL,
                                 "server": server_of(args.dsn)})
