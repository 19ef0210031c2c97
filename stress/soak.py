"""A long soak (issue #6): mixed load with chaos for ``--minutes``, memory over time.

One runtime, as a daemon would keep it, runs in a loop: a backfill of
``--partitions`` partitions (forced, so every one writes a new record and value),
50 concurrent single materializations through ``ConcurrentHarness``, and reads
of what was written; all the while an executor is killed every 50 ms and 10% of
value stores and loads fail (``FaultyIO``, retried by the asset's policy). With
``--store postgres`` (the default) records and values live in a throwaway
PostgreSQL whose connections are also terminated every few seconds, so nothing
the load writes stays in this process: its memory must be flat after warm-up.
With ``--store memory`` the records stay in the process, and growth is judged
net of ``--bytes-per-record`` for each record written.

With ``--retention N`` the asset keeps ``fs.Retention(keep_last=N)`` and the loop
prunes every ``--prune-every`` seconds, as the daemon does (issue #18): the records
in the store must then stay flat too (the mean count over the last quarter of the
run within 10% of the second quarter's), where without it they grow with every
forced rebuild.

Every ``--sample`` seconds it prints one line (time, RSS, records written, records
and values in the store, cycles). At the end: the table, a JSON line, and a verdict:
growth after warm-up (the first quarter of the run) within ``--allow-mb``, no record
left open and every partition's value present, else exit non-zero.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs
from flowstone.actors.supervisor import RestartPolicy
from flowstone.testing import ActorKiller, ConcurrentHarness, FaultyIO, InjectedFault, terminate_connections

from .report import emit, rss_bytes

START = date(2000, 1, 1)


async def _work(ctx: Any, deps: Any) -> Any:
    return {"key": ctx.partition_key, "payload": "x" * 100}


async def soak(args: argparse.Namespace, dsn: str | None) -> dict[str, Any]:
    days = [START + timedelta(days=i) for i in range(args.partitions)]
    deadline = time.monotonic() + args.minutes * 60
    samples: list[tuple[float, int, int, int, int, int]] = []  # seconds, rss, written, cycles, stored, values
    written = cycles = 0
    if dsn is not None:
        store: Any = fs.store.PostgresStore(dsn)
        inner: Any = fs.io.PostgresIO(dsn)
    else:
        store, inner = fs.store.MemoryStore(), fs.io.MemoryIO()
    values = FaultyIO(inner, failure_rate=0.1, seed=args.seed)
    asset = fs.Asset(
        name="events", execute_fn=_work, partitioned_by=fs.DailyPartitions(start=START), io_manager="target",
        code_version="1", retry=fs.RetryPolicy(max_attempts=6, backoff=0.01, jitter=True),
        retention=fs.Retention(keep_last=args.retention) if args.retention is not None else None,
    )
    policy = RestartPolicy(max_restarts=1_000_000, window=60.0)
    began = time.monotonic()
    async with fs.open_runtime([asset], store=store, io_managers={"target": values}, restart_policy=policy) as rt:
        async def sampler() -> None:
            while True:
                gc.collect()
                stored, kept = await _counts(store, inner, dsn)
                samples.append((time.monotonic() - began, rss_bytes(), written, cycles, stored, kept))
                seconds, rss, records, done, _, _ = samples[-1]
                print(f"  t={seconds:7.1f}s  rss={rss / 1e6:7.1f} MB  written={records:8d}  stored={stored:8d}  "
                      f"values={kept:6d}  cycles={done}", flush=True)
                await anyio.sleep(args.sample)

        async def pruner() -> None:
            while args.retention is not None:
                await anyio.sleep(args.prune_every)
                try:
                    await rt.prune()
                except fs.FlowstoneError:
                    pass  # a terminated connection: the next round prunes

        async def terminator() -> None:
            while dsn is not None:
                await anyio.sleep(3.0)
                await terminate_connections(dsn)

        async with anyio.create_task_group() as background:
            background.start_soon(sampler)
            background.start_soon(terminator)
            background.start_soon(pruner)
            async with ActorKiller(rt, every=0.05, seed=args.seed):
                while time.monotonic() < deadline:
                    status = await rt.wait_backfill(
                        await rt.backfill("events", partitions=days, max_parallel=20, force=True)
                    )
                    written += status.succeeded + status.failed

                    async def single(i: int) -> None:
                        await rt.materialize("events", days[i % len(days)], force=True)

                    report = await ConcurrentHarness(threads=50, operations=single).run()
                    written += report.metrics.total_operations
                    for day in days[:10]:
                        try:
                            await rt.load("events", day)
                        except InjectedFault:
                            pass  # a read has no retry policy: the fault is the expected outcome
                    cycles += 1
            background.cancel_scope.cancel()
        gc.collect()
        samples.append((time.monotonic() - began, rss_bytes(), written, cycles, *await _counts(store, inner, dsn)))
        # After the chaos: no record left open, and the latest value of every
        # partition there (forced runs leave several successes per partition, so
        # check_integrity's one-success rule does not apply here).
        still_open = [
            f"{r.partition} {r.status.value}"
            for status in ("pending", "running", "waiting_approval")
            for r in await rt.store.list_by_status(status, limit=1000)
        ]
        missing = [str(day) for day in days if not await inner.exists("events", day, {})]
    await _close(store, inner)
    return {"samples": samples, "problems": still_open + [f"no value for {day}" for day in missing]}


async def _counts(store: Any, values: Any, dsn: str | None) -> tuple[int, int]:
    """Records in the store, and values kept (-1 where it cannot be told cheaply)."""
    if dsn is None:
        return len(await store.list_all(limit=10**9)), -1
    import asyncpg

    for _ in range(5):  # the chaos terminates connections: this one too, sometimes
        try:
            connection = await asyncpg.connect(dsn)
            try:
                return (await connection.fetchval("SELECT count(*) FROM flowstone_materializations"),
                        await connection.fetchval("SELECT count(*) FROM flowstone_values"))
            finally:
                await connection.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await anyio.sleep(0.1)
    return -1, -1


async def _close(*clients: Any) -> None:
    for client in clients:
        if not isinstance(client, (fs.store.MemoryStore, fs.io.MemoryIO)):
            await client.close()


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--store", choices=["postgres", "memory"], default="postgres")
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--allow-mb", type=float, default=5.0, help="growth after warm-up allowed, in MB")
    parser.add_argument("--bytes-per-record", type=int, default=2000, help="allowed per record (--store memory)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--retention", type=int, metavar="N", help="keep_last of the asset's fs.Retention, "
                        "pruned every --prune-every seconds (default: no retention)")
    parser.add_argument("--prune-every", type=float, default=5.0)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    logging.getLogger("flowstone").setLevel(logging.CRITICAL)  # the chaos makes expected failures
    cluster = None
    dsn = None
    if args.store == "postgres":
        from flowstone.testing.postgres import TemporaryPostgres

        from .postgres import _fresh_database

        cluster = TemporaryPostgres(fsync=False).start()
        dsn = anyio.run(_fresh_database, cluster.dsn(), "flowstone_soak")
    try:
        outcome = anyio.run(soak, args, dsn, backend=args.backend)
    finally:
        if cluster is not None:
            cluster.stop()
    samples = outcome["samples"]
    warm = next((s for s in samples if s[0] >= args.minutes * 60 / 4), samples[0])
    last = samples[-1]
    growth = last[1] - warm[1]
    allowance = args.allow_mb * 1e6
    if args.store == "memory":
        allowance += (last[2] - warm[2]) * args.bytes_per_record
    quarter = args.minutes * 60 / 4

    def mean_stored(first: float, last: float) -> float:
        counts = [s[4] for s in samples if first <= s[0] < last and s[4] >= 0] or [0]
        return sum(counts) / len(counts)

    second, fourth = mean_stored(quarter, 2 * quarter), mean_stored(3 * quarter, 5 * quarter)
    rows = [{
        "scenario": f"soak {args.minutes:g} min, {args.store} store, chaos (executors killed, IO faults 10%"
                    + (", connections terminated" if dsn else "") + ")",
        "cycles": last[3], "records_written": last[2],
        "rss_start_mb": samples[0][1] / 1e6, "rss_after_warmup_mb": warm[1] / 1e6, "rss_end_mb": last[1] / 1e6,
        "rss_max_mb": max(s[1] for s in samples) / 1e6,
        "growth_after_warmup_mb": growth / 1e6, "allowed_mb": allowance / 1e6,
        "verdict": "flat" if growth <= allowance and not outcome["problems"] else "GROWS",
        "records_stored_mean_q2": round(second), "records_stored_mean_q4": round(fourth),
        "records_stored_end": last[4], "values_stored_end": last[5],
        "records_verdict": "flat" if fourth <= 1.1 * second else "GROWS",
    }]
    record = emit("soak", rows, vars(args) | {"samples": [(round(s[0], 1), *s[1:]) for s in samples]})
    if outcome["problems"]:
        raise SystemExit(f"records left open or values missing: {outcome['problems'][:5]}")
    if args.retention is not None and rows[0]["records_verdict"] != "flat":
        raise SystemExit(f"records in the store grew despite the retention: {second:.0f} -> {fourth:.0f}")
    if growth > allowance:
        raise SystemExit(f"memory grew {growth / 1e6:.1f} MB after warm-up, more than {allowance / 1e6:.1f} MB")
    return record
