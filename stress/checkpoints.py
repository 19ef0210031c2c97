"""What a backfill's saves and listings cost as its list of partitions grows.

A backfill given its partitions as a list (not a range) saves that list in its
spec: 13 MB of JSON for a million dates. For each store (memory, SQLite, and
PostgreSQL on a throwaway cluster with fsync on, or ``--dsn``) and each size, one
backfill is saved as a running backfill saves itself: a first save, then
checkpoints of the same spec (its status moving), then a listing of statuses (what
the daemon, the web view and ``flowstone backfills`` ask) and its status alone (what
the web view's progress polls), each against the whole backfills (specs parsed).
Flat means a checkpoint and the statuses cost the same at every size; the first
save and the whole backfills grow.
"""

from __future__ import annotations

import argparse
import functools
import time
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import attrs

from flowstone.store.backfills import BackfillSpec, BackfillStatus, Saved

from .report import emit, median
from .stores import add_store_options, on_each_store, server_of

CHECKPOINTS = 5


async def _measure(store: Any, count: int) -> dict[str, float]:
    backfill = uuid.uuid4()
    days = tuple(date(2000, 1, 1) + timedelta(days=i) for i in range(count))
    spec = BackfillSpec(id=backfill, asset="events", partitions=days, max_parallel=20, upstream="missing",
                        force=False, io=None, context=None, tenant=None)
    status = BackfillStatus(id=backfill, asset="events", state="running", total=count, queued=count, running=0,
                            succeeded=0, failed=0, cancelled=0)
    await store.list_all(limit=1)  # connected before the clock starts

    async def timed(call: Callable[[], Any]) -> float:
        start = time.perf_counter()
        await call()
        return (time.perf_counter() - start) * 1e3

    first = await timed(lambda: store.save_backfill(backfill, Saved(spec, status), owner="bench"))
    checkpoints = []
    for done in range(1, CHECKPOINTS + 1):
        moved = Saved(spec, attrs.evolve(status, queued=count - done, succeeded=done))
        checkpoints.append(await timed(functools.partial(store.save_backfill, backfill, moved, owner="bench")))
    statuses = await timed(lambda: store.list_backfill_statuses())
    whole = await timed(lambda: store.list_backfills())
    status_alone = await timed(lambda: store.load_backfill_status(backfill))
    loaded = await timed(lambda: store.load_backfill(backfill))
    [listed] = await store.list_backfill_statuses()
    last = (await store.load_backfill(backfill)).spec.partitions[-1]  # a date, or its key from a database
    if listed.succeeded != CHECKPOINTS or str(last) != days[-1].isoformat():
        raise SystemExit(f"{type(store).__name__}: the saves did not land: {listed}")
    return {"first_save_ms": first, "checkpoint_ms": median(checkpoints), "list_statuses_ms": statuses,
            "list_whole_ms": whole, "load_status_ms": status_alone, "load_whole_ms": loaded}


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress checkpoints", description=__doc__)
    parser.add_argument("--sizes", default="10000,1000000", help="partitions in the backfill, comma-separated")
    add_store_options(parser)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = on_each_store("checkpoints", _measure, sizes, args.dsn, args.backend)
    return emit("checkpoints", rows, {"sizes": sizes, "backend": args.backend, "checkpoints": CHECKPOINTS,
                                      "server": server_of(args.dsn)})
