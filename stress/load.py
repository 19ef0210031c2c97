"""Load scenarios of issue #6, each driven by ``flowstone.testing.ConcurrentHarness``
or a backfill, each checked for what it must leave behind (exit non-zero if not):

- ``registrations``: many tasks register assets into one running runtime at once;
  every asset is then known and materializes.
- ``store-writes``: many tasks write records into the memory store at once (create,
  running, success); every record is there, once, in its final state.
- ``backfill``: partitions per second on the memory, filesystem and Postgres stores
  and IO; every partition ends with one success (``check_integrity``).
- ``dags``: a wide fan and a deep chain, one ``materialize`` each.
- ``cancel-storm``: backfills and materializations started and cancelled at random
  moments, many at once; afterwards no record is open, no executor holds a lease,
  and the runtime still works.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs
from flowstone.store import TERMINAL, Status
from flowstone.testing import ConcurrentHarness, check_integrity

from .report import emit, median

DAGSTER_MS_PER_ASSET = 14.0
DAGSTER_MS_PER_PARTITION = 30.0
START = date(2000, 1, 1)


def _days(count: int) -> list[date]:
    return [START + timedelta(days=i) for i in range(count)]


async def _work(ctx: Any, deps: Any) -> Any:
    return {"key": ctx.partition_key}


def _harness_row(label: str, report: Any) -> dict[str, Any]:
    m = report.metrics
    return {
        "scenario": label, "operations": m.total_operations, "failed": m.failure_count,
        "per_second": m.operations_per_second, "p50_ms": m.latency_ms.p50, "p99_ms": m.latency_ms.p99,
        "max_ms": m.latency_ms.max,
    }


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"check failed: {message}")


# ---------------------------------------------------------------- scenarios


async def registrations(count: int, threads: int) -> list[dict[str, Any]]:
    async with fs.open_runtime([fs.Asset(name="root", execute_fn=_work)]) as rt:
        async def register(i: int) -> None:
            await rt.register(fs.Asset(name=f"r{i}", execute_fn=_work, depends_on=("root",)))

        report = await ConcurrentHarness(threads=threads, operations=register, repeat=max(1, count // threads)).run()
        names = {a.name for a in await rt.assets()}
        total = report.metrics.total_operations
        _check(report.ok, f"registrations failed: {report}")
        _check(all(f"r{i}" in names for i in range(total)), "a registered asset is missing")
        probe = await rt.materialize(f"r{total - 1}")
        _check(probe.materializations[f"r{total - 1}"].status is Status.SUCCESS, "a registered asset did not run")
    return [_harness_row(f"{total} concurrent registrations, {threads} at once", report)]


async def store_writes(count: int, threads: int) -> list[dict[str, Any]]:
    store = fs.store.MemoryStore()
    async with fs.open_runtime([fs.Asset(name="a", execute_fn=_work)], store=store):
        run = uuid.uuid4()

        async def write(i: int) -> None:
            record = await store.create(asset_name="a", partition=f"p{i}", run_id=run)
            record = await store.update_status(record.id, Status.RUNNING)
            await store.update_status(record.id, Status.SUCCESS)

        report = await ConcurrentHarness(threads=threads, operations=write, repeat=max(1, count // threads)).run()
        records = await store.list_all(limit=10 * count + 10)
        total = report.metrics.total_operations
        _check(report.ok, f"writes failed: {report}")
        _check(len(records) == total, f"{len(records)} records for {total} writes")
        _check(len({r.partition for r in records}) == total, "a partition was written twice")
        _check(all(r.status is Status.SUCCESS for r in records), "a record is not in its final state")
    row = _harness_row(f"{total} concurrent record writes (create + 2 moves), {threads} at once", report)
    row["writes_per_second"] = 3 * row["per_second"]
    return [row]


async def backfill_throughput(count: int, stores: list[str], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for kind in stores:
        samples = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as root:
                async with _store_and_io(kind, root) as (store, io):
                    asset = fs.Asset(name="events", execute_fn=_work, partitioned_by=fs.DailyPartitions(start=START),
                                     io_manager="target")
                    async with fs.open_runtime([asset], store=store, io_managers={"target": io}) as rt:
                        start = time.perf_counter()
                        status = await rt.wait_backfill(
                            await rt.backfill("events", partitions=_days(count), max_parallel=20)
                        )
                        samples.append(time.perf_counter() - start)
                        _check(status.succeeded == count, f"{kind}: {status}")
                        (await check_integrity(rt.store, "events", _days(count), rt.io_managers)).raise_if_bad()
        middle = median(samples)
        rows.append({
            "scenario": f"backfill {count} partitions, max_parallel=20: {_LABELS[kind]}",
            "median_ms": middle * 1e3, "best_ms": min(samples) * 1e3, "per_second": count / middle,
            "x_faster_than_dagster": DAGSTER_MS_PER_PARTITION * count / 1e3 / middle,
        })
    return rows


_LABELS = {
    "memory": "MemoryStore + MemoryIO",
    "filesystem": "MemoryStore + FilesystemIO (durable: fsync per file)",
    "postgres": "PostgresStore + PostgresIO (fsync on)",
}


class _store_and_io:
    """The store and IO manager of one backfill run, made and closed."""

    def __init__(self, kind: str, root: str) -> None:
        self.kind, self.root = kind, root
        self.cluster: Any = None

    async def __aenter__(self) -> tuple[Any, Any]:
        if self.kind == "memory":
            self.opened = (fs.store.MemoryStore(), fs.io.MemoryIO())
        elif self.kind == "filesystem":
            self.opened = (fs.store.MemoryStore(), fs.io.FilesystemIO(self.root))
        else:
            from flowstone.testing.postgres import TemporaryPostgres

            from .postgres import fresh_database_from_any_loop

            self.cluster = await anyio.to_thread.run_sync(lambda: TemporaryPostgres().start())
            dsn = await fresh_database_from_any_loop(self.cluster.dsn(), "flowstone_load")
            self.opened = (fs.store.PostgresStore(dsn), fs.io.PostgresIO(dsn))
        return self.opened

    async def __aexit__(self, *exc: Any) -> None:
        for client in self.opened:
            close = getattr(client, "close", None)
            if close is not None and not isinstance(client, (fs.store.MemoryStore, fs.io.MemoryIO)):
                await close()
        if self.cluster is not None:
            await anyio.to_thread.run_sync(self.cluster.stop)


async def dags(width: int, depth: int, repeat: int) -> list[dict[str, Any]]:
    wide = [fs.Asset(name="source", execute_fn=_work)]
    wide += [fs.Asset(name=f"w{i}", execute_fn=_work, depends_on=("source",)) for i in range(width)]
    wide.append(fs.Asset(name="sink", execute_fn=_work, depends_on=tuple(f"w{i}" for i in range(width))))
    deep = [fs.Asset(name=f"d{i}", execute_fn=_work, depends_on=(f"d{i - 1}",) if i else ()) for i in range(depth)]
    rows = []
    for label, assets, target in (
        (f"wide DAG: 1-{width}-1 fan", wide, "sink"), (f"deep DAG: {depth}-asset chain", deep, f"d{depth - 1}"),
    ):
        samples = []
        for _ in range(repeat):
            async with fs.open_runtime(assets) as rt:
                start = time.perf_counter()
                result = await rt.materialize(target)
                samples.append(time.perf_counter() - start)
                _check(len(result.materializations) == len(assets), f"{label}: not every asset ran")
        middle = median(samples)
        rows.append({
            "scenario": f"{label}, one materialize", "median_ms": middle * 1e3, "best_ms": min(samples) * 1e3,
            "us_per_asset": middle * 1e6 / len(assets),
            "x_faster_than_dagster": DAGSTER_MS_PER_ASSET * len(assets) / 1e3 / middle,
        })
    return rows


async def cancel_storm(rounds: int, seed: int) -> list[dict[str, Any]]:
    chooser = random.Random(seed)

    async def slow(ctx: Any, deps: Any) -> Any:
        await anyio.sleep(chooser.random() * 0.01)
        return 1

    asset = fs.Asset(name="events", execute_fn=slow, partitioned_by=fs.DailyPartitions(start=START))
    days = _days(200)
    cancelled = 0
    start = time.perf_counter()
    async with fs.open_runtime([asset]) as rt:
        for _ in range(rounds):
            async with anyio.create_task_group() as storm:
                backfills = [await rt.backfill("events", partitions=chooser.sample(days, 40), max_parallel=8,
                                               force=True) for _ in range(3)]

                async def doomed(day: date) -> None:
                    with anyio.move_on_after(chooser.random() * 0.01):
                        await rt.materialize("events", day, force=True)

                for day in chooser.sample(days, 30):
                    storm.start_soon(doomed, day)
                await anyio.sleep(chooser.random() * 0.02)
                for backfill in backfills:
                    status = await rt.cancel_backfill(backfill)
                    cancelled += status.cancelled
        records = await rt.store.list_all(limit=1_000_000)
        stats = (await rt.statistics())["events"]
        _check(all(r.status in TERMINAL for r in records), "a record was left open by a cancel")
        _check(stats.in_flight == 0 and stats.followers == 0 and stats.queued == 0, f"executor not idle: {stats}")
        after = await rt.materialize("events", days[0], force=True)
        _check(after.materializations["events"].status is Status.SUCCESS, "the runtime does not work after the storm")
    elapsed = time.perf_counter() - start
    by_status: dict[str, int] = {}
    for record in records:
        by_status[record.status.value] = by_status.get(record.status.value, 0) + 1
    return [{
        "scenario": f"cancel storm: {rounds} rounds of 3 backfills + 30 materializations cancelled at random",
        "median_ms": elapsed * 1e3, "records": len(records), "cancelled_partitions": cancelled,
        "note": ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())) + "; none open, executor idle",
    }]


# ------------------------------------------------------------------- entry


def _entry(name: str, about: str, options: dict[str, dict[str, Any]], measure: Any) -> Any:
    """``python -m stress <name>``: parse ``options`` (and ``--backend``), run
    ``measure(args)`` on that backend, print its rows."""

    def run(argv: list[str]) -> dict[str, Any]:
        parser = argparse.ArgumentParser(prog=f"python -m stress {name}", description=about)
        parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
        for flag, settings in options.items():
            parser.add_argument(flag, **settings)
        args = parser.parse_args(argv)

        async def go() -> list[dict[str, Any]]:
            return await measure(args)

        return emit(name, anyio.run(go, backend=args.backend), vars(args))

    return run


_INT = {"type": int}

run_registrations = _entry(
    "registrations", "Many tasks register assets into one running runtime at once.",
    {"--count": {**_INT, "default": 2000}, "--threads": {**_INT, "default": 50}},
    lambda args: registrations(args.count, args.threads),
)
run_store_writes = _entry(
    "store-writes", "Many tasks write records into the memory store at once.",
    {"--count": {**_INT, "default": 20000}, "--threads": {**_INT, "default": 100}},
    lambda args: store_writes(args.count, args.threads),
)
run_backfill = _entry(
    "backfill", "Backfill throughput on the memory, filesystem and Postgres stores and IO.",
    {"--count": {**_INT, "default": 2000}, "--repeat": {**_INT, "default": 3},
     "--stores": {"default": "memory,filesystem,postgres", "help": "comma-separated"}},
    lambda args: backfill_throughput(args.count, [s for s in args.stores.split(",") if s], args.repeat),
)
run_dags = _entry(
    "dags", "A wide fan and a deep chain, one materialize each.",
    {"--width": {**_INT, "default": 1000}, "--depth": {**_INT, "default": 500}, "--repeat": {**_INT, "default": 3}},
    lambda args: dags(args.width, args.depth, args.repeat),
)
run_cancel_storm = _entry(
    "cancel-storm", "Backfills and materializations cancelled at random moments, many at once.",
    {"--rounds": {**_INT, "default": 10}, "--seed": {**_INT, "default": 1}},
    lambda args: cancel_storm(args.rounds, args.seed),
)
