"""Backfills with records in PostgreSQL (issue #4 figures).

Starts a throwaway cluster with the server's shipped durability settings (fsync
and synchronous_commit on), or uses ``--dsn``; migrates a fresh database and
runs as a plain role, as production would. Asset functions are trivial
``async def``s with memory I/O: what is measured is FlowStone's record keeping.
Each run uses its own database, so no run reads what another wrote.

With the throwaway cluster, each row also says how much CPU the server spent per
materialization (its processes, from ``/proc``), next to the client's. The last
row is the floor: the store alone, without a runtime, one writer beginning and
completing ``FLUSH_ROWS`` records at a time, as a backfill's batches do. Its CPU
per record, the client's and the server's, is what any runtime spends at least
(a runtime adds its own on top); its rate is one writer's, taking turns with the
server, which a runtime's several batches in flight can beat.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs
from flowstone.plumbing.clock import utcnow
from flowstone.plumbing.ids import new_uuid
from flowstone.store import PostgresStore, Status
from flowstone.store.leases import End, Start
from flowstone.store.postgres import FLUSH_ROWS
from flowstone.testing.postgres import TemporaryPostgres

from .report import emit, median
from .runtime import collector_as_cli, daily, reading

APP_ROLE = "flowstone_bench"


async def _admin(dsn: str, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def _with_database(dsn: str, database: str, user: str | None = None) -> str:
    head, _, _ = dsn.rpartition("/")
    if user is not None:
        scheme, _, rest = head.partition("://")
        head = f"{scheme}://{user}@{rest.rpartition('@')[2]}"
    return f"{head}/{database}"


async def fresh_database_from_any_loop(admin_dsn: str, name: str) -> str:
    """``_fresh_database`` from asyncio or trio: asyncpg runs on an asyncio loop of
    its own in a worker thread (the harness's set-up, not the code measured)."""
    return await anyio.to_thread.run_sync(lambda: anyio.run(_fresh_database, admin_dsn, name))


async def _fresh_database(admin_dsn: str, name: str) -> str:
    """A new migrated database and the plain role's dsn on it."""
    await _admin(
        admin_dsn,
        f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
        f"CREATE DATABASE {name} TEMPLATE template0",
        f"""DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                  CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS;
              END IF;
            END $$""",
    )
    async with PostgresStore(_with_database(admin_dsn, name)) as owner:
        await owner.migrate()
    await _admin(
        _with_database(admin_dsn, name),
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE}",
    )
    return _with_database(admin_dsn, name, APP_ROLE)


def _test_cluster_start() -> float:
    """Seconds from nothing to a migrated database on a test cluster (fsync off, as
    the test suite starts it): initdb, start, CREATE DATABASE, migrate."""
    began = time.perf_counter()
    cluster = TemporaryPostgres(fsync=False).start()
    try:
        anyio.run(_fresh_database, cluster.dsn(), "flowstone_first")
        return time.perf_counter() - began
    finally:
        cluster.stop()


ServerCpu = Callable[[], float | None]
"""Seconds of CPU the server has used so far, if it can be read (``TemporaryPostgres.cpu_seconds``)."""
Spent = tuple[float, float, float | None]
"""Wall seconds, this process's CPU seconds, the server's (None when unknown)."""
Scenario = Callable[[str, int, int, ServerCpu], Awaitable[Spent]]
"""A measured run: (dsn, count, pool size, the server's CPU) -> what it spent."""
MAX_PARALLEL = 20


class _Clock:
    """Wall time, this process's CPU and the server's, from ``start`` to ``stop``."""

    tune_gc = False
    """Whether ``start``, where start-up ends, first sets the garbage collector as
    FlowStone's command line does once its runtime is open (``--tune-gc``), and
    ``stop`` sets it back (the runtime frozen at ``start`` is freed once closed)."""

    def __init__(self, server_cpu: ServerCpu) -> None:
        self.server_cpu = server_cpu
        self.collector = collector_as_cli(self.tune_gc)

    def start(self) -> None:
        self.collector.__enter__()
        self.began, self.cpu, self.server = time.perf_counter(), time.process_time(), self.server_cpu()

    def stop(self) -> Spent:
        elapsed, cpu, server = time.perf_counter() - self.began, time.process_time() - self.cpu, self.server_cpu()
        self.collector.__exit__(None, None, None)
        return elapsed, cpu, None if server is None or self.server is None else server - self.server


async def _backfill(dsn: str, count: int, pool: int, server_cpu: ServerCpu) -> Spent:
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    clock = _Clock(server_cpu)
    async with PostgresStore(dsn, min_size=pool, max_size=pool) as store:
        await store.list_all(limit=1)  # connect before the clock starts, as a long-running service would be
        async with fs.open_runtime(daily(False), store=store) as rt:
            clock.start()
            backfill = await rt.backfill("events", partitions=days, max_parallel=MAX_PARALLEL)
            status = await rt.wait_backfill(backfill)
            spent = clock.stop()
            records = await rt.store.list_by_status("success", limit=count + 1)
    if status.succeeded != count or len(records) != count:
        raise SystemExit(f"backfill incomplete: {status} with {len(records)} success records")
    return spent


async def _reader_backfill(dsn: str, count: int, pool: int, server_cpu: ServerCpu) -> Spent:
    """A backfill of ``cleaned`` (``upstream="missing"``, the default) whose upstream
    partitions are all stored, up to date: only the reader runs."""
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    clock = _Clock(server_cpu)
    async with PostgresStore(dsn, min_size=pool, max_size=pool) as store:
        async with fs.open_runtime(reading(False), store=store) as rt:
            await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=MAX_PARALLEL))
            clock.start()
            status = await rt.wait_backfill(await rt.backfill("cleaned", partitions=days, max_parallel=MAX_PARALLEL))
            spent = clock.stop()
            records = await rt.store.list_by_status("success", limit=2 * count + 1)
    if status.succeeded != count or len(records) != 2 * count:
        raise SystemExit(f"reader backfill incomplete: {status} with {len(records)} success records")
    return spent


async def _store_alone(dsn: str, count: int, pool: int, server_cpu: ServerCpu) -> Spent:
    """The floor: ``count`` records begun and completed by the store alone, ``FLUSH_ROWS``
    at a time, each batch waiting for the one before (the fields a backfill's jobs
    give, the ids and times made here as the runtime makes them)."""
    clock = _Clock(server_cpu)
    async with PostgresStore(dsn, min_size=pool, max_size=pool) as store:
        await store.list_all(limit=1)
        clock.start()
        for first in range(0, count, FLUSH_ROWS):
            now = utcnow()
            starts = [
                Start({
                    "asset_name": "events", "partition": f"p{i}", "run_id": new_uuid(), "status": Status.RUNNING,
                    "started_at": now, "upstream_assets": (), "upstream_partitions": {},
                    "dependency_hash": "0" * 64, "executor_node": "bench/executor:events",
                })
                for i in range(first, min(first + FLUSH_ROWS, count))
            ]
            begun = await store.begin_many("bench", 60.0, starts)
            now = utcnow()
            ends = [
                End(got[0], Status.SUCCESS, got[1], {"metadata": {"io_manager": "memory"}, "completed_at": now,
                                                    "duration_ms": 0.01})
                for got in begun if not isinstance(got, Exception)
            ]
            done = await store.complete_many(ends)
            if len(ends) != len(starts) or any(isinstance(record, Exception) for record in done):
                raise SystemExit(f"store alone: a write failed: {[*begun, *done]}")
        spent = clock.stop()
        states = await store.partition_states("events")
    if len(states) != count or any(state is not Status.SUCCESS for state in states.values()):
        raise SystemExit(f"store alone: {len(states)} partitions written, not {count} successes")
    return spent


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress postgres", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", type=int, default=10_000, help="partitions in the throughput run (0 skips it)")
    parser.add_argument("--pool", type=int, default=10, help="connections in the store's pool")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--no-fsync", action="store_true", help="throwaway cluster without fsync (not the figure)")
    parser.add_argument("--tune-gc", action="store_true",
                        help="set the garbage collector once each runtime is open, as the command line does")
    args = parser.parse_args(argv)
    _Clock.tune_gc = args.tune_gc
    cluster = None if args.dsn else TemporaryPostgres(fsync=not args.no_fsync).start()
    admin_dsn: str = args.dsn if cluster is None else cluster.dsn()
    rows: list[dict[str, Any]] = []
    try:
        server_cpu: ServerCpu = cluster.cpu_seconds if cluster is not None else lambda: None

        def measure(
            count: int, label: str, target_ms: float | None, dagster_s: float | None, repeat: int,
            scenario: Scenario = _backfill,
        ) -> None:
            samples, busy, client, server = [], [], [], []
            for attempt in range(repeat):
                name = f"flowstone_bench_{count}_{attempt}"
                dsn = anyio.run(_fresh_database, admin_dsn, name)
                try:
                    spent = anyio.run(scenario, dsn, count, args.pool, server_cpu, backend=args.backend)
                finally:
                    anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                elapsed, cpu, server_seconds = spent
                samples.append(elapsed)
                busy.append(cpu / elapsed)
                client.append(cpu * 1e6 / count)
                if server_seconds is not None:
                    server.append(server_seconds * 1e6 / count)
            middle = median(samples)
            row: dict[str, Any] = {
                "scenario": label, "median_ms": middle * 1e3, "best_ms": min(samples) * 1e3,
                "per_second": count / middle, "us_per_materialization": middle * 1e6 / count,
                # Share of one core this process used: near 1.0 means bound by its own CPU,
                # well below it means waiting on the server (round trips, fsync).
                "client_cpu_share": median(busy),
                "client_cpu_us": median(client),
            }
            if server:  # the server's processes, where they can be read (a throwaway cluster)
                row["server_cpu_us"] = median(server)
            if target_ms is not None:
                row["target_ms"] = target_ms
            if dagster_s is not None:
                row["x_faster_than_dagster"] = dagster_s / middle
            rows.append(row)

        if cluster is not None:
            starts = [_test_cluster_start() for _ in range(max(1, args.repeat))]
            rows.append({
                "scenario": "test cluster (fsync off): initdb + start + first migrated database",
                "median_ms": median(starts) * 1e3, "best_ms": min(starts) * 1e3, "target_ms": "well under 2000",
            })
        fsync = "off" if args.no_fsync and cluster else "on"
        measure(366, f"366 daily partitions, max_parallel={MAX_PARALLEL}, Postgres (fsync {fsync})", 800,
                78.0 * 366 / 365, max(1, args.repeat))
        if args.big:
            measure(args.big, f"{args.big} partitions, max_parallel={MAX_PARALLEL}, Postgres (fsync {fsync})",
                    None, None, 1)
            measure(args.big, f"{args.big} partitions of a reader, upstream stored, max_parallel={MAX_PARALLEL}, "
                    f"Postgres (fsync {fsync})", None, None, 1, scenario=_reader_backfill)
            measure(args.big, f"floor: the store alone, {args.big} records, {FLUSH_ROWS} a batch, one writer, no "
                    f"runtime (fsync {fsync})", None, None, 1, scenario=_store_alone)
    finally:
        if cluster is not None:
            cluster.stop()
    return emit(
        "postgres", rows,
        {"backend": args.backend, "big": args.big, "pool": args.pool, "repeat": args.repeat, "tune_gc": args.tune_gc,
         "server": "given dsn" if args.dsn else f"throwaway cluster, fsync {'off' if args.no_fsync else 'on'}"},
    )
