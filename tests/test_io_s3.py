"""S3IO against moto's S3 server on 127.0.0.1 (real HTTP, real aioboto3 client):
the shared IO contract in every format, key layout, multipart uploads, error codes,
credentials, and the server going away. Asyncio and trio."""

from __future__ import annotations

from datetime import date, timedelta

import anyio
import pyarrow as pa
import pytest
from backends import ASYNCIO
from contracts.io import IOContract
from s3fixtures import CREDENTIALS

import flowstone as fs

pytestmark = pytest.mark.anyio


class TestS3IOContract(IOContract):
    @pytest.fixture
    def config(self, s3_bucket):
        return {"bucket": s3_bucket, "prefix": "team/flowstone"}

    @pytest.fixture
    async def io(self, s3_server):
        async with fs.io.S3IO(endpoint_url=s3_server.endpoint, session=s3_server.session()) as io:
            yield io


class TestS3IOAsParquet(TestS3IOContract):
    @pytest.fixture
    def config(self, s3_bucket):
        return {"bucket": s3_bucket, "format": "parquet"}

    def put(self, data):
        return pa.Table.from_pylist([data])

    def got(self, value):
        [row] = value.to_pylist()
        return row


async def test_keys_follow_the_layout_and_every_format_round_trips(anyio_backend, s3_server, s3_bucket):
    table = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]})
    async with fs.io.S3IO(endpoint_url=s3_server.endpoint, session=s3_server.session()) as io:
        for fmt, value in (("json", {"a": [1]}), ("parquet", table), ("arrow", table), ("bytes", b"\x00raw")):
            config = {"bucket": s3_bucket, "prefix": "p/q", "format": fmt}
            with fs.tenant_scope("acme/eu"):
                await io.store("orders", value, "2025-01-01", config)
                loaded = await io.load("orders", "2025-01-01", config)
                meta = await io.metadata("orders", "2025-01-01", config)
            assert loaded.equals(value) if isinstance(value, pa.Table) else loaded == value
            assert meta["size_bytes"] > 0 and meta["etag"] and meta["updated_at"].tzinfo is not None
    keys = sorted(o["Key"] for o in s3_server.admin().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [
        f"p/q/acme%2Feu/orders/2025-01-01.{ext}" for ext in ("arrow", "bin", "json", "parquet")
    ]


async def test_a_large_value_is_uploaded_in_parts(anyio_backend, s3_server, s3_bucket):
    payload = bytes(range(256)) * (12 * 1024 * 1024 // 256 + 7)  # 12 MiB and a bit: three parts of 5 MiB
    config = {"bucket": s3_bucket, "format": "bytes"}
    async with fs.io.S3IO(
        endpoint_url=s3_server.endpoint, session=s3_server.session(),
        part_size=5 * 1024 * 1024, multipart_threshold=5 * 1024 * 1024,
    ) as io:
        await io.store("blob", payload, None, config)
        assert await io.load("blob", None, config) == payload
        meta = await io.metadata("blob", None, config)
    assert meta["size_bytes"] == len(payload)
    assert meta["etag"].endswith("-3")  # S3's etag of a three-part upload
    assert s3_server.admin().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


async def test_s3_errors_keep_their_code_and_bad_config_is_refused(anyio_backend, s3_server, s3_bucket):
    async with fs.io.S3IO(endpoint_url=s3_server.endpoint, session=s3_server.session()) as io:
        with pytest.raises(fs.StorageError) as info:
            await io.store("a", {"v": 1}, None, {"bucket": "no-such-bucket-here"})
        assert info.value.code == "NoSuchBucket" and info.value.asset == "a"
        for config in ({}, {"bucket": "UPPER"}, {"bucket": s3_bucket, "prefix": "../up"},
                       {"bucket": s3_bucket, "prefix": "a b"}, {"bucket": s3_bucket, "prefix": "x" * 100}):
            with pytest.raises(fs.DefinitionError):
                await io.store("a", {"v": 1}, None, config)
        # the longest prefix and the longest partition key still make a key S3 takes
        longest = {"bucket": s3_bucket, "prefix": "/".join(["p" * 48, "q" * 50])}
        partition = "k" * 900  # the longest a path allows (924 bytes with asset "a")
        await io.store("a", {"v": 2}, partition, longest)
        assert await io.load("a", partition, longest) == {"v": 2}
        with pytest.raises(fs.SerializationError):
            await io.store("a", {"when": object()}, None, {"bucket": s3_bucket})
        with pytest.raises(fs.SerializationError):
            await io.store("a", {"v": 1}, None, {"bucket": s3_bucket, "format": "bytes"})


async def test_credentials_come_from_the_standard_chain(anyio_backend, s3_server, s3_bucket, monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    async with fs.io.S3IO(endpoint_url=s3_server.endpoint) as io:
        await io.store("a", {"v": 1}, None, {"bucket": s3_bucket})
        assert await io.load("a", None, {"bucket": s3_bucket}) == {"v": 1}


async def test_a_server_that_is_gone_is_storage_unavailable(anyio_backend, s3_bucket):
    import socket

    import aioboto3
    from botocore.config import Config

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    quick = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=1, read_timeout=2)
    async with fs.io.S3IO(
        endpoint_url=f"http://127.0.0.1:{port}", session=aioboto3.Session(**CREDENTIALS), client_config=quick
    ) as io:
        with pytest.raises(fs.StorageUnavailable):
            await io.store("a", {"v": 1}, None, {"bucket": s3_bucket})


async def test_the_server_stopping_mid_backfill_fails_only_what_it_must_and_a_retry_policy_recovers(
    anyio_backend, s3_bucket
):
    """A real server stopped during a backfill: partitions stored before it stay
    readable, those that needed it fail with a clear error; with a retry policy on
    the asset the same backfill rides out a restart and everything succeeds."""
    import aioboto3
    from botocore.config import Config
    from s3fixtures import S3Server, start_moto

    server = start_moto()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    S3Server(endpoint, server).admin().create_bucket(Bucket="faults")
    quick = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=1, read_timeout=5)
    config = {"bucket": "faults"}
    daily = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(12)]
    state = {"server": server}

    def events_asset(stop_at, retry=None, restart=False):
        async def events(ctx, deps):
            if ctx.partition == stop_at:
                await anyio.to_thread.run_sync(state["server"].stop)
                if restart:
                    async def start_again():
                        await store_failed.wait()  # the outage was felt: now the server comes back
                        state["server"] = await anyio.to_thread.run_sync(start_moto, port)
                    background.start_soon(start_again)
            return {"day": ctx.partition.isoformat()}

        return fs.Asset(name="events", execute_fn=events, partitioned_by=daily, io_manager="s3",
                        io_config=config, retry=retry, code_version="1")

    store = fs.store.MemoryStore()
    store_failed = anyio.Event()

    class Watched(fs.io.S3IO):
        async def store(self, *args, **kwargs):
            try:
                await super().store(*args, **kwargs)
            except fs.StorageUnavailable:
                store_failed.set()
                raise

    try:
        async with anyio.create_task_group() as background:
            async with Watched(endpoint_url=endpoint, session=aioboto3.Session(**CREDENTIALS),
                               client_config=quick) as s3:
                async with fs.open_runtime([events_asset(days[5])], store=store, io_managers={"s3": s3}) as rt:
                    first = await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=1))
                    assert (first.succeeded, first.failed) == (5, 7)
                    failed = await rt.store.list_by_status("failed", limit=100)
                    assert all("S3" in r.error_message and "put_object" in r.error_message for r in failed)
                state["server"] = await anyio.to_thread.run_sync(start_moto, port)
                store_failed = anyio.Event()  # the first part's outage was felt already
                with_retry = events_asset(days[8], fs.RetryPolicy(max_attempts=12, backoff=0.1, jitter=False), True)
                async with fs.open_runtime([with_retry], store=store, io_managers={"s3": s3}) as rt:
                    for day in days[:5]:  # stored before the stop, still there
                        assert await rt.load("events", day) == {"day": day.isoformat()}
                    second = await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=1))
                    assert (second.succeeded, second.failed) == (12, 0)
                    for day in days:
                        assert await rt.load("events", day) == {"day": day.isoformat()}
                    successes = await rt.store.list_by_status("success", limit=100)
                    assert sorted(r.partition for r in successes) == [d.isoformat() for d in days]
    finally:
        state["server"].stop()


@pytest.mark.parametrize("anyio_backend", [ASYNCIO])
async def test_a_client_the_caller_opened_is_used_and_left_open(anyio_backend, s3_server, s3_bucket):
    """asyncio only: a client belongs to the loop it was opened on."""
    session = s3_server.session()
    async with session.client("s3", endpoint_url=s3_server.endpoint) as client:
        async with fs.io.S3IO(client=client) as io:
            await io.store("a", {"v": 1}, None, {"bucket": s3_bucket})
        head = await client.head_object(Bucket=s3_bucket, Key="@shared/a/@all.json")  # still open
    assert head["ContentLength"] == len(b'{"v":1}')


async def test_hostile_keys_and_tenants_stay_under_their_prefix(anyio_backend, s3_server, s3_bucket):
    from contracts.io import HOSTILE_KEYS

    config = {"bucket": s3_bucket, "prefix": "safe"}
    async with fs.io.S3IO(endpoint_url=s3_server.endpoint, session=s3_server.session()) as io:
        for tenant in ("../..", "a/b", "ünï"):
            with fs.tenant_scope(tenant):
                for key in HOSTILE_KEYS:
                    await io.store("attacker", {"k": key}, key, config)
                    assert await io.load("attacker", key, config) == {"k": key}
    keys = [o["Key"] for o in s3_server.admin().list_objects_v2(Bucket=s3_bucket, MaxKeys=1000)["Contents"]]
    assert len(keys) == 3 * len(HOSTILE_KEYS)
    for key in keys:
        parts = key.split("/")
        assert parts[0] == "safe" and parts[2] == "attacker" and ".." not in parts and "" not in parts
