"""Retention over many assets (issue #18): one ``rt.prune()`` pass, each store.

For each ``--store`` (PostgreSQL on a throwaway cluster with fsync on, or ``--dsn``;
the embedded SQLite store in a temporary folder; the memory store): ``--assets``
assets of ``--partitions`` daily partitions each, every partition with
``--history`` superseded records and its current success, written in bulk (the
memory store through its API). Then, in a runtime whose assets all have
``fs.Retention(keep_last=0)``, one ``rt.prune()`` deletes every superseded record:
seconds and microseconds a record deleted; and ``store.partition_states`` of each
asset, which ``flowstone status`` and the web view ask: milliseconds an asset.

Neither should grow with the number of assets: a pass reads each asset's own
records, not the whole store once per asset (``python -m stress cascade`` measures
one asset of up to a million records).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

import anyio

from .cascade import _INSERT, SQLITE_INSERT, migrated_sqlite
from .postgres import _admin, _fresh_database
from .report import emit

START = date(2000, 1, 1)


def _pipeline(assets: int) -> Any:
    import flowstone as fs

    days = fs.DailyPartitions(start=START)
    return fs.Pipeline("retention", assets=[
        fs.Asset(name=f"x{a}", execute_fn=lambda ctx, deps: 1, partitioned_by=days,
                 retention=fs.Retention(keep_last=0))
        for a in range(assets)])


async def _measure(store: Any, assets: int) -> dict[str, Any]:
    import flowstone as fs

    async with store:
        async with fs.open_runtime(_pipeline(assets), store=store) as rt:
            start = time.perf_counter()
            deleted = await rt.prune()
            pruned = time.perf_counter() - start
            start = time.perf_counter()
            sizes = [len(await store.partition_states(f"x{a}")) for a in range(assets)]
            states = time.perf_counter() - start
    return {"deleted": sum(deleted.values()), "pruned": pruned, "states": states, "sizes": sizes}


async def _fill_postgres(admin_dsn: str, database: str, assets: int, partitions: int, history: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(f"{admin_dsn.rpartition('/')[0]}/{database}")
    try:
        for a in range(assets):
            for status in ["superseded"] * history + ["success"]:
                await connection.execute(_INSERT, f"x{a}", status, [], partitions)
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


def _fill_sqlite(path: str, assets: int, partitions: int, history: int) -> None:
    import sqlite3
    import uuid

    now = datetime.now(timezone.utc).isoformat()
    days = [(START + timedelta(days=i)).isoformat() for i in range(partitions)]
    with sqlite3.connect(path) as db:
        for a in range(assets):
            for status in ["superseded"] * history + ["success"]:
                db.executemany(SQLITE_INSERT, [(str(uuid.uuid4()), f"x{a}", day, str(uuid.uuid4()), status, "[]", "{}",
                                                now, now) for day in days])
        db.execute("ANALYZE")


async def _on_memory(assets: int, partitions: int, history: int) -> dict[str, Any]:
    import flowstone as fs

    store = fs.store.MemoryStore()
    days = [(START + timedelta(days=i)).isoformat() for i in range(partitions)]
    async with store:  # filled, then measured as the other stores are (the data stays with the store)
        for a in range(assets):
            for status in [fs.Status.SUPERSEDED] * history + [fs.Status.SUCCESS]:
                for day in days:
                    await store.create(asset_name=f"x{a}", partition=day, status=status)
    return await _measure(store, assets)


def _on_sqlite(assets: int, partitions: int, history: int) -> dict[str, Any]:
    import flowstone as fs

    with migrated_sqlite("flowstone-retention-") as path:
        _fill_sqlite(path, assets, partitions, history)
        return anyio.run(_measure, fs.store.SqliteStore(path), assets)


def _on_postgres(admin_dsn: str, assets: int, partitions: int, history: int) -> dict[str, Any]:
    import flowstone as fs

    name = "flowstone_bench_retention"
    dsn = anyio.run(_fresh_database, admin_dsn, name)
    try:
        anyio.run(_fill_postgres, admin_dsn, name, assets, partitions, history)
        return anyio.run(_measure, fs.store.PostgresStore(dsn), assets)
    finally:
        anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(argv: list[str]) -> dict[str, Any]:
    from flowstone.testing.postgres import TemporaryPostgres

    parser = argparse.ArgumentParser(prog="python -m stress retention", description=__doc__)
    parser.add_argument("--store", choices=["postgres", "sqlite", "memory"], action="append",
                        help="the stores to measure (repeatable; default: all three)")
    parser.add_argument("--assets", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=500, help="daily partitions per asset")
    parser.add_argument("--history", type=int, default=1, help="superseded records per partition")
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    args = parser.parse_args(argv)
    stores = args.store or ["postgres", "sqlite", "memory"]
    shape = (args.assets, args.partitions, args.history)
    rows = []
    for kind in stores:
        if kind == "postgres":
            cluster = None if args.dsn else TemporaryPostgres(fsync=True).start()
            try:
                found = _on_postgres(args.dsn if cluster is None else cluster.dsn(), *shape)
            finally:
                if cluster is not None:
                    cluster.stop()
        elif kind == "sqlite":
            found = _on_sqlite(*shape)
        else:
            found = anyio.run(_on_memory, *shape)
        expected = args.assets * args.partitions * args.history
        if found["deleted"] != expected or found["sizes"] != [args.partitions] * args.assets:
            raise SystemExit(f"{kind}: deleted {found['deleted']} of {expected} superseded records")
        rows.append({
            "store": kind, "assets": args.assets, "partitions": args.partitions,
            "records": args.assets * args.partitions * (1 + args.history), "pruned": found["deleted"],
            "prune_s": round(found["pruned"], 2),
            "prune_us_per_record": round(1e6 * found["pruned"] / max(found["deleted"], 1), 1),
            "partition_states_ms_per_asset": round(1e3 * found["states"] / args.assets, 2),
        })
    return emit("retention", rows, {k: v for k, v in vars(args).items() if k != "dsn"})
