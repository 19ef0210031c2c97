"""SqliteStore: the shared store contract on a real file, on asyncio and trio, and
what an embedded store must refuse."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
from contracts.store import DatabaseContract, LeaseContract, StoreContract

import flowstone as fs
from flowstone.store.leases import End, Start
from flowstone.store.sqlite import NETWORK_FILESYSTEMS, SqliteStore, filesystem_type, sqlite_path

pytestmark = pytest.mark.anyio


class TestSqliteStoreContract(StoreContract, LeaseContract, DatabaseContract):
    @pytest.fixture
    async def store(self, tmp_path):
        async with SqliteStore(tmp_path / "flowstone.db") as store:
            yield store

    @pytest.fixture
    def age(self, store):
        """Time passing, as the store sees it: leases and heartbeats grow older."""

        def older(seconds: float) -> None:
            with sqlite3.connect(store.path, timeout=30) as connection:
                connection.execute("UPDATE flowstone_leases SET expires_at = expires_at - ?", (seconds,))
                connection.execute("UPDATE flowstone_backfills SET heartbeat_at = heartbeat_at - ?", (seconds,))
                connection.execute("UPDATE flowstone_roles SET expires_at = expires_at - ?", (seconds,))

        async def age(seconds):
            await anyio.to_thread.run_sync(older, seconds)

        return age

    @pytest.fixture
    def tamper_backfill(self, store):
        """Change a saved backfill behind the store's back: its spec's ``max_parallel``,
        its spec to one that cannot be read, or drop it."""

        def change(backfill, max_parallel, drop, unreadable):
            with sqlite3.connect(store.path, timeout=30) as connection:
                if drop:
                    connection.execute("DELETE FROM flowstone_backfills WHERE id = ?", (str(backfill),))
                elif unreadable:
                    connection.execute("UPDATE flowstone_backfill_specs SET spec = '{}' WHERE id = ?", (str(backfill),))
                else:
                    connection.execute(
                        "UPDATE flowstone_backfill_specs SET spec = json_set(spec, '$.max_parallel', ?) WHERE id = ?",
                        (max_parallel, str(backfill)),
                    )

        async def tamper(backfill, *, max_parallel=None, drop=False, unreadable=False):
            await anyio.to_thread.run_sync(change, backfill, max_parallel, drop, unreadable)

        return tamper


# ----------------------------------------------------------- where the file is

def test_the_mount_of_a_folder_is_the_longest_mount_point_above_it():
    mounts = (
        "/dev/vda / ext4 rw,relatime 0 0\n"
        "server:/export /mnt/share nfs4 rw,relatime 0 0\n"
        "//host/team /mnt/share/smb cifs rw 0 0\n"
        "tmpfs /mnt/shared tmpfs rw 0 0\n"
    )
    assert filesystem_type("/mnt/share/project", mounts) == "nfs4"
    assert filesystem_type("/mnt/share/smb/x", mounts) == "cifs"
    assert filesystem_type("/mnt/shared/x", mounts) == "tmpfs"  # a sibling with a common prefix is not inside
    assert filesystem_type("/home/me", mounts) == "ext4"
    assert {"nfs4", "cifs"} <= NETWORK_FILESYSTEMS and "tmpfs" not in NETWORK_FILESYSTEMS


@pytest.mark.parametrize("url", [":memory:", "sqlite://relative.db", "file:x.db?mode=memory", ""])
def test_a_store_that_is_not_a_file_is_refused(url):
    with pytest.raises(fs.DefinitionError, match=r"file path|sqlite:///"):
        sqlite_path(url)


def test_sqlite_urls_name_relative_and_absolute_files():
    assert sqlite_path("sqlite:///.flowstone/flowstone.db") == ".flowstone/flowstone.db"
    assert sqlite_path("sqlite:////var/lib/flowstone.db") == "/var/lib/flowstone.db"


@pytest.fixture
def read_only_folder():
    """A folder nobody may write to: a read-only mount when running as root (root
    writes through permissions), else a folder without write permission."""
    folder = Path(tempfile.mkdtemp(prefix="flowstone-ro-", dir="/tmp"))
    mounted = False
    try:
        if os.geteuid() == 0:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                pytest.skip(f"running as root and cannot mount a read-only folder: {done.stderr.strip()}")
            mounted = True
        else:
            folder.chmod(0o555)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True, timeout=30)
        folder.chmod(0o755)
        shutil.rmtree(folder)


async def test_a_read_only_location_is_refused_before_anything_is_written(read_only_folder):
    store = SqliteStore(read_only_folder / "flowstone.db")
    with pytest.raises(fs.DatabaseUnavailable, match="read-only location"):
        await store.list_all()
    with pytest.raises(fs.DatabaseUnavailable, match="read-only location"):
        await store.create(asset_name="orders")
    await store.close()
    assert list(read_only_folder.iterdir()) == []


def _undo_migration(path, version, *statements):
    """Take a store file back to before migration ``version``: run ``statements``, forget the version."""
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
        db.execute("DELETE FROM flowstone_schema_migrations WHERE version = ?", (version,))


async def test_the_partition_states_table_is_filled_from_the_records_already_there(anyio_backend, tmp_path):
    """Schema version 9 keeps each partition's state in a table of its own; a store made
    before it gets the table filled from its records when it migrates."""
    path = tmp_path / "old.db"
    async with SqliteStore(path) as store:
        await store.create(asset_name="a", partition="1", status=fs.Status.FAILED)
        await store.create(asset_name="a", partition="1", status=fs.Status.SUCCESS)
        await store.create(asset_name="a", status=fs.Status.RUNNING)
    _undo_migration(path, 9, "DROP TRIGGER flowstone_partition_states_insert",  # as schema version 8 had it
                    "DROP TRIGGER flowstone_partition_states_update", "DROP TABLE flowstone_partition_states")
    async with SqliteStore(path) as store:
        await store.migrate()
        assert await store.partition_states("a") == {"1": fs.Status.SUCCESS, None: fs.Status.RUNNING}
        await store.create(asset_name="a", partition="1", status=fs.Status.FAILED)  # the triggers are back
        assert (await store.partition_states("a"))["1"] is fs.Status.FAILED


async def test_the_reads_table_is_filled_from_the_successes_already_there(anyio_backend, tmp_path):
    """Schema version 10 keeps what each success read in a table of its own (the stale
    cascade finds readers there); a store made before it gets it filled when it migrates."""
    path = tmp_path / "old.db"
    async with SqliteStore(path) as store:
        async def success(name, key, reads):
            record = await store.create(asset_name=name, partition=key, status=fs.Status.RUNNING,
                                        upstream_assets=tuple(reads), upstream_partitions=reads)
            return await store.complete(record, fs.Status.SUCCESS)

        await success("raw", None, {})
        clean = await success("clean", "1", {"raw": (None,)})
        report = await success("report", None, {"clean": ("1", "2")})
    _undo_migration(path, 10, "DROP TRIGGER flowstone_reads_insert",  # as schema version 9 had it
                    "DROP TRIGGER flowstone_reads_update", "DROP TABLE flowstone_reads")
    async with SqliteStore(path) as store:
        assert await store.migrate() == [10]
        await store.mark_stale("raw", None)
        assert (await store.get_by_id(clean.id)).status is fs.Status.STALE
        assert (await store.get_by_id(report.id)).status is fs.Status.STALE


async def test_backfill_specs_move_to_a_table_of_their_own(anyio_backend, tmp_path):
    """Schema version 11 keeps a backfill's spec apart from its row, which each
    checkpoint rewrites; a store made before it moves its specs there when it migrates,
    and a backfill deleted takes its spec with it."""
    from flowstone.runtime.backfill import BackfillSpec, BackfillStatus, Saved

    path = tmp_path / "old.db"
    backfill = uuid.uuid4()
    spec = BackfillSpec(id=backfill, asset="daily", partitions=("2025-01-01", "2025-01-02"), max_parallel=2,
                        upstream="missing", force=False, io=None, context={"who": "me"}, tenant=None)
    status = BackfillStatus(id=backfill, asset="daily", state="cancelled", total=2, queued=0, running=0,
                            succeeded=1, failed=0, cancelled=1)
    async with SqliteStore(path) as store:
        await store.save_backfill(backfill, Saved(spec, status), owner="me")
    _undo_migration(  # the table as schema version 10 had it, the spec in its row
        path, 11,
        """CREATE TABLE old (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, asset_name TEXT NOT NULL,
            state TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL, owner TEXT, heartbeat_at REAL NOT NULL,
            updated_at TEXT NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
        """INSERT INTO old SELECT b.id, b.tenant_id, b.asset_name, b.state, s.spec, b.status, b.owner,
            b.heartbeat_at, b.updated_at, b.cancel_requested
            FROM flowstone_backfills AS b JOIN flowstone_backfill_specs AS s USING (id)""",
        "DROP TABLE flowstone_backfills", "DROP TABLE flowstone_backfill_specs",
        "ALTER TABLE old RENAME TO flowstone_backfills",
        "CREATE INDEX flowstone_backfills_tenant ON flowstone_backfills (tenant_id, updated_at)",
    )
    async with SqliteStore(path) as store:
        assert await store.migrate() == [11]
        assert await store.load_backfill(backfill) == Saved(spec, status)
        assert (await store.claim_backfill(backfill, "you", stale_after=30)).saved == Saved(spec, status)
        assert await store.request_cancel(backfill) == Saved(spec, status)
        assert await store.prune_finished(datetime.now(timezone.utc) + timedelta(days=1)) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM flowstone_backfill_specs").fetchone() == (0,)


async def test_a_success_is_numbered_by_the_statement_that_makes_it(anyio_backend, tmp_path):
    """Schema version 14: the statements that make successes count once and number
    them, instead of schema 13's triggers, which wrote each success's row twice; a
    store made before loses the triggers when it migrates and goes on counting."""
    from flowstone.store.sqlite_schema import MIGRATIONS

    path = tmp_path / "old.db"
    async with SqliteStore(path) as store:
        first = await store.complete(await store.create(asset_name="a", partition="1", status=fs.Status.RUNNING),
                                     fs.Status.SUCCESS)
        _, mark = await store.successes_after("a", None)
    triggers = dict(MIGRATIONS)[13][-2:]  # as schema version 13 made them
    _undo_migration(path, 14, *triggers)
    async with SqliteStore(path) as store:
        assert await store.migrate() == [14]
        second = await store.complete(await store.create(asset_name="a", partition="2", status=fs.Status.RUNNING),
                                      fs.Status.SUCCESS)
        third = await store.create(asset_name="a", partition="3", status=fs.Status.SUCCESS)
        found, later = await store.successes_after("a", mark)
        assert [record.id for record in found] == [second.id, third.id]
        assert (await store.successes_after("a", later))[0] == []
        assert first.id not in {record.id for record in found}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'flowstone_written%'"
                          ).fetchall() == []


async def test_the_writer_keeps_its_sub_journals_in_memory(anyio_backend, tmp_path):
    """A batch's savepoint copies each page it first changes into a sub-journal; as a
    temporary file that was dozens of write calls per backfilled partition."""
    async with SqliteStore(tmp_path / "flowstone.db") as store:
        await store.create(asset_name="a")
        writer = store._db._writer
        assert writer is not None
        assert writer.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY


async def test_many_jobs_of_one_asset_take_one_statement_per_step(anyio_backend, tmp_path):
    """begin_many / complete_many of a backfill's batch: the leases, the records and
    their ends are each one statement for the whole batch, not one per job."""
    async with SqliteStore(tmp_path / "flowstone.db") as store:
        await store.create(asset_name="opened")
        writer = store._db._writer
        assert writer is not None
        statements: list[str] = []
        writer.set_trace_callback(statements.append)
        begun = await store.begin_many("p1", 30, [
            Start({"asset_name": "a", "partition": str(n), "status": fs.Status.RUNNING}) for n in range(16)])
        ended = await store.complete_many([End(record, fs.Status.SUCCESS, lease, {"duration_ms": 1.0})
                                           for record, lease in begun])
        writer.set_trace_callback(None)
        assert [record.status for record in ended] == [fs.Status.SUCCESS] * 16
        assert (await store.get("a", "7")).id == ended[7].id

        def count(start: str) -> int:  # SQLite traces a statement again as each trigger starts: distinct ones
            return len({statement for statement in statements if statement.lstrip().startswith(start)})

        assert count("INSERT INTO flowstone_leases") == 1
        assert count("INSERT INTO flowstone_materializations") == 1
        assert count("UPDATE flowstone_leases") == 1
        assert count("UPDATE flowstone_materializations SET status = v.") == 1
