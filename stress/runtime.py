"""Runtime figures of issue #3: chains, fans and backfills on the memory store and IO.

Asset functions are trivial ``async def``s (the work measured is FlowStone's);
``--sync`` uses plain functions instead, which pay a worker-thread hand-off each.
Each figure is the median of ``--repeat`` fresh runtimes. Peak RSS is the whole
process's, read after the run.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs
from flowstone.plumbing import threads
from flowstone.plumbing.clock import utcnow
from flowstone.plumbing.collector import tune_collector
from flowstone.runtime.hashing import dependency_hash
from flowstone.store.records import new_record

from .report import child_json, emit, median, peak_rss_bytes


def _fn(is_sync: bool) -> Any:
    if is_sync:
        def work(ctx: Any, deps: Any) -> int:
            return 1
        return work

    async def awork(ctx: Any, deps: Any) -> int:
        return 1
    return awork


def chain(length: int, is_sync: bool) -> fs.Pipeline:
    fn = _fn(is_sync)
    return fs.Pipeline("chain", assets=[
        fs.Asset(name=f"a{i}", depends_on=(f"a{i - 1}",) if i else (), execute_fn=fn, code_version="1")
        for i in range(length)
    ])


def fan(width: int, is_sync: bool) -> fs.Pipeline:
    fn = _fn(is_sync)
    children = [fs.Asset(name=f"c{i}", depends_on=("source",), execute_fn=fn, code_version="1") for i in range(width)]
    return fs.Pipeline("fan", assets=[
        fs.Asset(name="source", execute_fn=fn, code_version="1"),
        *children,
        fs.Asset(name="sink", depends_on=tuple(c.name for c in children), execute_fn=fn, code_version="1"),
    ])


def daily(is_sync: bool) -> fs.Pipeline:
    return fs.Pipeline("daily", assets=[
        fs.Asset(name="events", execute_fn=_fn(is_sync), code_version="1",
                 partitioned_by=fs.DailyPartitions(start=date(2000, 1, 1)))
    ])


def reading(is_sync: bool) -> fs.Pipeline:
    """``daily``'s ``events`` and ``cleaned``, which reads each of its partitions."""
    events = daily(is_sync).assets[0]

    async def cleaned(ctx: Any, deps: dict[str, Any]) -> Any:
        return deps["events"]

    return fs.Pipeline("reading", assets=[events, fs.Asset(
        name="cleaned", execute_fn=cleaned, code_version="1", partitioned_by=events.partitioned_by,
        depends_on=("events",))])


@contextmanager
def collector_as_cli(tune: bool) -> Iterator[None]:
    """With ``tune``: the garbage collector set as the command line sets it once its
    runtime is open (``tune_collector``: start-up frozen out of every pass, young
    passes every 50,000 objects), for the measured part only; then as it was, the
    frozen objects given back (a frozen runtime, closed, would never be freed)."""
    if not tune:
        yield
        return
    threshold = gc.get_threshold()
    tune_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def time_materialize(
    pipeline: fs.Pipeline, target: str, around: AbstractContextManager[Any] | None = None,
) -> tuple[float, int]:
    async with fs.open_runtime(pipeline) as rt:
        with around if around is not None else nullcontext():
            start = time.perf_counter()
            result = await rt.materialize(target)
            await rt.store.list_all(limit=1)  # until every write-behind of the run is applied
            elapsed = time.perf_counter() - start
    return elapsed, len(result.materializations)


async def time_backfill(
    pipeline: fs.Pipeline, count: int, max_parallel: int, around: AbstractContextManager[Any] | None = None,
) -> tuple[float, Any]:
    """Seconds of one backfill of ``count`` daily partitions in an open runtime, and
    its status; ``around`` is entered for exactly the timed part (``stress scale``
    counts the collector's time there, not the runtime's opening)."""
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with fs.open_runtime(pipeline) as rt:
        with around if around is not None else nullcontext():
            start = time.perf_counter()
            backfill = await rt.backfill("events", partitions=days, max_parallel=max_parallel)
            status = await rt.wait_backfill(backfill)
            elapsed = time.perf_counter() - start
        # Each partition's newest record says success: checked from the partition
        # states, so the check does not build every record at once (that would be
        # the peak of memory the scenarios report, not the backfill's).
        states = await rt.store.partition_states("events")
        succeeded = sum(1 for state in states.values() if state is fs.Status.SUCCESS)
    if status.succeeded != count or len(states) != count or succeeded != count:
        raise SystemExit(f"backfill incomplete: {status}; {succeeded} of {len(states)} partitions say success")
    return elapsed, status


async def time_reader_backfill(
    count: int, max_parallel: int, is_sync: bool, around: AbstractContextManager[Any] | None = None,
) -> tuple[float, Any]:
    """Seconds of a backfill of ``cleaned`` (``reading``) over ``count`` partitions
    whose upstream ``events`` partitions are all stored, up to date (backfilled
    first, untimed): only the reader runs, loading each input."""
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]
    async with fs.open_runtime(reading(is_sync)) as rt:
        await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=max_parallel))
        with around if around is not None else nullcontext():
            start = time.perf_counter()
            status = await rt.wait_backfill(await rt.backfill("cleaned", partitions=days, max_parallel=max_parallel))
            elapsed = time.perf_counter() - start
    if status.succeeded != count:
        raise SystemExit(f"reader backfill incomplete: {status}")
    return elapsed, status


async def cost_split(n: int = 2000) -> list[dict[str, Any]]:
    """What the pieces of one materialization cost, each measured alone in a live runtime."""
    rows = []

    def row(what: str, seconds: float, per_materialization: str) -> None:
        rows.append({"piece": what, "us_each": seconds / n * 1e6, "per_materialization": per_materialization})

    async with fs.open_runtime(chain(1, False)) as rt:
        store, io = rt.store, rt._env.io_managers["memory"]
        record = await store.create(asset_name="x")
        start = time.perf_counter()
        for _ in range(n):
            await store.get_by_id(record.id)
        row("actor round trip (call + reply)", time.perf_counter() - start,
            "0 (the lease comes from the executor's gate directly)")
        start = time.perf_counter()
        for i in range(n):
            await io.store("x", i, None, {})
        await store.list_all(limit=1)  # wait until any the actor was sent are applied
        row("write cast to the memory store (handled in place while no other cast waits)", time.perf_counter() - start,
            "3 (create, value, complete)")
        fields = dict(asset_name="a1", run_id=uuid.uuid4(), status="running", started_at=utcnow(),
                      upstream_assets=("a0",), upstream_partitions={"a0": (None,)}, dependency_hash="0" * 64)
        start = time.perf_counter()
        for _ in range(n):
            new_record(fields, None, utcnow())
        row("build and check a record", time.perf_counter() - start, "1 (+1 cheaper copy on completion)")
        ids = [uuid.uuid4()]
        start = time.perf_counter()
        for _ in range(n):
            dependency_hash("1", None, {"a0": ids})
        row("dependency hash", time.perf_counter() - start, "1")

        async def nothing() -> None:
            return None

        start = time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for _ in range(n):
                tasks.start_soon(nothing)
        row("task spawn (avoided: jobs run in the caller's task)", time.perf_counter() - start,
            "0 in a chain; 1 per extra branch")

        def plain() -> int:
            return 1

        start = time.perf_counter()
        for _ in range(n // 4):
            await threads.run_sync(plain)
        rows.append({"piece": "worker-thread hand-off", "us_each": (time.perf_counter() - start) / (n // 4) * 1e6,
                     "per_materialization": "1 for a plain (def) asset, 0 for async def"})
    return rows


def _backfill_in_fresh_process(backend: str, is_sync: bool) -> dict[str, float]:
    """The 366-partition backfill alone in a new interpreter: its whole-process
    peak memory (what the issue's figure is about) and its cold time."""
    code = (
        "import anyio, json\n"
        "from stress.report import peak_rss_bytes\n"
        "from stress.runtime import daily, time_backfill\n"
        f"elapsed, _ = anyio.run(lambda: time_backfill(daily({is_sync}), 366, 20), backend={backend!r})\n"
        "print(json.dumps({'elapsed_ms': elapsed * 1e3, 'peak_rss_mb': peak_rss_bytes() / 1e6}))\n"
    )
    result: dict[str, float] = child_json([sys.executable, "-c", code], timeout=120)
    return result


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress runtime", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--sync", action="store_true", help="plain (threaded) asset functions")
    parser.add_argument("--big", type=int, default=100_000, help="partitions in the large backfill (0 skips it)")
    parser.add_argument("--tune-gc", action="store_true",
                        help="set the garbage collector once each runtime is open, as the command line does")
    args = parser.parse_args(argv)
    tuned = args.tune_gc
    repeat = max(1, args.repeat)
    rows: list[dict[str, Any]] = []

    def measure(what: str, target_ms: float | None, dagster_s: float | None, make: Any, per: int) -> None:
        samples = []
        for _ in range(repeat):
            gc.collect()
            samples.append(anyio.run(make, backend=args.backend)[0])
        middle = median(samples)
        row = {
            "scenario": what,
            "median_ms": middle * 1e3,
            "best_ms": min(samples) * 1e3,  # the least disturbed run: this machine is noisy
            "us_per_materialization": middle * 1e6 / per,
        }
        if target_ms is not None:
            row["target_ms"] = target_ms
        if dagster_s is not None:
            row["x_faster_than_dagster"] = dagster_s / middle
        rows.append(row)

    measure("100-asset chain, one materialize", 14, 1.4,
            lambda: time_materialize(chain(100, args.sync), "a99", collector_as_cli(tuned)), 100)
    measure("1-200-1 fan, one materialize", 33, 3.3,
            lambda: time_materialize(fan(200, args.sync), "sink", collector_as_cli(tuned)), 202)
    measure("366 daily partitions, max_parallel=20", 110, 11.0 * 366 / 365,
            lambda: time_backfill(daily(args.sync), 366, 20, collector_as_cli(tuned)), 366)
    measure("366 partitions of a reader, upstream stored, max_parallel=20", None, None,
            lambda: time_reader_backfill(366, 20, args.sync, collector_as_cli(tuned)), 366)
    alone = _backfill_in_fresh_process(args.backend, args.sync)
    rows.append({
        "scenario": "366 partitions in a fresh process (cold): peak RSS MB",
        "median_ms": alone["elapsed_ms"], "value": alone["peak_rss_mb"], "target_ms": "< 50 MB",
    })
    if args.big:
        elapsed, _status = anyio.run(lambda: time_backfill(daily(args.sync), args.big, 20, collector_as_cli(tuned)),
                                     backend=args.backend)
        rows.append({
            "scenario": f"{args.big} daily partitions, max_parallel=20",
            "median_ms": elapsed * 1e3,
            "us_per_materialization": elapsed * 1e6 / args.big,
            "value": peak_rss_bytes() / 1e6,
            "note": "value = peak RSS MB",
        })
    for piece in anyio.run(cost_split, backend=args.backend):
        rows.append({"scenario": f"cost: {piece['piece']}", "value": piece["us_each"],
                     "note": f"us each; x{piece['per_materialization']}"})
    return emit("runtime", rows, {"repeat": repeat, "backend": args.backend, "sync": args.sync, "big": args.big,
                                  "tune_gc": tuned})
