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
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from flowstone.store import Status
from flowstone.store.leases import End, Start

from .report import emit, median
from .stores import add_store_options, on_each_store, server_of

NEW = 10
LOOKS = 5
BATCH = 500


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


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress follow", description=__doc__)
    parser.add_argument("--sizes", default="1000,100000", help="upstream partitions stored, comma-separated")
    add_store_options(parser)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = on_each_store("follow", _measure, sizes, args.dsn, args.backend)
    return emit("follow", rows, {"sizes": sizes, "backend": args.backend, "new": NEW, "looks": LOOKS,
                                 "server": server_of(args.dsn)})
