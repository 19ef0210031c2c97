"""Instructions per materialization, counted by callgrind: a deterministic yardstick.

Wall time on a shared 2-core VM swings by up to 2x between identical runs, which
hides any change under about 20%. Instruction counts move far less: the hash
seed is fixed, and what still varies is what runs on timers (a batch's write-behind
every 10 ms, lease renewals) under valgrind's slowdown, a few percent between runs
of one commit for the chain. Use this to compare two versions of the hot path,
several runs each. Each
figure is (count for N+k runs - count for N runs) / materializations, which
cancels interpreter start-up and runtime opening. Needs valgrind.

``--store postgres`` counts the other side: every PostgreSQL process of a
throwaway cluster run under callgrind, while the store alone (no runtime) begins
and completes ``FLUSH_ROWS`` records at a time, as a backfill's batches do; the
figure is per record, (count for 1+k batches - count for 1 batch) / (k batches'
records). Autovacuum is off and checkpoints are an hour apart, so what is counted
is the statements' work; two runs of one schema agree to ~0.01%.

``--allocator pymalloc`` counts with Python's own allocator, as FlowStone runs;
the default, ``malloc`` (glibc's, as the figures in ``stress/README.md`` were
counted), includes glibc's consolidation of free memory, which moves with the
heap's layout: a change that saved ~200 instructions a chain's asset with
pymalloc read +13,400 with malloc. Count a small change both ways before
trusting it.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .report import emit

PG_WRAPPER = """#!/bin/sh
exec valgrind --tool=callgrind --trace-children=yes --callgrind-out-file={out}/cg.%p {postgres} "$@" 2>/dev/null
"""
"""What ``pg_ctl`` starts instead of ``postgres``: the server and every process it
forks, counted."""

ROOT = Path(__file__).resolve().parent.parent

WATCHED = """
import contextlib
async def consume(events):
    async for _ in events:
        pass
@contextlib.asynccontextmanager
async def watched(rt, count):
    # count subscribers of this tenant, each drained by a task of its own
    async with anyio.create_task_group() as tasks, contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            tasks.start_soon(consume, await stack.enter_async_context(rt.events()))
        yield
"""

CHAIN = """
import anyio, sys
from stress.runtime import chain
import flowstone as fs
{watched}
async def main():
    async with {store_open} fs.open_runtime(chain({length}, False), store={store}) as rt:
        for i in range(int(sys.argv[1])):
            with fs.tenant_scope(f"t{{i}}"):  # a fresh namespace: nothing to reuse, nothing to mark stale
                async with watched(rt, {subscribers}):
                    await rt.materialize("a{last}")
                    await rt.store.list_all(limit=1)  # until the write-behind is applied
anyio.run(main)
"""

BACKFILLS = """
import anyio, sys
from datetime import date, timedelta
from stress.runtime import {pipeline}
import flowstone as fs
{watched}
async def main():
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range({length})]
    async with {store_open} fs.open_runtime({pipeline}(False), store={store}) as rt:
        for i in range(int(sys.argv[1])):
            with fs.tenant_scope(f"t{{i}}"):
                async with watched(rt, {subscribers}):
                    for asset in {assets}:
                        await rt.wait_backfill(await rt.backfill(asset, partitions=days, max_parallel=20))
anyio.run(main)
"""
"""Backfills of ``assets`` of the ``pipeline`` (``stress.runtime``), one after the
other: ``daily``'s ``events``; ``reading``'s ``events`` then ``cleaned``, a reader
over stored upstream partitions (whose count, the row before, is taken off)."""
BACKFILL = {"pipeline": "daily", "assets": ("events",)}
READER = {"pipeline": "reading", "assets": ("events", "cleaned")}


def _instructions(code: str, runs: int, allocator: str) -> int:
    env = {**os.environ, "PYTHONMALLOC": allocator, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", code, str(runs)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=True,
    )
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no count:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def _server_instructions(records: int) -> int:
    """Instructions of every process of a fresh cluster (counted by callgrind) that
    migrated one database and wrote ``records`` records through the store alone."""
    import anyio

    from flowstone.testing.postgres import TemporaryPostgres, find_binaries

    from .postgres import _store_alone, fresh_database_from_any_loop

    with tempfile.TemporaryDirectory(prefix="flowstone-vg-") as folder:
        out = os.path.join(folder, "out")
        os.makedirs(out)
        os.chmod(folder, 0o755)  # the server runs as postgres when we are root: it must reach both
        os.chmod(out, 0o777)
        wrapper = os.path.join(folder, "postgres.sh")
        with open(wrapper, "w", encoding="ascii") as handle:
            handle.write(PG_WRAPPER.format(out=out, postgres=os.path.join(find_binaries(), "postgres")))
        os.chmod(wrapper, 0o755)
        cluster = TemporaryPostgres(program=wrapper, start_timeout=600, settings={
            "autovacuum": "off", "checkpoint_timeout": "1h", "max_wal_size": "10GB"}).start()
        try:
            dsn = anyio.run(fresh_database_from_any_loop, cluster.dsn(), "flowstone_counted")
            anyio.run(_store_alone, dsn, records, 10, lambda: None)
        finally:
            cluster.stop()  # each process writes its count as it exits
        total = 0
        for path in glob.glob(os.path.join(out, "cg.*")):
            with open(path, encoding="utf-8", errors="replace") as handle:
                found = re.search(r"^(?:summary|totals): (\d+)", handle.read(), re.M)
            total += int(found.group(1)) if found else 0
        return total


def _postgres_rows(runs: int) -> list[dict[str, Any]]:
    from flowstone.store.postgres import FLUSH_ROWS

    base, more = _server_instructions(FLUSH_ROWS), _server_instructions(FLUSH_ROWS * (1 + runs))
    return [{"measure": f"PostgreSQL server, every process: the store alone, {FLUSH_ROWS} records a batch, per record",
             "instructions": (more - base) // (FLUSH_ROWS * runs)}]


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress instructions", description=__doc__)
    parser.add_argument("--chain", type=int, default=100, help="assets in the chain")
    parser.add_argument("--partitions", type=int, default=366, help="partitions in the backfill")
    parser.add_argument("--runs", type=int, default=5, help="extra runs counted (more: steadier, slower)")
    parser.add_argument("--subscribers", type=int, default=0, help="event subscribers draining the events of each run")
    parser.add_argument("--store", choices=["memory", "sqlite", "postgres"], default="memory",
                        help="where records go (sqlite: a fresh file per count, WAL, synchronous=NORMAL; "
                             "postgres: the server's instructions instead, the store alone)")
    parser.add_argument("--allocator", choices=["malloc", "pymalloc"], default="malloc",
                        help="Python's allocator under callgrind (malloc: glibc's, as the recorded figures; "
                             "pymalloc: Python's own, as FlowStone runs)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    runs = max(1, args.runs)
    options = {"chain": args.chain, "partitions": args.partitions, "runs": runs,
               "subscribers": max(0, args.subscribers), "store": args.store, "allocator": args.allocator}
    if args.store == "postgres":
        return emit("instructions", _postgres_rows(runs), options)
    rows = []
    for what, template, length, which in (
        (f"{args.chain}-asset chain, per materialization", CHAIN, args.chain, {}),
        (f"{args.partitions}-partition backfill, per partition", BACKFILLS, args.partitions, BACKFILL),
        (f"{args.partitions}-partition backfill of a reader, upstream stored, per partition", BACKFILLS,
         args.partitions, READER),
    ):
        store_open, store = "", "None"
        if args.store == "sqlite":
            store_open, store = "fs.store.SqliteStore(tempfile.mkdtemp() + '/f.db') as store,", "store"
        code = template.format(length=length, last=length - 1, subscribers=max(0, args.subscribers), watched=WATCHED,
                               store_open=store_open, store=store, **which)
        code = "import tempfile\n" + code
        base, more = _instructions(code, 1, args.allocator), _instructions(code, 1 + runs, args.allocator)
        each = (more - base) // (runs * length)
        if which is READER:
            each -= rows[-1]["instructions"]  # the upstream's backfill, done in the same runs
        rows.append({"measure": what, "instructions": each})
    return emit("instructions", rows, options)
