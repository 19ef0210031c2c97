"""Materializations through ``flowstone worker`` processes (issue #17 figures).

On a throwaway PostgreSQL cluster (fsync on) or ``--dsn``: a CPU-bound backfill
(``--work`` loop turns per partition) on 1 and on 2 worker processes; a trivial one
on 1 worker against the same backfill in one process (the queue's per-job overhead);
and the queue latency, from sending one job to an idle worker to its record's start.
Each backfill is ``rt.backfill`` (on the workers: ``workers=True``, twice the
workers' slots enqueued), timed until ``wait_backfill`` returns; workers are started
(and say so) before the clock runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import anyio

from .postgres import APP_ROLE, _admin, _fresh_database, _with_database
from .report import emit

PIPELINE = '''
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2020, 1, 1))
pipeline = fs.Pipeline("bench")

@pipeline.asset(partitioned_by=days, code_version="1")
async def trivial(ctx, deps):
    return 1

@pipeline.asset(partitioned_by=days, code_version="1")
async def crunch(ctx, deps):
    total = 0
    for n in range({work}):
        total += n * n % 7
    return total
'''


def _keys(count: int) -> list[str]:
    return [(date(2020, 1, 1) + timedelta(days=n)).isoformat() for n in range(count)]


def _start_workers(folder: str, dsn: str, count: int, concurrency: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "FLOWSTONE_DSN": dsn, "FLOWSTONE_PIPELINE": "bench:pipeline"}
    workers = [subprocess.Popen([sys.executable, "-m", "flowstone", "worker", "--concurrency", str(concurrency)],
                                cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(count)]
    for worker in workers:
        assert worker.stderr is not None
        for line in worker.stderr:
            if "taking jobs" in line:
                break
        else:
            raise SystemExit("a worker did not start")
        # Read the rest as it comes: a full pipe would block the worker's log writes,
        # and with them its event loop and its heartbeat.
        threading.Thread(target=_drain, args=(worker.stderr,), daemon=True).start()
    return workers


def _drain(pipe: Any) -> None:
    with pipe:
        for _ in pipe:
            pass


def _stop(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=120)


def _pipeline(folder: str) -> Any:
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from bench import pipeline  # type: ignore[import-not-found]

    return pipeline


def _through_workers(folder: str, dsn: str, asset: str, count: int, workers: int, concurrency: int) -> float:
    """``rt.backfill`` on the workers, keeping twice their slots enqueued."""
    started = _start_workers(folder, dsn, workers, concurrency)
    try:
        return _backfill(folder, dsn, asset, count, 2 * workers * concurrency, on_workers=True)
    finally:
        _stop(started)


def _backfill(folder: str, dsn: str, asset: str, count: int, max_parallel: int, *, on_workers: bool) -> float:
    import flowstone as fs
    from flowstone.workers import Queue

    async def main() -> float:
        async with fs.store.PostgresStore(dsn) as store, Queue(dsn) as queue, \
                fs.open_runtime(_pipeline(folder), store=store, queue=queue) as rt:
            start = time.perf_counter()
            status = await rt.wait_backfill(await rt.backfill(
                asset, [date.fromisoformat(k) for k in _keys(count)], max_parallel=max_parallel, workers=on_workers))
            if status.succeeded != count:
                raise SystemExit(f"backfill: {status}")
            return time.perf_counter() - start

    return anyio.run(main)


def _latency(folder: str, dsn: str, samples: int) -> list[float]:
    """From sending one job to an idle worker to its record's start, ``samples`` times."""
    import flowstone as fs
    from flowstone.workers.queue import send

    async def started_at(key: str) -> Any:
        async with fs.store.PostgresStore(dsn) as store:
            try:
                return (await store.get("trivial", key)).started_at
            except fs.NotFound:
                return None

    workers = _start_workers(folder, dsn, 1, 1)
    waits = []
    try:
        for key in _keys(10_000)[-samples:]:
            sent = time.time()
            anyio.run(send, dsn, "trivial", key)
            while (begun := anyio.run(started_at, key)) is None:
                time.sleep(0.01)
            waits.append(begun.timestamp() - sent)
    finally:
        _stop(workers)
    return waits


def run(argv: list[str]) -> dict[str, Any]:
    from flowstone.testing.postgres import TemporaryPostgres
    from flowstone.workers.queue import migrate_queue

    parser = argparse.ArgumentParser(prog="python -m stress workers", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    parser.add_argument("--cpu-partitions", type=int, default=40)
    parser.add_argument("--work", type=int, default=2_000_000, help="loop turns per CPU-bound partition")
    parser.add_argument("--partitions", type=int, default=500, help="partitions of the trivial backfill")
    parser.add_argument("--latency-samples", type=int, default=20)
    args = parser.parse_args(argv)
    cluster = None if args.dsn else TemporaryPostgres(fsync=True).start()
    admin_dsn = args.dsn or cluster.dsn()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="flowstone-workers-") as folder:
            Path(folder, "bench.py").write_text(PIPELINE.format(work=args.work))
            for label, asset, count, how in (
                ("CPU-bound, 1 worker process", "crunch", args.cpu_partitions, (1, 1)),
                ("CPU-bound, 2 worker processes", "crunch", args.cpu_partitions, (2, 1)),
                ("trivial, 1 worker process (concurrency 20)", "trivial", args.partitions, (1, 20)),
                ("trivial, in one process (max_parallel 20)", "trivial", args.partitions, None),
            ):
                name = f"flowstone_bench_workers_{len(rows)}"
                dsn = anyio.run(_fresh_database, admin_dsn, name)
                try:
                    anyio.run(functools.partial(migrate_queue, _with_database(admin_dsn, name), grant_to=[APP_ROLE]))
                    seconds = (_through_workers(folder, dsn, asset, count, *how) if how is not None
                               else _backfill(folder, dsn, asset, count, 20, on_workers=False))
                finally:
                    anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                rows.append({"scenario": f"{label}: {count} partitions", "seconds": round(seconds, 2),
                             "per_second": round(count / seconds, 1)})
            name = "flowstone_bench_workers_latency"
            dsn = anyio.run(_fresh_database, admin_dsn, name)
            try:
                anyio.run(functools.partial(migrate_queue, _with_database(admin_dsn, name), grant_to=[APP_ROLE]))
                waits = sorted(1000 * w for w in _latency(folder, dsn, args.latency_samples))
            finally:
                anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            rows.append({"scenario": f"queue latency, send -> start ({len(waits)} jobs, idle worker)",
                         "median_ms": round(statistics.median(waits), 1), "max_ms": round(waits[-1], 1)})
    finally:
        if cluster is not None:
            cluster.stop()
    cpu1, cpu2 = rows[0]["seconds"], rows[1]["seconds"]
    rows[1]["speedup"] = round(cpu1 / cpu2, 2)
    return emit("workers", rows, {k: v for k, v in vars(args).items() if k != "dsn"})
