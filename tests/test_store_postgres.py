"""PostgresStore: the shared store contract against a real server, on asyncio and trio."""

from __future__ import annotations

import threading

import anyio
import pytest
from contracts.store import DatabaseContract, LeaseContract, StoreContract
from pgfixtures import admin, run_sync

import flowstone as fs
from flowstone.store.leases import End, Start
from flowstone.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio


class TestPostgresStoreContract(StoreContract, LeaseContract, DatabaseContract):
    @pytest.fixture
    async def store(self, pg_dsn):
        async with PostgresStore(pg_dsn) as store:
            yield store

    @pytest.fixture
    def age(self, pg_database):
        """Time passing, as the database sees it: leases and heartbeats grow older."""

        async def age(seconds):
            await anyio.to_thread.run_sync(
                run_sync, admin, pg_database.admin_dsn,
                f"UPDATE flowstone_leases SET expires_at = expires_at - interval '{float(seconds)} seconds'",
                f"UPDATE flowstone_backfills SET heartbeat_at = heartbeat_at - interval '{float(seconds)} seconds'",
                f"UPDATE flowstone_roles SET expires_at = expires_at - interval '{float(seconds)} seconds'",
            )

        return age

    @pytest.fixture
    def tamper_backfill(self, pg_database):
        """Change a saved backfill behind the store's back: its spec's ``max_parallel``,
        its spec to one that cannot be read, or drop it."""

        async def tamper(backfill, *, max_parallel=None, drop=False, unreadable=False):
            if drop:
                statement = f"DELETE FROM flowstone_backfills WHERE id = '{backfill}'"
            elif unreadable:
                statement = f"UPDATE flowstone_backfills SET spec = '{{}}' WHERE id = '{backfill}'"
            else:
                statement = (
                    f"UPDATE flowstone_backfills SET spec = jsonb_set(spec, '{{max_parallel}}', '{int(max_parallel)}') "
                    f"WHERE id = '{backfill}'"
                )
            await anyio.to_thread.run_sync(run_sync, admin, pg_database.admin_dsn, statement)

        return tamper


async def _hold_lease_row(dsn, fence, locked, release):
    """In a transaction of its own, lock the lease row of ``fence`` until ``release``."""
    import asyncio

    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        async with connection.transaction():
            await connection.execute("SELECT 1 FROM flowstone_leases WHERE fence = $1 FOR UPDATE", fence)
            locked.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
    finally:
        await connection.close()


async def test_a_write_goes_through_while_another_flush_waits_for_a_lock(anyio_backend, pg_dsn, pg_database):
    """Two flushes are in flight at once: while one waits for a row that another
    transaction holds, the next write (another record) is written."""
    async with PostgresStore(pg_dsn) as store:
        record, lease = await store.begin("p1", 30, asset_name="a", partition="1", status=fs.Status.RUNNING)
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(
            target=run_sync, args=(_hold_lease_row, pg_database.admin_dsn, lease.fence, locked, release))
        holder.start()
        try:
            assert await anyio.to_thread.run_sync(locked.wait, 10)
            ended = []
            async with anyio.create_task_group() as tasks:
                async def end():
                    ended.append(await store.complete(record, fs.Status.SUCCESS, lease=lease))

                tasks.start_soon(end)
                await anyio.wait_all_tasks_blocked()  # its flush is in flight, held up by the lock
                with anyio.fail_after(10):
                    other = await store.create(asset_name="b", status=fs.Status.FAILED)
                assert ended == []  # still held up
                release.set()
        finally:
            release.set()
            await anyio.to_thread.run_sync(holder.join, 10)
        assert ended[0].status is fs.Status.SUCCESS
        assert (await store.get_by_id(other.id)).status is fs.Status.FAILED


async def test_a_flush_takes_at_most_flush_rows(anyio_backend, pg_dsn, monkeypatch):
    """Writes queued together go in flushes of at most ``FLUSH_ROWS``, every one of
    them written, a record's end after its begin."""
    from flowstone.store import postgres as store_module

    monkeypatch.setattr(store_module, "FLUSH_ROWS", 3)
    async with PostgresStore(pg_dsn) as store:
        sizes = []
        real_run = store.db.run

        async def counting(tenant, fn, *args, **options):
            if fn is store_module._write_batch:
                sizes.append(len(args[1]))
            return await real_run(tenant, fn, *args, **options)

        store.db.run = counting
        starts = [Start({"asset_name": "a", "partition": str(i), "status": fs.Status.RUNNING})
                  for i in range(7)]
        begun = await store.begin_many("p1", 30, starts)
        assert all(not isinstance(got, Exception) for got in begun)
        assert sizes and max(sizes) <= 3 and sum(sizes) == 7
        sizes.clear()
        ended = await store.complete_many(
            [End(record, fs.Status.SUCCESS, lease, {}) for record, lease in begun])
        assert [record.status for record in ended] == [fs.Status.SUCCESS] * 7
        assert max(sizes) <= 3 and sum(sizes) == 7
        assert {p: r.status for p, r in (await store.partitions_of("a")).items()} == {
            str(i): fs.Status.SUCCESS for i in range(7)}


async def test_a_batch_stores_each_rows_values_whether_shared_or_not(anyio_backend, pg_dsn):
    """A batch sends a value every row shares once: rows that share some values and
    not others (None among them, and one row that differs from two alike) each come
    back as they were written."""
    from datetime import datetime, timedelta, timezone

    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    fields = [
        {"asset_name": "a", "partition": "1", "status": fs.Status.RUNNING, "dependency_hash": "h",
         "started_at": at, "metadata": {"k": 1}},
        {"asset_name": "a", "partition": "2", "status": fs.Status.RUNNING, "dependency_hash": "h",
         "started_at": at, "metadata": {"k": 1}},
        {"asset_name": "b", "partition": "3", "status": fs.Status.RUNNING, "dependency_hash": None,
         "started_at": at + timedelta(seconds=1), "metadata": {"k": 2}, "upstream_assets": ("a",),
         "upstream_partitions": {"a": ("1", "2")}},
    ]
    async with PostgresStore(pg_dsn) as store:
        begun = await store.begin_many("p1", 30, [Start(f) for f in fields])
        for (record, _lease), wrote in zip(begun, fields, strict=True):
            assert await store.get_by_id(record.id) == record
            assert (record.asset_name, record.dependency_hash, record.started_at) == (
                wrote["asset_name"], wrote["dependency_hash"], wrote["started_at"])
        ends = [End(record, status, lease, {"duration_ms": duration, "error_message": message})
                for (record, lease), status, duration, message in zip(
                    begun, [fs.Status.SUCCESS, fs.Status.SUCCESS, fs.Status.FAILED], [1.5, 1.5, None],
                    [None, None, "boom"], strict=True)]
        ended = await store.complete_many(ends)
        for record in ended:
            assert await store.get_by_id(record.id) == record
        assert [(r.status, r.duration_ms, r.error_message) for r in ended] == [
            (fs.Status.SUCCESS, 1.5, None), (fs.Status.SUCCESS, 1.5, None), (fs.Status.FAILED, None, "boom")]


async def test_lookups_asked_while_one_is_in_flight_go_together(anyio_backend, pg_dsn):
    """Eight workers asking at once cost one lookup per tenant, not eight transactions;
    a leader cancelled while its query runs leaves the others' lookups to the next."""
    from flowstone.store import postgres as store_module

    async with PostgresStore(pg_dsn) as store:
        done = await store.complete(await store.create(asset_name="a", partition="1", status=fs.Status.RUNNING),
                                    fs.Status.SUCCESS)
        queries = []
        real_run = store.db.run

        async def counting(tenant, fn, *args, **options):
            if args and args[0] is store_module._LATEST_SUCCESSES:
                queries.append(tenant)
            return await real_run(tenant, fn, *args, **options)

        store.db.run = counting
        found = []

        async def ask(key):
            found.append(await store.latest_successes([("a", key)]))

        async with anyio.create_task_group() as group:
            for key in ("1", "2", "1", "3", "4", "1", "5", "6"):
                group.start_soon(ask, key)
        assert queries == [None]
        assert sorted(len(answer) for answer in found) == [0, 0, 0, 0, 0, 1, 1, 1]
        assert all(answer[("a", "1")].id == done.id for answer in found if answer)

        # A leader whose query hangs is cancelled: the lookup it took for the other
        # worker goes back, and that worker's own wait answers it. (Which of the two
        # leads is the scheduler's choice: trio runs new tasks in a random order.)
        entered, never = anyio.Event(), anyio.Event()
        leaders = []

        async def hanging(tenant, fn, *args, **options):
            store.db.run = counting  # the next leader's query goes through
            leaders.append(anyio.get_current_task().id)
            entered.set()
            await never.wait()

        store.db.run = hanging
        scopes, answers = {}, {}

        async def asker(key):
            with anyio.CancelScope() as scope:
                scopes[anyio.get_current_task().id] = scope
                answers[key] = await store.latest_successes([("a", key)])

        async with anyio.create_task_group() as group:
            group.start_soon(asker, "1")
            group.start_soon(asker, "2")
            await entered.wait()
            scopes[leaders[0]].cancel()
        [(key, found)] = answers.items()  # the leader's was cancelled; the other was answered
        assert {pair: record.id for pair, record in found.items()} == ({("a", "1"): done.id} if key == "1" else {})
        assert queries == [None, None]  # the hung query is not counted; the next one is


async def _late_success(dsn, began, marked):
    """A transaction that is in flight before a mark is given out and writes a
    success after it (stamped an hour back, as a lagging clock would), then commits."""
    import asyncio

    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_current_xact_id()")  # in flight from here on
            began.set()
            await asyncio.get_running_loop().run_in_executor(None, marked.wait, 10)
            await connection.execute(
                "INSERT INTO flowstone_materializations (id, asset_name, partition, run_id, status, inserted_at, "
                "updated_at) VALUES (gen_random_uuid(), 'up', 'late', gen_random_uuid(), 'success', "
                "now() - interval '1 hour', now() - interval '1 hour')")
    finally:
        await connection.close()


async def test_a_success_committed_after_a_mark_by_a_transaction_in_flight_then_is_not_missed(
    anyio_backend, pg_dsn, pg_database,
):
    """The next look finds a success whose transaction was in flight when the mark
    was given out, however late it commits and whatever time it was stamped with
    (a look by time, less a minute, did not)."""
    async with PostgresStore(pg_dsn) as store:
        began, marked = threading.Event(), threading.Event()
        writer = threading.Thread(target=run_sync, args=(_late_success, pg_database.admin_dsn, began, marked))
        writer.start()
        try:
            assert await anyio.to_thread.run_sync(began.wait, 10)
            await store.create(asset_name="other", status=fs.Status.SUCCESS)  # a later transaction, done first
            _, mark = await store.successes_after("up", None)
            assert mark.rpartition(":")[2], f"the transaction in flight is named in the mark: {mark}"
        finally:
            marked.set()
            await anyio.to_thread.run_sync(writer.join, 10)
        found, later = await store.successes_after("up", mark)
        assert [record.partition for record in found] == ["late"]
        assert (await store.successes_after("up", later))[0] == []
