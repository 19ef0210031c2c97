"""FlowStone against Dagster on the same work, in one run, on this machine.

The work is FlowStone's own benchmark shapes with trivial functions (each returns
1), so what is measured is each tool's cost per materialization:

- a 100-asset chain and a 1-200-1 fan, one run each (Dagster: ``materialize`` with
  its default in-memory instance; FlowStone: ``materialize`` on the memory store);
- 366 daily partitions of one asset (Dagster: one ``materialize(partition_key=...)``
  per partition, its in-process way to run partitions without a daemon, on an
  in-memory instance and on a SQLite instance (``DagsterInstance.local_temp()``);
  FlowStone: one ``backfill`` with ``max_parallel=20`` on the memory store and on
  its embedded SQLite store);
- 100,000 partitions: FlowStone only (at Dagster's pace, about 30 ms per partition,
  it would take most of an hour).

Each tool runs in a process of its own; times are taken inside it, after imports
and definitions, so start-up is not counted. Dagster is not a dependency of
FlowStone: give a Python that has it (``python3 -m venv /tmp/dagenv &&
/tmp/dagenv/bin/pip install dagster``) as ``--dagster-python``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .report import child_json, emit

ROOT = Path(__file__).resolve().parent.parent

DAGSTER = '''
import json, sys, tempfile, time, logging
from datetime import date, timedelta
import dagster as dg
logging.disable(logging.WARNING)
chain_length, fan_width, partitions, sqlite_partitions, repeat = map(int, sys.argv[1:6])

def chain(n):
    out = []
    for i in range(n):
        deps = [dg.AssetKey(f"a{i - 1}")] if i else []
        @dg.asset(name=f"a{i}", deps=deps)
        def step():
            return 1
        out.append(step)
    return out

def fan(n):
    @dg.asset(name="source")
    def source():
        return 1
    children = []
    for i in range(n):
        @dg.asset(name=f"c{i}", deps=["source"])
        def child():
            return 1
        children.append(child)
    @dg.asset(name="sink", deps=[f"c{i}" for i in range(n)])
    def sink():
        return 1
    return [source, *children, sink]

def timed(assets, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        assert dg.materialize(assets, raise_on_error=True).success
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

DAYS = dg.DailyPartitionsDefinition(start_date="2000-01-01")

@dg.asset(partitions_def=DAYS)
def events(context):
    return 1

def partitioned(count, instance):
    keys = [(date(2000, 1, 1) + timedelta(days=i)).isoformat() for i in range(count)]
    start = time.perf_counter()
    for key in keys:
        assert dg.materialize([events], partition_key=key, instance=instance, raise_on_error=True).success
    return time.perf_counter() - start

out = {"chain": timed(chain(chain_length), repeat), "fan": timed(fan(fan_width), repeat)}
with dg.DagsterInstance.ephemeral() as instance:
    out["partitions_memory"] = partitioned(partitions, instance)
if sqlite_partitions:
    with dg.DagsterInstance.local_temp() as instance:
        out["partitions_sqlite"] = partitioned(sqlite_partitions, instance)
out["version"] = dg.__version__
print(json.dumps(out))
'''

FLOWSTONE = '''
import json, sys, tempfile, time
from datetime import date, timedelta
from pathlib import Path
import anyio
import flowstone as fs
from stress.runtime import chain, daily, fan, time_backfill, time_materialize
from stress.sqlite import _backfill
chain_length, fan_width, partitions, sqlite_partitions, repeat, big = map(int, sys.argv[1:7])

def median_of(make, runs):
    times = sorted(anyio.run(make)[0] for _ in range(runs))
    return times[len(times) // 2]

out = {
    "chain": median_of(lambda: time_materialize(chain(chain_length, False), f"a{chain_length - 1}"), repeat),
    "fan": median_of(lambda: time_materialize(fan(fan_width, False), "sink"), repeat),
    "partitions_memory": median_of(lambda: time_backfill(daily(False), partitions, 20), repeat),
}
if sqlite_partitions:
    with tempfile.TemporaryDirectory() as folder:
        runs = [anyio.run(_backfill, Path(folder) / f"r{i}.db", sqlite_partitions, "NORMAL", False)[0]
                for i in range(repeat)]
    out["partitions_sqlite"] = sorted(runs)[len(runs) // 2]
if big:
    out["partitions_big"] = anyio.run(lambda: time_backfill(daily(False), big, 20))[0]
print(json.dumps(out))
'''


def _measure(python: str, code: str, args: list[int], timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = child_json([python, "-c", code, *map(str, args)], timeout=timeout, cwd=str(ROOT),
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress dagster", description=__doc__)
    parser.add_argument("--dagster-python", required=True, help="a Python that can import dagster")
    parser.add_argument("--chain", type=int, default=100, help="assets in the chain")
    parser.add_argument("--fan", type=int, default=200, help="branches of the fan")
    parser.add_argument("--partitions", type=int, default=366, help="daily partitions, memory records")
    parser.add_argument("--sqlite-partitions", type=int, default=366,
                        help="daily partitions, SQLite records (0: skip)")
    parser.add_argument("--big", type=int, default=100_000, help="partitions FlowStone alone backfills (0: skip)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each FlowStone figure and of Dagster's chain/fan")
    args = parser.parse_args(argv)
    shape = [args.chain, args.fan, args.partitions, args.sqlite_partitions, max(1, args.repeat)]
    theirs = _measure(args.dagster_python, DAGSTER, shape, timeout=3600)
    ours = _measure(sys.executable, FLOWSTONE, [*shape, args.big], timeout=3600)
    rows = []
    for key, what, count in (
        ("chain", f"{args.chain}-asset chain, one run", args.chain),
        ("fan", f"1-{args.fan}-1 fan, one run", args.fan + 2),
        ("partitions_memory", f"{args.partitions} daily partitions, records in memory", args.partitions),
        ("partitions_sqlite", f"{args.sqlite_partitions} daily partitions, records in SQLite", args.sqlite_partitions),
        ("partitions_big", f"{args.big} daily partitions, records in memory", args.big),
    ):
        if key not in ours:
            continue
        mine, other = ours[key], theirs.get(key)
        rows.append({
            "work": what,
            "flowstone_s": round(mine, 4),
            "flowstone_us_each": round(mine * 1e6 / count, 1),
            "dagster_s": None if other is None else round(other, 3),
            "dagster_ms_each": None if other is None else round(other * 1e3 / count, 2),
            "x_faster": None if other is None else round(other / mine, 1),
        })
    return emit("dagster", rows, {**vars(args), "dagster_version": theirs.get("version")})
