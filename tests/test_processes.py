"""Single flight across real OS processes sharing one PostgreSQL (ADR 0009).

The processes are synchronised on their output and their standard input, never on
time: the first prints when its function runs and then waits for a line on stdin;
the others print the lease they found held; only then is the first let go.
"""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest

import flowstone as fs
from flowstone.store import PostgresStore, Status
from flowstone.testing import check_integrity

pytestmark = pytest.mark.anyio

_RACER = """
import json, logging, os, sys
from datetime import date
import anyio
import flowstone as fs

logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
logging.getLogger("flowstone.runtime").setLevel(logging.INFO)
DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))

async def main(dsn):
    async def report(ctx, deps):
        print("computing", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # the test says when to finish
        return {"pid": os.getpid()}

    assets = [fs.Asset(name="report", execute_fn=report, partitioned_by=DAILY, code_version="1",
                       io_manager="postgres")]
    async with fs.store.PostgresStore(dsn) as store, fs.io.PostgresIO(dsn) as values:
        async with fs.open_runtime(assets, store=store, io_managers={"postgres": values}) as rt:
            result = await rt.materialize("report", date(2025, 1, 15))
            record = result.materializations["report"]
            print(json.dumps({"pid": os.getpid(), "record": str(record.id), "skipped": list(result.skipped),
                              "node": record.executor_node,
                              "value": await rt.load("report", date(2025, 1, 15))}), flush=True)

anyio.run(main, sys.argv[1])
"""


async def _line(process: subprocess.Popen) -> str:
    line = await anyio.to_thread.run_sync(process.stdout.readline)
    assert line, f"process {process.pid} ended early (exit {process.poll()})"
    return line.strip()


async def _until_line(process: subprocess.Popen, wanted: str) -> None:
    while wanted not in await _line(process):
        pass


async def test_three_processes_materializing_one_partition_compute_it_once(anyio_backend, pg_dsn):
    def start(stdin: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _RACER, pg_dsn], stdin=stdin, stdout=subprocess.PIPE, text=True)

    first = start(subprocess.PIPE)
    # The others' stdin is empty: if one of them computed too, it would not wait.
    others: list[subprocess.Popen] = []
    try:
        with anyio.fail_after(60):
            await _until_line(first, "computing")
            others = [start(subprocess.DEVNULL) for _ in range(2)]
            for other in others:
                await _until_line(other, "being computed by")  # they found the lease held and wait
            first.stdin.write("go\n")
            first.stdin.flush()
            outcomes = []
            for process in (first, *others):
                line = await _line(process)
                while not line.startswith("{"):  # skip log lines
                    line = await _line(process)
                outcomes.append(json.loads(line))
                assert await anyio.to_thread.run_sync(process.wait) == 0
    finally:
        for process in (first, *others):
            process.kill()
            process.wait()
            if process.stdin:
                process.stdin.close()
            process.stdout.close()
    computed, *waited = outcomes
    assert computed["skipped"] == [] and all(o["skipped"] == ["report"] for o in waited)
    assert {o["record"] for o in outcomes} == {computed["record"]}  # one record, reused by the others
    assert all(o["value"] == {"pid": computed["pid"]} for o in outcomes)  # the value is that computation's
    assert f":{computed['pid']}:" in computed["node"]
    async with PostgresStore(pg_dsn) as store, fs.io.PostgresIO(pg_dsn) as values:
        records = await store.list_all(asset_name="report")
        assert [(str(r.id), r.status) for r in records] == [(computed["record"], Status.SUCCESS)]
        (await check_integrity(store, "report", ["2025-01-15"], {"postgres": values})).raise_if_bad()
