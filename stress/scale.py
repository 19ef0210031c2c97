"""One backfill of trivial daily partitions on the memory store at each of several sizes.

Does the cost per partition stay flat from 366 to 1,000,000 partitions (issue #18)?
Each size runs in a fresh process: one ``backfill`` with ``max_parallel=20`` of an
``async def`` returning 1. Printed per size: microseconds per partition, how much of
that Python's garbage collector took (full collections walk everything the store
holds, so they are what grows with the size), and memory: peak RSS, and RSS per
partition above the process before the backfill (the store's records and values,
with the runtime's own share; ``stress memory`` splits the two).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .report import child_json, emit

ROOT = Path(__file__).resolve().parent.parent

ONE_SIZE = '''
import contextlib, gc, json, sys, time
import anyio
from stress.report import peak_rss_bytes, rss_bytes
from stress.runtime import daily, time_backfill

count = int(sys.argv[1])
spent = {0: 0.0, 1: 0.0, 2: 0.0}
runs = {0: 0, 1: 0, 2: 0}
started = [0.0]

def watch(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        spent[info["generation"]] += time.perf_counter() - started[0]
        runs[info["generation"]] += 1

@contextlib.contextmanager
def watching():  # the backfill's collections only, not the runtime's opening
    gc.callbacks.append(watch)
    try:
        yield
    finally:
        gc.callbacks.remove(watch)

gc.collect()
before = rss_bytes()
elapsed, _status = anyio.run(lambda: time_backfill(daily(False), count, 20, watching()), backend=sys.argv[2])
print(json.dumps({"elapsed": elapsed, "full_gc": spent[2], "young_gc": spent[0] + spent[1],
                  "full_collections": runs[2], "rss_before": before, "peak_rss": peak_rss_bytes()}))
'''


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress scale", description=__doc__)
    parser.add_argument("--sizes", default="366,10000,100000,1000000", help="partitions per backfill, comma-separated")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--sizes: give partition counts >= 1, e.g. 366,10000")
    rows = []
    for size in sizes:
        got = child_json([sys.executable, "-c", ONE_SIZE, str(size), args.backend], timeout=3600, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append({
            "partitions": size,
            "seconds": round(got["elapsed"], 3),
            "us_per_partition": round(got["elapsed"] * 1e6 / size, 1),
            "full_gc_us_per_partition": round(got["full_gc"] * 1e6 / size, 1),
            "young_gc_us_per_partition": round(got["young_gc"] * 1e6 / size, 1),
            "full_collections": got["full_collections"],
            "peak_rss_mb": round(got["peak_rss"] / 1e6, 1),
            "rss_bytes_per_partition": round((got["peak_rss"] - got["rss_before"]) / size),
        })
    return emit("scale", rows, {"sizes": sizes, "backend": args.backend})
