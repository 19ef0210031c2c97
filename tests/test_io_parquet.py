"""ParquetIO on a local root and on S3 (moto on 127.0.0.1): the shared IO contract,
table shapes, atomic writes, and an unpartitioned asset reading every partition of
a partitioned one as one dataset. Asyncio and trio."""

from __future__ import annotations

import os
from datetime import date, timedelta

import pyarrow as pa
import pytest
from contracts.io import IOContract

import flowstone as fs

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(5)]


class _Tables:
    def put(self, data):
        return pa.Table.from_pylist([data])

    def got(self, value):
        assert isinstance(value, pa.Table)
        [row] = value.to_pylist()
        return row


class TestParquetIOLocal(_Tables, IOContract):
    @pytest.fixture
    async def io(self, tmp_path):
        async with fs.io.ParquetIO(tmp_path, durable=False) as io:
            yield io


class TestParquetIOOnS3(_Tables, IOContract):
    @pytest.fixture
    def config(self, s3_bucket):
        return {"bucket": s3_bucket, "prefix": "lake"}

    @pytest.fixture
    async def io(self, s3_server):
        async with fs.io.ParquetIO(s3=fs.io.S3IO(endpoint_url=s3_server.endpoint, session=s3_server.session())) as io:
            yield io


async def test_every_table_shape_loads_back_as_a_table_and_files_are_parquet(anyio_backend, tmp_path):
    io = fs.io.ParquetIO(tmp_path)
    expected = pa.table({"a": [1, 2], "b": ["x", "y"]})
    for shape in (expected, expected.to_batches()[0], expected.to_pylist(), expected.to_pydict()):
        await io.store("t", shape, "2025-01-01")
        loaded = await io.load("t", "2025-01-01")
        assert isinstance(loaded, pa.Table) and loaded.equals(expected)
    path = (await io.metadata("t", "2025-01-01"))["path"]
    with open(path, "rb") as file:
        assert file.read(4) == b"PAR1"
    assert sorted(os.listdir(os.path.dirname(path))) == ["2025-01-01.parquet"]  # no temporary file left
    for bad in ({"a": 1}, "text", [1, 2]):
        with pytest.raises(fs.SerializationError):
            await io.store("t", bad, "2025-01-01")
    assert (await io.load("t", "2025-01-01")).equals(expected)
    with pytest.raises(fs.DefinitionError):
        await io.store("t", expected, None, {"format": "json"})


@pytest.mark.parametrize("where", ["local", "s3"])
async def test_an_unpartitioned_asset_reads_every_partition_as_one_dataset(anyio_backend, tmp_path, where, request):
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        parquet = fs.io.ParquetIO(s3=fs.io.S3IO(endpoint_url=server.endpoint, session=server.session()))
        config = {"bucket": bucket}
    else:
        parquet, config = fs.io.ParquetIO(tmp_path), {}
    seen = {}

    async def events(ctx, deps):
        day = ctx.partition
        return {"day": [day.day] * day.day, "amount": [float(i) for i in range(day.day)]}

    async def summary(ctx, deps):
        tables = deps["events"]
        seen["keys"] = sorted(tables)
        seen["first"] = tables[DAYS[0]]
        seen["rows"] = tables.dataset().count_rows()
        whole = tables.to_table()
        return {"rows": whole.num_rows, "partitions": sorted(set(whole["partition"].to_pylist()))}

    assets = [
        fs.Asset(name="events", execute_fn=events, partitioned_by=DAILY, io_manager="parquet", io_config=config),
        fs.Asset(name="summary", execute_fn=summary, depends_on=("events",)),
    ]
    async with parquet, fs.open_runtime(assets, io_managers={"parquet": parquet}) as rt:
        await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=3))
        await rt.materialize("summary")
        result = await rt.load("summary")
    keys = [d.isoformat() for d in DAYS]
    assert seen["keys"] == keys
    assert seen["first"].to_pydict() == {"day": [1], "amount": [0.0]}
    assert seen["rows"] == 1 + 2 + 3 + 4 + 5
    assert result == {"rows": 15, "partitions": keys}


async def test_to_table_refuses_to_overwrite_a_column_named_like_the_partition(anyio_backend):
    tables = fs.io.PartitionedTables({"a": pa.table({"partition": [1]})})
    with pytest.raises(fs.SerializationError, match="partition_column"):
        tables.to_table()
    assert tables.to_table(partition_column="day").column_names == ["partition", "day"]
    assert tables.to_table(partition_column=None).num_rows == 1
