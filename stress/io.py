"""Object storage and analytics I/O (issue #5 figures).

1. Round trip (store, then load) of a ``--rows``-row, 3-column table through
   ParquetIO on a local root and through S3IO(parquet) against moto's S3 server
   on 127.0.0.1: time and peak memory. Each round trip runs in a fresh child
   process so that its peak is its own: the child warms up with a tiny round
   trip (imports), resets the kernel's peak-RSS counter, builds the table, and
   reports how far above that baseline the process went, as a multiple of the
   table's in-memory size (target < 3;
   the figure counts the table itself, what storing it took and the loaded copy,
   and the original table stays alive, as a caller's would).
2. A ``--partitions``-partition backfill with S3IO(json), and where its time
   goes: the same backfill on memory IO (FlowStone's own share) and a bare
   aioboto3 put on the same client (the S3 round trip).

The moto server runs in a process of its own, so its memory and CPU are not
counted as the client's (it shares the machine's two cores, though).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from typing import Any

import anyio

import flowstone as fs

from .report import child_json, emit, median, peak_rss_bytes, rss_bytes

CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}
BUCKET = "flowstone-bench"
_SERVER = """
import sys
from moto.server import ThreadedMotoServer
import logging
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes it
server.stop()
"""


class MotoProcess:
    """moto's S3 server on 127.0.0.1 in a child process; ``endpoint`` while running."""

    def __enter__(self) -> MotoProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        port = int(self.process.stdout.readline())  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **CREDENTIALS).create_bucket(Bucket=BUCKET)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _reset_peak() -> bool:
    """Make the kernel's peak-RSS counter start again from now (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _table(rows: int) -> Any:
    # Built column by column in Arrow, without Python lists: the process's memory
    # after this is the table, not temporaries.
    import array

    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(array.array("q", range(rows)))])
    values = pc.multiply(pc.cast(ids, pa.float64()), 1.5)
    categories = pc.take(pa.array(["alpha", "beta", "gamma", "delta"]), pc.bit_wise_and(ids, 3))
    return pa.table({"id": ids, "value": values, "category": categories})


def child(where: str, rows: int, endpoint: str | None) -> dict[str, Any]:
    """One round trip in this (fresh) process; what it measured."""
    import aioboto3
    import pyarrow as pa

    # A small round trip first: imports and first-use set-up (pyarrow's Parquet
    # module, botocore's service model, the HTTP session) are not the table's cost.
    anyio.run(_warm_up, where, endpoint)
    table = _table(rows)
    table_bytes = table.nbytes
    # Building the table left the allocators some freed temporaries; counting the
    # table as exactly its size from here keeps them out of the figure.
    reset = _reset_peak()
    baseline = rss_bytes() - table_bytes

    async def round_trip() -> tuple[float, float, Any]:
        if where == "local":
            with tempfile.TemporaryDirectory() as root:
                io = fs.io.ParquetIO(root)
                return await _store_load(io, {}, table)
        s3 = fs.io.S3IO(endpoint_url=endpoint, session=aioboto3.Session(**CREDENTIALS))
        async with fs.io.ParquetIO(s3=s3) as io:
            return await _store_load(io, {"bucket": BUCKET, "prefix": "roundtrip"}, table)

    stored_s, loaded_s, loaded = anyio.run(round_trip)
    peak = peak_rss_bytes()
    if not isinstance(loaded, pa.Table) or not loaded.equals(table):
        raise SystemExit("the table did not come back equal")
    return {
        "table_bytes": table_bytes, "store_s": stored_s, "load_s": loaded_s,
        # From before the table existed to the highest point of the round trip: the
        # table itself, what storing it took, and the loaded copy.
        "peak_over_baseline": peak - baseline, "peak_reset": reset,
    }


async def _warm_up(where: str, endpoint: str | None) -> None:
    import aioboto3

    small = _table(10)
    if where == "local":
        with tempfile.TemporaryDirectory() as root:
            await _store_load(fs.io.ParquetIO(root), {}, small)
        return
    s3 = fs.io.S3IO(endpoint_url=endpoint, session=aioboto3.Session(**CREDENTIALS))
    async with fs.io.ParquetIO(s3=s3) as io:
        await _store_load(io, {"bucket": BUCKET, "prefix": "warm-up"}, small)


async def _store_load(io: Any, config: dict[str, Any], table: Any) -> tuple[float, float, Any]:
    start = time.perf_counter()
    await io.store("big", table, None, config)
    stored = time.perf_counter()
    loaded = await io.load("big", None, config)
    return stored - start, time.perf_counter() - stored, loaded


def _in_child(where: str, rows: int, endpoint: str | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "stress", "io", "--child", where, "--rows", str(rows)]
    if endpoint:
        command += ["--endpoint", endpoint]
    result: dict[str, Any] = child_json(command, timeout=600, cwd=os.getcwd())
    return result


async def _backfill(io_key: str, io: Any, count: int, config: dict[str, Any]) -> tuple[float, float]:
    """Seconds the backfill took, and the CPU seconds this process spent meanwhile."""
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(count)]

    async def events(ctx: Any, deps: Any) -> Any:
        return {"day": ctx.partition_key, "amount": ctx.partition.day}

    asset = fs.Asset(
        name="events", execute_fn=events, partitioned_by=fs.DailyPartitions(start=date(2000, 1, 1)),
        io_manager=io_key, io_config=config,
    )
    async with fs.open_runtime([asset], io_managers={io_key: io}) as rt:
        start, cpu = time.perf_counter(), time.process_time()
        status = await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=20))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if status.succeeded != count:
        raise SystemExit(f"backfill incomplete: {status}")
    return elapsed, cpu


async def _bare_puts(endpoint: str, count: int) -> float:
    """Median seconds of one put_object of a small JSON body on a warm client."""
    import aioboto3

    session = aioboto3.Session(**CREDENTIALS)
    samples = []
    async with session.client("s3", endpoint_url=endpoint) as client:
        for index in range(count):
            start = time.perf_counter()
            await client.put_object(Bucket=BUCKET, Key=f"bare/{index}.json", Body=b'{"day":"2000-01-01","amount":1}')
            samples.append(time.perf_counter() - start)
    return median(samples)


def run(argv: list[str]) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m stress io", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the round-trip table")
    parser.add_argument("--partitions", type=int, default=366, help="partitions in the S3IO(json) backfill")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--child", choices=["local", "s3"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.endpoint)))
        return None

    rows: list[dict[str, Any]] = []
    with MotoProcess() as moto:
        for where, label in (
            ("local", "ParquetIO, local root"), ("s3", "S3IO(parquet) via ParquetIO, moto on loopback"),
        ):
            runs = [_in_child(where, args.rows, moto.endpoint) for _ in range(max(1, args.repeat))]
            best = min(runs, key=lambda r: r["store_s"] + r["load_s"])
            if not all(r["peak_reset"] for r in runs):
                raise SystemExit("this kernel cannot reset the peak-RSS counter; the memory figure would be wrong")
            worst_ratio = max(r["peak_over_baseline"] / r["table_bytes"] for r in runs)
            rows.append({
                "scenario": f"{args.rows:,}-row table round trip: {label}",
                "median_ms": median([(r["store_s"] + r["load_s"]) * 1e3 for r in runs]),
                "store_ms": median([r["store_s"] * 1e3 for r in runs]),
                "load_ms": median([r["load_s"] * 1e3 for r in runs]),
                "best_ms": (best["store_s"] + best["load_s"]) * 1e3,
                "table_mb": runs[0]["table_bytes"] / 1e6,
                "peak_x_table": worst_ratio,
                "target": "peak < 3x table",
            })

        count = args.partitions
        import aioboto3

        async def on_s3() -> tuple[float, float]:
            s3 = fs.io.S3IO(endpoint_url=moto.endpoint, session=aioboto3.Session(**CREDENTIALS))
            async with s3:
                return await _backfill("s3", s3, count, {"bucket": BUCKET, "prefix": "backfill"})

        s3_runs = [anyio.run(on_s3, backend=args.backend) for _ in range(max(1, args.repeat))]
        memory_runs = [
            anyio.run(_backfill, "memory", fs.io.MemoryIO(), count, {}, backend=args.backend)
            for _ in range(max(1, args.repeat))
        ]
        put = anyio.run(_bare_puts, moto.endpoint, 50)
        s3_s, memory_s = median([r[0] for r in s3_runs]), median([r[0] for r in memory_runs])
        rows.append({
            "scenario": f"{count} partitions, S3IO(json), max_parallel=20",
            "median_ms": s3_s * 1e3, "best_ms": min(r[0] for r in s3_runs) * 1e3, "per_second": count / s3_s,
            "x_faster_than_dagster": 11.0 * count / 365 / s3_s,
            # Near 1.0: bound by this process's CPU (signing, HTTP); well below: waiting on the server.
            "client_cpu_share": median([cpu / elapsed for elapsed, cpu in s3_runs]),
        })
        rows.append({
            "scenario": "  of which FlowStone's own (same backfill, memory IO)",
            "median_ms": memory_s * 1e3, "best_ms": min(r[0] for r in memory_runs) * 1e3,
        })
        rows.append({
            "scenario": "  one bare aioboto3 put_object to moto (median of 50, sequential)",
            "median_ms": put * 1e3, "note": f"x{count} / 20 in parallel = {put * count / 20 * 1e3:.0f} ms if S3 scaled",
        })
    return emit("io", rows, {"rows": args.rows, "partitions": args.partitions, "repeat": args.repeat,
                             "backend": args.backend, "server": "moto on 127.0.0.1, own process"})
