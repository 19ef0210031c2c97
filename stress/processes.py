"""Several OS processes running the same backfill over one PostgreSQL (issue #11).

Each process opens its own runtime (its own owner) and backfills the same
partitions of the same asset; the store's leases decide who computes each one, and
the others reuse that success. Processes are started, connect, say ``ready``, and
all start on one line written to their standard input; the clock runs from that
line until the last one exits. Afterwards every partition must have exactly one
success, the computations counted by all processes together must equal the
partitions, and nothing may be left open. Runs 1 process and then ``--processes``
processes on fresh databases of one throwaway cluster (fsync on), or ``--dsn``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

import flowstone as fs
from flowstone.testing import check_integrity
from flowstone.testing.postgres import TemporaryPostgres

from .postgres import _admin, _fresh_database
from .report import emit

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, sys, time
from datetime import date, timedelta
import anyio
import flowstone as fs

async def main(dsn, count, max_parallel):
    computed = 0

    async def events(ctx, deps):
        nonlocal computed
        computed += 1
        return ctx.partition_key

    asset = fs.Asset(name="events", execute_fn=events, code_version="1",
                     partitioned_by=fs.DailyPartitions(start=date(2000, 1, 1)))
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with fs.store.PostgresStore(dsn) as store:
        await store.list_all(limit=1)  # connected before the clock starts
        async with fs.open_runtime([asset], store=store) as rt:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            began = time.perf_counter()
            status = await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=max_parallel))
            seconds = time.perf_counter() - began
    print(json.dumps({"computed": computed, "succeeded": status.succeeded, "failed": status.failed,
                      "seconds": round(seconds, 3)}), flush=True)

anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


def _race(dsn: str, processes: int, count: int, max_parallel: int) -> tuple[float, list[dict[str, Any]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, dsn, str(count), str(max_parallel)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(processes)
    ]
    try:
        for process in started:
            if process.stdout.readline().strip() != "ready":
                raise SystemExit(f"a worker did not start (exit {process.wait()})")
        began = time.perf_counter()
        for process in started:
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = [json.loads(process.stdout.readline()) for process in started]
        for process in started:
            if process.wait(timeout=600) != 0:
                raise SystemExit(f"a worker failed (exit {process.returncode})")
        return time.perf_counter() - began, outcomes
    finally:
        for process in started:
            process.kill()
            process.wait()
            process.stdin.close()
            process.stdout.close()


async def _check(dsn: str, count: int) -> Any:
    from datetime import date, timedelta

    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with fs.store.PostgresStore(dsn) as store, fs.io.MemoryIO() as nothing:
        return await check_integrity(store, "events", days, {"memory": nothing}, default_io="memory")


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress processes", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("FLOWSTONE_BENCH_DSN"),
                        help="a superuser dsn of a server to use instead of a throwaway cluster")
    parser.add_argument("--partitions", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--max-parallel", type=int, default=20)
    args = parser.parse_args(argv)
    cluster = None if args.dsn else TemporaryPostgres(fsync=True).start()
    admin_dsn = args.dsn or cluster.dsn()
    rows: list[dict[str, Any]] = []
    try:
        for processes in sorted({1, args.processes}):
            name = f"flowstone_bench_processes_{processes}"
            dsn = anyio.run(_fresh_database, admin_dsn, name)
            try:
                elapsed, outcomes = _race(dsn, processes, args.partitions, args.max_parallel)
                report = anyio.run(_check, dsn, args.partitions)
            finally:
                anyio.run(_admin, admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            computed = sum(o["computed"] for o in outcomes)
            # Values live in each process's memory, so only the records are checked here.
            problems = [p for p in report.problems if "points at a value" not in p]
            if computed != args.partitions or problems or any(o["failed"] for o in outcomes):
                raise SystemExit(f"{processes} processes: computed {computed} of {args.partitions}; {problems[:5]}")
            rows.append({
                "scenario": f"{args.partitions} partitions, {processes} process(es) x max_parallel={args.max_parallel}",
                "median_ms": elapsed * 1e3, "per_second": args.partitions / elapsed,
                "computed": computed, "computed_by_each": [o["computed"] for o in outcomes],
                "seconds_of_each": [o["seconds"] for o in outcomes],
            })
    finally:
        if cluster is not None:
            cluster.stop()
    return emit("processes", rows, {"partitions": args.partitions, "processes": args.processes,
                                    "max_parallel": args.max_parallel})
