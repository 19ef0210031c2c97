"""Cost of the core pieces every materialization leans on: planning and partition keys.

The runtime's budget for a 100-asset chain is 14 ms in total (issue #3), so the
plan must cost a small fraction of it; a 100,000-partition backfill serializes
every key at least once, so key encoding must not be what bounds it.
"""

from __future__ import annotations

import argparse
from datetime import date, datetime, timedelta, timezone
from typing import Any

import flowstone as fs
from flowstone.runtime.hashing import code_versions

from .report import emit, median, timed


def _fn(ctx: Any, deps: Any) -> None:
    return None


def chain(length: int) -> list[fs.Asset]:
    return [
        fs.Asset(name=f"a{i}", depends_on=(f"a{i - 1}",) if i else (), execute_fn=_fn)
        for i in range(length)
    ]


_HELPERS = """
RATE = 0.2
TABLE = {f"k{i}": i for i in range(100)}
def rounded(x):
    return round(x, 2)
def with_tax(x):
    return rounded(x * (1 + RATE))
def lookup(key):
    return TABLE.get(key, 0)
"""


def versioned_pipeline(count: int) -> list[fs.Asset]:
    """``count`` assets with functions of their own that call shared helpers and read
    module constants, as a real package's would: what automatic code versions walk."""
    import types

    helpers = types.ModuleType("bench_pkg.helpers")
    exec(compile(_HELPERS, "<bench_pkg/helpers.py>", "exec"), helpers.__dict__)
    module = types.ModuleType("bench_pkg.assets")
    module.__dict__["helpers"] = helpers
    source = "".join(
        f"LIMIT_{i} = {i}\ndef f{i}(ctx, deps):\n    'Asset {i}.'\n"
        f"    return helpers.with_tax(LIMIT_{i}) + helpers.lookup('k{i % 100}')\n"
        for i in range(count)
    )
    exec(compile(source, "<bench_pkg/assets.py>", "exec"), module.__dict__)
    return [fs.Asset(name=f"a{i}", execute_fn=getattr(module, f"f{i}")) for i in range(count)]


def fan(width: int) -> list[fs.Asset]:
    children = [fs.Asset(name=f"c{i}", depends_on=("source",), execute_fn=_fn) for i in range(width)]
    sink = fs.Asset(name="sink", depends_on=tuple(c.name for c in children), execute_fn=_fn)
    return [fs.Asset(name="source", execute_fn=_fn), *children, sink]


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress core", description=__doc__)
    parser.add_argument("--repeat", type=int, default=20, help="timed repetitions per row (median shown)")
    parser.add_argument("--keys", type=int, default=100_000, help="partition keys per key row")
    args = parser.parse_args(argv)
    repeat, n = max(1, args.repeat), max(1, args.keys)

    rows = []

    def row(what: str, samples: list[float], items: int) -> None:
        best = median(samples)
        rows.append({
            "measure": what,
            "items": items,
            "median_ms": best * 1e3,
            "us_per_item": best * 1e6 / items,
        })

    long_chain, wide = chain(100), fan(200)
    chain_graph = fs.AssetGraph(long_chain)
    row("graph build: 100-asset chain", timed(lambda: fs.AssetGraph(long_chain), repeat), 100)
    row("build + first plan: 100-asset chain",
        timed(lambda: fs.AssetGraph(long_chain).execution_order("a99"), repeat), 100)
    row("plan on built graph: 100-asset chain", timed(lambda: chain_graph.execution_order("a99"), repeat), 100)
    wide_graph = fs.AssetGraph(wide)
    row("layers on built graph: 1-200-1 fan", timed(lambda: wide_graph.layers("sink"), repeat), 202)
    big = fs.Pipeline("big", assets=chain(1000))
    row("validate: 1000-asset pipeline", timed(big.validate, max(1, repeat // 4)), 1000)
    versioned = versioned_pipeline(1000)
    row("automatic code versions: 1000 assets with helpers and constants",
        timed(lambda: code_versions(versioned), max(1, repeat // 4)), 1000)

    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(n)]
    row("serialize date keys", timed(lambda: [fs.serialize_partition(d) for d in days], 3), n)
    keys = [fs.serialize_partition(d) for d in days]
    row("deserialize date keys", timed(lambda: [fs.deserialize_partition(k, "date") for k in keys], 3), n)
    combos = [("tenant|1", "eu", d) for d in days]
    row("serialize composite keys", timed(lambda: [fs.serialize_partition(c) for c in combos], 3), n)
    ckeys = [fs.serialize_partition(c) for c in combos]
    kind = ("string", "string", "date")
    row("deserialize composite keys", timed(lambda: [fs.deserialize_partition(k, kind) for k in ckeys], 3), n)
    start = datetime(2000, 1, 1, tzinfo=timezone.utc)
    stop = start + timedelta(hours=n - 1)
    row("partition_range hourly", timed(lambda: fs.partition_range(start, stop, "hour"), 3), n)

    return emit("core", rows, {"repeat": repeat, "keys": n})
