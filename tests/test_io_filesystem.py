"""FilesystemIO: the shared IO contract on a temporary root, plus formats, atomic
writes, hostile keys on a real file tree, and the object-name encoding."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from datetime import date

import pyarrow as pa
import pytest
from contracts.io import HOSTILE_KEYS, IOContract
from hypothesis import given, settings
from hypothesis import strategies as st

import flowstone as fs
from flowstone.io.naming import object_path, partition_from_parts, partition_parts

pytestmark = pytest.mark.anyio


class TestFilesystemIOContract(IOContract):
    @pytest.fixture
    async def io(self, tmp_path):
        async with fs.io.FilesystemIO(tmp_path / "storage") as io:
            yield io


class TestFilesystemIOAsParquet(IOContract):
    """The same contract with every value a one-row table written as Parquet."""

    @pytest.fixture
    def config(self):
        return {"format": "parquet"}

    @pytest.fixture
    async def io(self, tmp_path):
        async with fs.io.FilesystemIO(tmp_path / "storage", durable=False) as io:
            yield io

    def put(self, data):
        return pa.Table.from_pylist([data])

    def got(self, value):
        [row] = value.to_pylist()
        return row


async def test_each_kind_of_value_gets_its_format(anyio_backend, tmp_path):
    io = fs.io.FilesystemIO(tmp_path)
    table = pa.table({"id": [1, 2], "name": ["a", "b"]})
    await io.store("t", table, None)
    await io.store("b", b"\x00\x01raw", None)
    await io.store("j", {"nested": [1, "two", None]}, None)
    assert (await io.load("t", None)).equals(table)
    assert await io.load("b", None) == b"\x00\x01raw"
    assert await io.load("j", None) == {"nested": [1, "two", None]}
    assert {(await io.metadata(name, None))["format"] for name in "tbj"} == {"arrow", "bytes", "json"}
    # Storing a value of another kind replaces the old file, whatever its format.
    await io.store("t", {"now": "json"}, None)
    assert await io.load("t", None) == {"now": "json"}
    assert sorted(os.listdir(tmp_path / "@shared" / "t")) == ["@all.json"]


@pytest.mark.parametrize(
    "value", [{1: "int key"}, {"x": float("nan")}, {"when": date(2025, 1, 1)}, {"s": {1, 2}}, object()]
)
async def test_a_value_no_format_holds_is_a_serialization_error_and_keeps_the_old_one(anyio_backend, tmp_path, value):
    io = fs.io.FilesystemIO(tmp_path)
    await io.store("a", {"kept": True}, None)
    with pytest.raises(fs.SerializationError) as info:
        await io.store("a", value, None)
    assert info.value.asset == "a"
    assert await io.load("a", None) == {"kept": True}
    assert [n for n in os.listdir(tmp_path / "@shared" / "a") if n.endswith(".tmp")] == []


async def test_table_inputs_of_every_shape_are_accepted_and_others_refused(anyio_backend, tmp_path):
    io = fs.io.FilesystemIO(tmp_path)
    expected = pa.table({"a": [1, 2]})
    for shape in (expected, expected.to_batches()[0], [{"a": 1}, {"a": 2}], {"a": [1, 2]}):
        await io.store("t", shape, None, {"format": "parquet"})
        assert (await io.load("t", None)).equals(expected)
    for bad in ({"a": 1}, ["not", "rows"], 3):
        with pytest.raises(fs.SerializationError):
            await io.store("t", bad, None, {"format": "arrow"})
    with pytest.raises(fs.SerializationError, match="unknown format"):
        await io.store("t", expected, None, {"format": "pickle"})


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
async def test_a_column_of_text_is_refused_not_split_into_letters(anyio_backend, tmp_path, fmt):
    """{"a": "hello"} used to become a five-row table of single letters."""
    io = fs.io.FilesystemIO(tmp_path)
    await io.store("t", {"a": ["kept"]}, None, {"format": fmt})
    for bad in ({"a": "hello"}, {"a": b"bytes"}, {"a": {"x": 1}}, {"a": (c for c in "gen")}):
        with pytest.raises(fs.SerializationError, match="column 'a' holds"):
            await io.store("t", bad, None, {"format": fmt})
    assert (await io.load("t", None)).to_pylist() == [{"a": "kept"}]


@pytest.mark.parametrize(
    "fmt, value, problem",
    [
        ("json", "cycle", "contains itself (a cycle)"),
        ("json", "deep", "nested more than 256 levels deep"),
        ("json", {"n": 10**5000}, "an int of more than 4300 digits"),
        ("parquet", {"n": [2**70]}, "beyond its column type's range"),
        ("arrow", [{"n": -(2**64)}], "beyond its column type's range"),
    ],
)
async def test_values_a_format_cannot_hold_are_serialization_errors(anyio_backend, tmp_path, fmt, value, problem):
    if value == "cycle":
        value = []
        value.append(value)
    elif value == "deep":
        value = []
        for _ in range(5_000):
            value = [value]
    io = fs.io.FilesystemIO(tmp_path)
    kept = {"n": [1]}
    await io.store("t", kept, None, {"format": fmt})
    with pytest.raises(fs.SerializationError, match=re.escape(problem)) as info:
        await io.store("t", value, None, {"format": fmt})
    assert info.value.asset == "t"
    loaded = await io.load("t", None, {"format": fmt})
    assert (loaded if fmt == "json" else loaded.to_pydict()) == kept


async def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(anyio_backend, tmp_path):
    """A write that dies half way (here: the table cannot be encoded after the file
    was opened) is never visible: the old value stays, the temporary file goes."""
    io = fs.io.FilesystemIO(tmp_path)
    await io.store("t", pa.table({"a": [1]}), None)
    unwritable = {"a": [1, "mixed"]}  # Arrow refuses a column of mixed types, inside the open file
    with pytest.raises(fs.SerializationError):
        await io.store("t", unwritable, None, {"format": "arrow"})
    assert (await io.load("t", None)).equals(pa.table({"a": [1]}))
    assert os.listdir(tmp_path / "@shared" / "t") == ["@all.arrow"]


async def test_a_write_interrupted_by_a_killed_process_leaves_nothing_behind_once_rewritten(anyio_backend, tmp_path):
    """A process killed mid-write leaves its temporary file; the next write of that
    object (the one that takes its partition over) removes it."""
    io = fs.io.FilesystemIO(tmp_path)
    folder = tmp_path / "@shared" / "events"
    folder.mkdir(parents=True)
    (folder / ".2025-01-15.json.tmp").write_bytes(b'{"half": ')  # what SIGKILL left mid-write
    await io.store("events", {"rows": 3}, date(2025, 1, 15))
    assert sorted(os.listdir(folder)) == ["2025-01-15.json"]
    assert await io.load("events", date(2025, 1, 15)) == {"rows": 3}


async def test_symbolic_links_planted_inside_the_root_are_refused(anyio_backend, tmp_path):
    """A link inside the root could lead writes and reads outside it, or into another
    tenant's folder: every operation through one is a StorageError, and the target is
    left as it was."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "2025-01-15.json").write_text('{"secret": 1}')
    io = fs.io.FilesystemIO(root)
    (root / "@shared").mkdir(parents=True)
    os.symlink(outside, root / "@shared" / "events")  # the asset's folder is a link
    for call in (io.store("events", {"rows": 3}, date(2025, 1, 15)), io.load("events", date(2025, 1, 15)),
                 io.delete("events", date(2025, 1, 15)), io.exists("events", date(2025, 1, 15))):
        with pytest.raises(fs.StorageError, match="symbolic link"):
            await call
    assert sorted(os.listdir(outside)) == ["2025-01-15.json"]
    assert (outside / "2025-01-15.json").read_text() == '{"secret": 1}'
    (root / "@shared" / "report").mkdir()
    os.symlink(outside / "2025-01-15.json", root / "@shared" / "report" / "@all.json")  # the file is a link
    with pytest.raises(fs.StorageError, match="symbolic link"):
        await io.load("report")


async def test_hostile_keys_and_tenants_never_leave_the_root(anyio_backend, tmp_path):
    root = tmp_path / "storage"
    io = fs.io.FilesystemIO(root)
    for tenant in (None, "../..", "a/b", "ünï cødé"):
        with fs.tenant_scope(tenant) if tenant else nullcontext():
            for key in [*HOSTILE_KEYS, "", "@all", "@empty", "%2E%2E"]:
                await io.store("attacker", {"k": key}, key)
                assert await io.load("attacker", key) == {"k": key}
    assert sorted(os.listdir(tmp_path)) == ["storage"]
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.realpath(os.path.join(folder, name))
            assert path.startswith(str(root) + os.sep)
            assert not name.startswith(".")
    with pytest.raises(fs.NotFound):
        await io.load("attacker", None)


async def test_storage_errors_keep_the_os_code(anyio_backend, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    io = fs.io.FilesystemIO(blocker)
    with pytest.raises(fs.StorageError) as info:
        await io.store("a", {"v": 1}, None)
    assert info.value.code in ("ENOTDIR", "EEXIST") and info.value.asset == "a"


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=400)))
def test_partition_names_are_safe_reversible_and_distinct(key):
    parts = partition_parts(key)
    assert partition_from_parts(parts) == key
    for part in parts:
        assert part and "/" not in part and not part.startswith(".") and len(part.encode()) <= 201
        assert part not in (".", "..")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_different_partition_keys_never_share_a_name(a, b):
    if a != b:
        assert partition_parts(a) != partition_parts(b)
    assert partition_parts(None) not in (partition_parts(a), partition_parts(b))


def test_an_object_name_too_long_for_storage_is_an_invalid_partition():
    with pytest.raises(fs.InvalidPartition, match="too long"):
        object_path(None, "a", "ü" * 200, "json")


async def test_a_retry_policy_retries_the_function_but_not_a_value_no_format_holds(anyio_backend, tmp_path):
    """Storage failures are retried only when they may pass (storage unreachable); a
    value JSON cannot hold fails at once, and the function is not run again for it."""
    calls = []

    async def unstorable(ctx, deps):
        calls.append(1)
        return {"when": date(2025, 1, 1)}

    asset = fs.Asset(name="a", execute_fn=unstorable, io_manager="files",
                     retry=fs.RetryPolicy(max_attempts=5, backoff=0, jitter=False))
    async with fs.open_runtime([asset], io_managers={"files": fs.io.FilesystemIO(tmp_path)}) as rt:
        with pytest.raises(fs.MaterializationFailed, match="cannot be stored as JSON"):
            await rt.materialize("a")
        [record] = await rt.store.list_all()
    assert calls == [1] and record.status is fs.Status.FAILED


async def test_a_missing_partition_read_with_all_the_others_fails_as_not_found_not_a_group(anyio_backend, tmp_path):
    """Every partition is read at once (load_many, in a task group); one that is gone
    reaches the caller as the NotFound it is, not as an ExceptionGroup."""
    io = fs.io.FilesystemIO(tmp_path)
    daily = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 31))
    assets = [
        fs.Asset(name="events", execute_fn=lambda ctx, deps: ctx.partition_key, partitioned_by=daily,
                 io_manager="filesystem"),
        fs.Asset(name="summary", execute_fn=lambda ctx, deps: len(deps["events"]), depends_on=("events",)),
    ]
    async with fs.open_runtime(assets, io_managers={"filesystem": io}) as rt:
        for day in range(1, 4):
            await rt.materialize("events", date(2025, 1, day))
        await io.delete("events", date(2025, 1, 2))
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("summary")
    assert info.value.error.startswith("NotFound: no stored value") and "ExceptionGroup" not in str(info.value)
    assert isinstance(info.value.__cause__, fs.NotFound)
