"""The stale cascade and retention at growing record counts (issue #18).

On a throwaway PostgreSQL cluster (fsync on) or ``--dsn`` (``--store sqlite``: the
embedded store, in a temporary folder; ``--store memory``: the memory store, filled
through its API), for each of ``--sizes``:
``raw`` and ``clean`` (which reads ``raw`` of the same day) get that many daily
partitions of success records, written in bulk (the figures are about reading them
back, not writing them). Then:

- the stale cascade: ``store.mark_stale("raw", day)`` for ``--samples`` days, each
  turning one ``clean`` success stale: milliseconds per cascade (median, max);
- retention: with ``--history`` superseded records per ``raw`` partition as well,
  ``rt.prune()`` under ``fs.Retention(keep_last=0)`` deletes them all: seconds, and
  microseconds per record deleted.

The cost of one cascade should not depend on the size of the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from .postgres import _admin, _fresh_database
from .report import emit

_INSERT = """
INSERT INTO flowstone_materializations (id, tenant_id, asset_name, partition, run_id, status, upstream_assets,
    upstream_partitions, metadata, inserted_at, updated_at)
SELECT gen_random_uuid(), '', $1, to_char(date '2000-01-01' + i, 'YYYY-MM-DD'), gen_random_uuid(), $2,
       $3::text[], CASE WHEN $3::text[] = '{}' THEN '{}'::jsonb
                        ELSE jsonb_build_object('raw', jsonb_build_array(to_char(date '2000-01-01' + i, 'YYYY-MM-DD')))
                   END,
       '{}', now(), now()
FROM generate_series(0, $4 - 1) i
"""


SQLITE_INSERT = (
    "INSERT INTO flowstone_materializations (id, tenant_id, asset_name, partition, run_id, status, upstream_assets, "
    "upstream_partitions, metadata, inserted_at, updated_at) VALUES (?, '', ?, ?, ?, ?, ?, ?, '{}', ?, ?)")
"""A record of the default tenant written straight into an embedded store's file: (id,
asset, partition, run id, status, upstream assets and partitions as JSON, times)."""


async def _fill(admin_dsn: str, database: str, size: int, history: int) -> None:
    import asyncpg

    head = admin_dsn.rpartition("/")[0]
    connection = await asyncpg.connect(f"{head}/{database}")
    try:
        for _ in range(history):
            await connection.execute(_INSERT, "raw", "superseded", [], size)
        await connection.execute(_INSERT, "raw", "success", [], size)
        await connection.execute(_INSERT, "clean", "success", ["raw"], size)
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


def _fill_sqlite(path: str, size: int, history: int) -> None:
    import json
    import sqlite3
    import uuid
    from datetime import date, datetime, timedelta, timezone

    now = datetime.now(timezone.utc).isoformat()
    days = [(date(2000, 1, 1) + timedelta(days=i)).isoformat() for i in range(size)]

    def rows(asset: str, status: str, reads: bool) -> Any:
        for day in days:
            yield (str(uuid.uuid4()), asset, day, str(uuid.uuid4()), status, '["raw"]' if reads else "[]",
                   json.dumps({"raw": [day]}) if reads else "{}", now, now)

    with sqlite3.connect(path) as db:
        for asset, status, reads in [("raw", "superseded", False)] * history + [
                ("raw", "success", False), ("clean", "success", True)]:
            db.executemany(SQLITE_INSERT, rows(asset, status, reads))
        db.execute("ANALYZE")


async def _measure(store: Any, size: int, samples: int) -> dict[str, Any]:
    from datetime import date, timedelta

    import flowstone as fs

    days = [(date(2000, 1, 1) + timedelta(days=size * n // samples)).isoformat() for n in range(samples)]
    async with store:
        await store.mark_stale("raw", days[0])  # the pool opened, the statement prepared
        times = []
        for day in days[1:]:
            start = time.perf_counter()
            await store.mark_stale("raw", day)
            times.append(1000 * (time.perf_counter() - start))
        stale = len(await store.list_by_status(fs.Status.STALE, limit=samples + 1))
        pipeline = fs.Pipeline("cascade")
        pipeline.add(fs.Asset(name="raw", execute_fn=lambda ctx, deps: 1, partitioned_by=fs.DailyPartitions(
            start=date(2000, 1, 1)), retention=fs.Retention(keep_last=0)))
        async with fs.open_runtime(pipeline, store=store) as rt:
            start = time.perf_counter()
            deleted = (await rt.prune())["raw"]
            pruned = time.perf_counter() - start
    return {"times": times, "stale": stale, "deleted": deleted, "pruned": pruned}


def run(argv: list[str]) -> dict[str, Any]:
    from flowstone.testing.postgres import TemporaryPostgres

    parser = argparse.ArgumentParser(prog="python -m stress cascade", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    parser.add_argument("--sizes", default="1000,100000", help="partitions per asset, comma-separated")
    parser.add_argument("--samples", type=int, default=50, help="cascades timed per size")
    parser.add_argument("--history", type=int, default=2, help="superseded records per raw partition")
    parser.add_argument("--store", choices=["postgres", "sqlite", "memory"], default="postgres")
    args = parser.parse_args(argv)
    cluster = None if args.dsn or args.store != "postgres" else TemporaryPostgres(fsync=True).start()
    admin_dsn = args.dsn or (cluster.dsn() if cluster is not None else "")
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            if args.store == "sqlite":
                found = _on_sqlite(size, args)
            elif args.store == "memory":
                found = anyio.run(_on_memory, size, args.samples, args.history)
            else:
                name = f"flowstone_bench_cascade_{size}"
                dsn = anyio.run(_fresh_database, admin_dsn, name)
                try:
                    anyio.run(_fill, admin_dsn, name, size, args.history)
                    found = anyio.run(_measure, _postgres(dsn), size, args.samples)
                finally:
                    anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            if found["stale"] != args.samples:
                raise SystemExit(f"{found['stale']} stale records after {args.samples} cascades")
            times = found["times"]
            rows.append({
                "store": args.store, "records": size * (2 + args.history), "partitions": size,
                "cascade_median_ms": round(statistics.median(times), 2), "cascade_max_ms": round(max(times), 2),
                "pruned": found["deleted"], "prune_s": round(found["pruned"], 2),
                "prune_us_per_record": round(1e6 * found["pruned"] / max(found["deleted"], 1), 1),
            })
    finally:
        if cluster is not None:
            cluster.stop()
    return emit("cascade", rows, {k: v for k, v in vars(args).items() if k != "dsn"})


def _postgres(dsn: str) -> Any:
    import flowstone as fs

    return fs.store.PostgresStore(dsn)


@contextmanager
def migrated_sqlite(prefix: str) -> Iterator[str]:
    """The path of an embedded store's file, migrated, in a temporary folder (gone after)."""
    import tempfile
    from pathlib import Path

    import flowstone as fs

    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        path = str(Path(folder) / "flowstone.db")

        async def migrate() -> None:
            async with fs.store.SqliteStore(path) as store:
                await store.migrate()

        anyio.run(migrate)
        yield path


def _on_sqlite(size: int, args: argparse.Namespace) -> dict[str, Any]:
    import flowstone as fs

    with migrated_sqlite("flowstone-cascade-") as path:
        _fill_sqlite(path, size, args.history)
        return anyio.run(_measure, fs.store.SqliteStore(path), size, args.samples)


async def _on_memory(size: int, samples: int, history: int) -> dict[str, Any]:
    from datetime import date, timedelta

    import flowstone as fs

    store = fs.store.MemoryStore()
    days = [(date(2000, 1, 1) + timedelta(days=i)).isoformat() for i in range(size)]
    async with store:  # filled, then measured as the other stores are (the data stays with the store)
        for _ in range(history):
            for day in days:
                await store.create(asset_name="raw", partition=day, status=fs.Status.SUPERSEDED)
        for day in days:
            await store.create(asset_name="raw", partition=day, status=fs.Status.SUCCESS)
            await store.create(asset_name="clean", partition=day, status=fs.Status.SUCCESS,
                               upstream_assets=("raw",), upstream_partitions={"raw": (day,)})
    return await _measure(store, size, samples)
