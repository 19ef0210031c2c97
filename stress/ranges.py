"""A backfill over a big lazy range: ``--hours`` hourly partitions (default 10 million).

Measures how long ``rt.backfill`` takes to return and how much resident memory
grows by then, on the memory store and on PostgreSQL (a throwaway cluster, fsync
on, or ``--dsn``), plus the size of the saved spec (PostgreSQL keeps the range's
two ends and step, not the list). The backfill then runs for ``--run`` seconds,
is cancelled, and resumed once from the store to show the saved range is usable.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio

import flowstone as fs
from flowstone.testing.postgres import TemporaryPostgres

from .postgres import _admin, _fresh_database
from .report import emit, rss_bytes

START = datetime(2000, 1, 1, tzinfo=timezone.utc)


def _asset() -> fs.Asset:
    async def hour(ctx: fs.Context, deps: dict[str, Any]) -> int:
        return ctx.partition.hour

    return fs.Asset(name="hourly", execute_fn=hour, partitioned_by=fs.HourlyPartitions(start=START), code_version="1")


async def _measure(store: Any, hours: int, run_seconds: float) -> dict[str, Any]:
    days = fs.partition_range(START, START + timedelta(hours=hours - 1), "hour")
    async with fs.open_runtime([_asset()], store=store) as rt:
        await store.list_all(limit=1)  # connected before the clock starts
        before = rss_bytes()
        began = time.perf_counter()
        backfill = await rt.backfill("hourly", days, max_parallel=10)
        returned = time.perf_counter() - began
        grown = rss_bytes() - before
        await anyio.sleep(run_seconds)  # let it work, then stop it: the figure is the start, not the run
        status = await rt.cancel_backfill(backfill)
        resumed = await rt.resume_backfill(backfill)
        again = await rt.backfill_status(resumed)
        await rt.cancel_backfill(resumed)
    return {
        "partitions": len(days), "return_ms": returned * 1e3, "rss_growth_mb": grown / 1e6,
        "done_before_cancel": status.succeeded, "resumed_total": again.total,
    }


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress ranges", description=__doc__)
    parser.add_argument("--hours", type=int, default=10_000_000)
    parser.add_argument("--run", type=float, default=1.0, help="seconds the backfill runs before it is cancelled")
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    hours, run_seconds = max(1, args.hours), max(0.0, args.run)

    async def on_memory() -> dict[str, Any]:
        async with fs.store.MemoryStore() as store:
            return await _measure(store, hours, run_seconds)

    rows = [{"store": "memory", **anyio.run(on_memory, backend=args.backend)}]
    if not args.no_postgres:
        cluster = None if args.dsn else TemporaryPostgres().start()
        admin_dsn = args.dsn or cluster.dsn()
        try:
            dsn = anyio.run(_fresh_database, admin_dsn, "flowstone_ranges")

            async def on_postgres() -> dict[str, Any]:
                async with fs.store.PostgresStore(dsn) as store:
                    return await _measure(store, hours, run_seconds)

            async def saved_spec_bytes() -> int:
                import asyncpg

                connection = await asyncpg.connect(admin_dsn.rsplit("/", 1)[0] + "/flowstone_ranges")
                try:
                    return await connection.fetchval("SELECT max(octet_length(spec::text)) FROM flowstone_backfills")
                finally:
                    await connection.close()

            row = anyio.run(on_postgres, backend=args.backend)
            rows.append({"store": "postgres", **row, "saved_spec_bytes": anyio.run(saved_spec_bytes)})
            anyio.run(_admin, admin_dsn, "DROP DATABASE IF EXISTS flowstone_ranges WITH (FORCE)")
        finally:
            if cluster is not None:
                cluster.stop()
    return emit("ranges", rows, {"hours": hours, "run": run_seconds, "backend": args.backend})
