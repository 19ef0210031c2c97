"""One measurement on each store: memory, SQLite (a temporary file) and PostgreSQL
(a fresh database on a throwaway cluster with fsync on, or on ``--dsn``)."""

from __future__ import annotations

import os
import tempfile
from argparse import ArgumentParser
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from flowstone.store import MemoryStore, PostgresStore, SqliteStore
from flowstone.testing.postgres import TemporaryPostgres

from .postgres import _admin, _fresh_database

Measure = Callable[[Any, int], Awaitable[dict[str, float]]]
"""``measure(store, size)``: the figures of one size on one open store."""


def add_store_options(parser: ArgumentParser) -> None:
    """The options of a scenario that runs ``on_each_store``: ``--dsn`` and ``--backend``."""
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")


def server_of(dsn: str | None) -> str:
    """Which PostgreSQL ``on_each_store`` measured, for a scenario's options."""
    return "given dsn" if dsn else "throwaway cluster, fsync on"


def on_each_store(
    name: str, measure: Measure, sizes: Sequence[int], dsn: str | None, backend: str,
) -> list[dict[str, Any]]:
    """A row per store and size: ``{"store", "partitions", **measure(store, size)}``,
    each size on a store of its own (a database ``flowstone_<name>_<size>``, dropped after)."""
    cluster: TemporaryPostgres | None = None
    if not dsn:
        cluster = TemporaryPostgres(fsync=True).start()
        dsn = cluster.dsn()
    admin_dsn = dsn

    async def in_memory(count: int) -> dict[str, float]:
        async with MemoryStore() as store:
            return await measure(store, count)

    async def in_sqlite(count: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as folder:
            async with SqliteStore(os.path.join(folder, "bench.db")) as store:
                return await measure(store, count)

    async def in_postgres(count: int) -> dict[str, float]:
        database = f"flowstone_{name}_{count}"
        made = await anyio.to_thread.run_sync(lambda: anyio.run(_fresh_database, admin_dsn, database))
        try:
            async with PostgresStore(made) as store:
                return await measure(store, count)
        finally:
            await anyio.to_thread.run_sync(
                lambda: anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))

    rows: list[dict[str, Any]] = []
    try:
        for label, scenario in (("memory", in_memory), ("sqlite", in_sqlite), ("postgres", in_postgres)):
            for count in sizes:
                rows.append({"store": label, "partitions": count, **anyio.run(scenario, count, backend=backend)})
    finally:
        if cluster is not None:
            cluster.stop()
    return rows
