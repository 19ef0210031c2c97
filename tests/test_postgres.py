"""PostgreSQL beyond the shared contract: schema, migrations, row-level security as
the database enforces it, compare-and-set, the runtime on Postgres, and dropped
connections. Everything runs against a real server (tests/pgfixtures.py)."""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime, timedelta, timezone

import anyio
import asyncpg
import pytest
from backends import ASYNCIO
from pgfixtures import admin, run_sync
from waiting import until

import flowstone as fs
from flowstone.postgres.schema import MIGRATIONS
from flowstone.store import TERMINAL, PostgresStore, Status
from flowstone.store import postgres as store_module
from flowstone.testing import check_integrity, terminate_connections

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(40)]


async def raw(dsn: str, sql: str, *args, tenant: str | None = None):
    """One statement over a raw asyncpg connection (always on asyncio, in a thread)."""

    async def go():
        connection = await asyncpg.connect(dsn)
        try:
            async with connection.transaction():
                if tenant is not None:
                    await connection.execute("SELECT set_config('flowstone.tenant_id', $1, true)", tenant)
                return await connection.fetch(sql, *args)
        finally:
            await connection.close()

    return await anyio.to_thread.run_sync(run_sync, go)


# ------------------------------------------------------------------ schema


async def test_the_schema_has_every_field_a_status_check_and_the_indexes(anyio_backend, pg_database):
    columns = {
        row["column_name"] for row in await raw(
            pg_database.admin_dsn,
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'flowstone_materializations'",
        )
    }
    fields = {f.name for f in __import__("attrs").fields(fs.Materialization)}
    assert fields <= columns
    indexes = {
        row["indexdef"] for row in await raw(
            pg_database.admin_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'flowstone_materializations'"
        )
    }
    # The tenant's and the asset's records in ascending order (25: each new entry goes
    # on the last page; descending, those pages split in halves).
    for part in ("(run_id)", "(tenant_id, seq)", "(tenant_id, asset_name, seq)"):
        assert any(definition.endswith(part) for definition in indexes), part
    # Dropped in schema versions 16 (nothing read them), 18 and 25 (a partition's
    # latest and current records are named by its state) and 24 (no index reads the
    # status, which a record's end changes: the end is a HOT update).
    assert not any("inserted_at" in definition or "gin" in definition or "status" in definition
                   or "written_xid" in definition or "partition" in definition for definition in indexes), indexes
    assert not await raw(pg_database.admin_dsn, "SELECT conname FROM pg_constraint "
                         "WHERE conrelid = 'flowstone_materializations'::regclass AND contype = 'x'")
    roomy = await raw(  # 17, 23, 24: the update after each insert finds room on the page
        pg_database.admin_dsn,
        "SELECT relname, reloptions FROM pg_class WHERE relname IN "
        "('flowstone_leases', 'flowstone_partition_states', 'flowstone_materializations')",
    )
    assert {row["relname"]: row["reloptions"] for row in roomy} == {
        "flowstone_leases": ["fillfactor=35"], "flowstone_partition_states": ["fillfactor=50"],
        "flowstone_materializations": ["fillfactor=45"]}
    with pytest.raises(asyncpg.CheckViolationError):
        await raw(
            pg_database.admin_dsn,
            "INSERT INTO flowstone_materializations (id, asset_name, run_id, status, inserted_at, updated_at) "
            "VALUES (gen_random_uuid(), 'a', gen_random_uuid(), 'exploded', now(), now())",
        )
    flags = await raw(
        pg_database.admin_dsn,
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relname IN ('flowstone_materializations', 'flowstone_backfills')",
    )
    assert len(flags) == 2 and all(row["relrowsecurity"] and row["relforcerowsecurity"] for row in flags)


async def test_migrate_is_idempotent_and_safe_when_many_processes_start_at_once(anyio_backend, pg_database):
    fresh = f"{pg_database.name}_fresh"
    await anyio.to_thread.run_sync(
        run_sync, admin, pg_database.admin_dsn, f"CREATE DATABASE {fresh} TEMPLATE template0")
    dsn = pg_database.admin_dsn.rsplit("/", 1)[0] + f"/{fresh}"
    try:
        stores = [PostgresStore(dsn) for _ in range(6)]
        applied: list[list[int]] = []

        async def migrate(store):
            applied.append(await store.migrate())

        async with anyio.create_task_group() as tasks:
            for store in stores:
                tasks.start_soon(migrate, store)
        assert sorted(applied) == [[]] * 5 + [[version for version, _, _ in MIGRATIONS]]
        assert await stores[0].migrate() == []
        for store in stores:
            await store.close()
        versions = await raw(dsn, "SELECT version FROM flowstone_schema_migrations")
        assert [row["version"] for row in versions] == [version for version, _, _ in MIGRATIONS]
    finally:
        await anyio.to_thread.run_sync(
            run_sync, admin, pg_database.admin_dsn, f"DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
        )


async def test_an_unmigrated_database_says_to_migrate(anyio_backend, pg_database):
    fresh = f"{pg_database.name}_empty"
    await anyio.to_thread.run_sync(
        run_sync, admin, pg_database.admin_dsn, f"CREATE DATABASE {fresh} TEMPLATE template0")
    try:
        async with PostgresStore(pg_database.admin_dsn.rsplit("/", 1)[0] + f"/{fresh}") as store:
            with pytest.raises(fs.DatabaseError, match="migrate"):
                await store.list_all()
    finally:
        await anyio.to_thread.run_sync(
            run_sync, admin, pg_database.admin_dsn, f"DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
        )


async def test_a_server_older_than_the_schema_needs_is_refused_before_anything_is_changed(
    anyio_backend, pg_database, monkeypatch,
):
    """The schema follows successes by transaction id (``xid8``, PostgreSQL 13): an
    older server gets a DatabaseError naming what it needs, not a missing type halfway
    through a migration. (Played by asking more of this server than it is.)"""
    from flowstone.postgres import schema

    fresh = f"{pg_database.name}_old"
    await anyio.to_thread.run_sync(
        run_sync, admin, pg_database.admin_dsn, f"CREATE DATABASE {fresh} TEMPLATE template0")
    dsn = pg_database.admin_dsn.rsplit("/", 1)[0] + f"/{fresh}"
    try:
        monkeypatch.setattr(schema, "OLDEST_SERVER", 10_000_000)
        async with PostgresStore(dsn) as store:
            with pytest.raises(fs.DatabaseError, match=r"needs PostgreSQL 13 or later .* this server is \d+\.\d+"):
                await store.migrate()
        tables = await raw(dsn, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'flowstone%'")
        assert tables == []
    finally:
        await anyio.to_thread.run_sync(
            run_sync, admin, pg_database.admin_dsn, f"DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
        )


async def test_an_unreachable_server_is_database_unavailable(anyio_backend):
    async with PostgresStore("postgresql://nobody:secret@127.0.0.1:1/none") as store:
        with pytest.raises(fs.DatabaseUnavailable) as info:
            await store.list_all()
    assert "secret" not in str(info.value)


# ------------------------------------------------------ row-level security


async def test_the_database_itself_keeps_tenants_apart_for_a_plain_role(anyio_backend, pg_database):
    async with PostgresStore(pg_database.dsn) as store:
        for tenant in ("a", "b"):
            with fs.tenant_scope(tenant):
                await store.create(asset_name="orders", partition=tenant)
        await store.create(asset_name="orders", partition="nobody")
    role = await raw(pg_database.dsn, "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
    assert (role[0]["rolsuper"], role[0]["rolbypassrls"]) == (False, False)
    table = "flowstone_materializations"
    # No setting: no tenant's rows, only the rows without a tenant.
    rows = await raw(pg_database.dsn, f"SELECT partition FROM {table}")
    assert [row["partition"] for row in rows] == ["nobody"]
    # A tenant's setting: that tenant's rows only, even when the query asks for another's.
    rows = await raw(pg_database.dsn, f"SELECT partition FROM {table} WHERE tenant_id = 'b'", tenant="a")
    assert rows == []
    rows = await raw(pg_database.dsn, f"SELECT partition FROM {table}", tenant="a")
    assert [row["partition"] for row in rows] == ["a"]
    # Writing another tenant's row, or changing one, is refused or touches nothing.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await raw(
            pg_database.dsn,
            f"INSERT INTO {table} (id, tenant_id, asset_name, run_id, status, inserted_at, updated_at) "
            "VALUES (gen_random_uuid(), 'b', 'x', gen_random_uuid(), 'pending', now(), now())",
            tenant="a",
        )
    changed = await raw(
        pg_database.dsn, f"UPDATE {table} SET status = 'cancelled' WHERE tenant_id = 'b' RETURNING id", tenant="a")
    assert changed == []
    everything = await raw(pg_database.admin_dsn, f"SELECT tenant_id, status FROM {table} ORDER BY seq")
    assert [(r["tenant_id"], r["status"]) for r in everything] == [("a", "pending"), ("b", "pending"), ("", "pending")]


HOSTILE_TENANTS = [
    "$t0$", "a$t0", "$t0$$t1$'); DROP TABLE flowstone_materializations; --", "o'brien", "back\\slash", "$$", "ü $t1",
]


async def test_a_tenant_id_reaches_the_database_exactly_whatever_it_holds(anyio_backend, pg_database):
    """Each unit of work opens its transaction and sets its tenant in one round trip,
    with the tenant as a literal: quotes, backslashes and dollar-quote tags in a
    tenant id are data, and each such tenant sees only its own rows."""

    async def setting(connection):
        return await connection.fetchval("SELECT current_setting('flowstone.tenant_id')")

    async with PostgresStore(pg_database.dsn) as store:
        for tenant in HOSTILE_TENANTS:
            assert await store.db.run(tenant, setting) == tenant
            with fs.tenant_scope(tenant):
                await store.create(asset_name="orders", partition="p")
        for tenant in HOSTILE_TENANTS:
            with fs.tenant_scope(tenant):
                assert [r.tenant_id for r in await store.list_all()] == [tenant]
    everything = await raw(pg_database.admin_dsn, "SELECT tenant_id FROM flowstone_materializations ORDER BY seq")
    assert [r["tenant_id"] for r in everything] == HOSTILE_TENANTS


async def test_the_tables_each_materialization_writes_read_the_tenant_setting_once_a_statement(
    anyio_backend, pg_database,
):
    """Row-level security on the tables a materialization writes compares each row's
    tenant with the setting read once, in an init plan: ``current_setting`` in a
    row's filter ran for every row a batch touched (2.4% of the server's
    instructions per record). Still a filter, never an index condition (ADR 0029), and still
    keeping each tenant to its own rows."""
    from flowstone.postgres.schema import MATERIALIZATION_TABLES

    async def plans(connection):
        found = {}
        for table in MATERIALIZATION_TABLES:
            rows = await connection.fetch(f"EXPLAIN (VERBOSE, COSTS OFF) SELECT tenant_id FROM {table}")
            found[table] = [row[0].strip() for row in rows]
        return found

    async with PostgresStore(pg_database.dsn) as store:
        with fs.tenant_scope("acme"):
            await store.create(asset_name="a", partition="1", status=Status.SUCCESS)
        with fs.tenant_scope("other"):
            assert await store.list_all() == []
        for table, plan in (await store.db.run("acme", plans)).items():
            filters = [line for line in plan if line.startswith("Filter:")]
            assert filters and all("current_setting" not in line and "IS TRUE" in line for line in filters), (
                table, plan)
            assert any(line.startswith("InitPlan") for line in plan), (table, plan)
            assert not any(line.startswith("Index Cond:") for line in plan), (table, plan)


async def test_a_batch_ends_its_records_and_releases_its_leases_on_their_own_pages(anyio_backend, pg_database):
    """A batch of begins fills pages with its records and leases; the ends and
    releases that follow are longer rows and still stay on those pages, as heap-only
    updates that add no index entries: no index of records reads the status an end
    changes (schema version 24), and leases leave room for the success's id and
    hash (23; at half-full pages about a third of the releases went elsewhere). Read
    from the pages themselves (``pageinspect``): a row a HOT update wrote is flagged
    heap-only."""
    from flowstone.plumbing.clock import utcnow
    from flowstone.plumbing.ids import new_uuid
    from flowstone.store.leases import End, Start

    count = 400
    async with PostgresStore(pg_database.dsn) as store:
        with fs.tenant_scope("acme"):
            starts = [
                Start({"asset_name": "events", "partition": f"2024-01-{i:04d}", "run_id": new_uuid(),
                       "status": Status.RUNNING, "started_at": utcnow(), "dependency_hash": "0" * 64,
                       "executor_node": "a-host:12345:0123456789abcdef/executor:events"})
                for i in range(count)
            ]
            begun = await store.begin_many("a-host:12345:0123456789abcdef", 60.0, starts)
            ends = [End(record, Status.SUCCESS, lease, {"metadata": {"io_manager": "memory", "rows": 12345}})
                    for record, lease in begun]
            assert all(done.status is Status.SUCCESS for done in await store.complete_many(ends))
    await raw(pg_database.admin_dsn, "CREATE EXTENSION IF NOT EXISTS pageinspect")

    async def heap_only(table, done):
        return await raw(pg_database.admin_dsn, f"""
            SELECT {done} AS done, (p.t_infomask2 & 32768) <> 0 AS heap_only  -- HEAP_ONLY_TUPLE
            FROM {table} AS l
            CROSS JOIN LATERAL heap_page_items(get_raw_page('{table}', (l.ctid::text::point)[0]::int)) AS p
            WHERE p.lp = (l.ctid::text::point)[1]::int AND l.tenant_id = 'acme'
        """)

    leases = await heap_only("flowstone_leases", "l.owner = '' AND l.done_id IS NOT NULL")
    records = await heap_only("flowstone_materializations", "l.status = 'success'")
    for rows in (leases, records):
        assert len(rows) == count and all(row["done"] for row in rows)
    assert (sum(row["heap_only"] for row in leases), sum(row["heap_only"] for row in records)) == (count, count)


async def test_a_followers_mark_from_before_version_24_still_sees_the_successes_written_after_it(
    anyio_backend, pg_database, monkeypatch,
):
    """Version 24 moves what eager looks read from the records (``written_xid``) to
    the partition states (``success_xid``), filled from the records: a mark taken on
    version 23 finds the successes written after it, and only those, once migrated."""
    from flowstone.postgres import schema

    fresh = f"{pg_database.name}_v23"
    await anyio.to_thread.run_sync(
        run_sync, admin, pg_database.admin_dsn, f"CREATE DATABASE {fresh} TEMPLATE template0")
    dsn = pg_database.admin_dsn.rsplit("/", 1)[0] + f"/{fresh}"
    insert = ("INSERT INTO flowstone_materializations (id, asset_name, partition, run_id, status, inserted_at, "
              "updated_at) VALUES (gen_random_uuid(), 'a', $1, gen_random_uuid(), $2, now(), now()) RETURNING id")
    try:
        monkeypatch.setattr(schema, "MIGRATIONS", tuple(m for m in MIGRATIONS if m[0] < 24))
        async with PostgresStore(dsn, allow_bypass_rls=True) as owner:
            assert (await owner.migrate())[-1] == 23
            old = (await raw(dsn, insert, "1", "success"))[0]["id"]
            _, mark = await owner.successes_after("a", None)
            new = [(await raw(dsn, insert, key, status))[0]["id"] for key, status in
                   (("2", "success"), ("3", "failed"), ("4", "success"))]
        monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
        async with PostgresStore(dsn, allow_bypass_rls=True) as owner:
            assert await owner.migrate() == [version for version, _, _ in MIGRATIONS if version >= 24]
            found, _ = await owner.successes_after("a", mark)
            assert [record.id for record in found] == [new[0], new[2]] and old not in {r.id for r in found}
            assert sorted(await owner.partitions_of("a")) == ["1", "2", "4"]
    finally:
        await anyio.to_thread.run_sync(
            run_sync, admin, pg_database.admin_dsn, f"DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
        )


async def test_only_units_that_write_by_key_plan_without_table_scans(anyio_backend, pg_dsn):
    """The record write batches plan with table scans off and keep one generic plan
    per statement; every other unit (listings, status reads) plans as PostgreSQL
    would, on the same pooled connection, in the next transaction."""

    async def settings(connection):
        return await connection.fetchrow(
            "SELECT current_setting('enable_seqscan') AS seqscan, current_setting('plan_cache_mode') AS mode"
        )

    async with PostgresStore(pg_dsn, min_size=1, max_size=1) as store:
        assert tuple(await store.db.run("t", settings, by_key=True)) == ("off", "force_generic_plan")
        assert tuple(await store.db.run("t", settings)) == ("on", "auto")


@pytest.mark.parametrize("anyio_backend", [ASYNCIO])
async def test_the_array_types_of_write_batches_are_learnt_once_for_every_connection(anyio_backend, pg_dsn,
                                                                                     monkeypatch):
    """asyncpg asks the server about most array types on each connection's first
    statement that sends them; the store asks once, and tells every connection."""
    from flowstone.postgres import database

    asked = []
    real = asyncpg.Connection._introspect_types

    async def counting(self, typeoids, timeout):
        asked.append(sorted(typeoids))
        return await real(self, typeoids, timeout)

    monkeypatch.setattr(asyncpg.Connection, "_introspect_types", counting)
    arrays = database._ArrayTypes()
    first, second = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        await arrays.teach(first)
        await arrays.teach(first)
        await arrays.teach(second)
        assert asked == [sorted(database.ARRAY_TYPES)]
        ids = [uuid.uuid4(), None]
        at = datetime(2026, 1, 1, tzinfo=timezone.utc)
        row = await second.fetchrow(
            "SELECT $1::uuid[] AS ids, $2::bigint[] AS fences, $3::float8[] AS d, $4::timestamptz[] AS t, "
            "$5::boolean[] AS b", ids, [1, None], [0.5], [at], [True, False])
        assert (row["ids"], row["fences"], row["d"], row["t"], row["b"]) == (ids, [1, None], [0.5], [at], [True, False])
        assert len(asked) == 1  # the second connection sent all five without asking
    finally:
        await first.close()
        await second.close()

    elsewhere = database._ArrayTypes()
    await elsewhere.teach(object())  # an asyncpg without those internals: each connection learns for itself
    assert not elsewhere._usable


async def test_a_unit_of_work_that_fails_writes_nothing_and_leaves_the_connection_usable(anyio_backend, pg_dsn):
    async def write_then_fail(connection):
        await connection.execute(
            "INSERT INTO flowstone_materializations "
            "(id, tenant_id, asset_name, run_id, status, inserted_at, updated_at) "
            "VALUES (gen_random_uuid(), 't', 'half', gen_random_uuid(), 'pending', now(), now())"
        )
        raise fs.NotFound("changed my mind")

    async with PostgresStore(pg_dsn, min_size=1, max_size=1) as store:  # one connection: the next unit reuses it
        with pytest.raises(fs.NotFound, match="changed my mind"):
            await store.db.run("t", write_then_fail)
        with fs.tenant_scope("t"):
            assert await store.list_all() == []
            record = await store.create(asset_name="after")
            assert [r.id for r in await store.list_all()] == [record.id]


async def test_a_superuser_connection_is_refused_while_tenants_are_in_use(anyio_backend, pg_database):
    async with PostgresStore(pg_database.admin_dsn) as store:
        await store.create(asset_name="orders")  # no tenant: nothing to isolate
        with fs.tenant_scope("a"):
            with pytest.raises(fs.TenancyNotEnforced, match="allow_bypass_rls"):
                await store.create(asset_name="orders")
            with pytest.raises(fs.TenancyNotEnforced):
                await store.list_all()
        assert len(await store.list_all()) == 1
    async with PostgresStore(pg_database.admin_dsn, allow_bypass_rls=True) as store:
        with fs.tenant_scope("a"):
            await store.create(asset_name="orders")
            assert len(await store.list_all()) == 1


@pytest.mark.parametrize("anyio_backend", [ASYNCIO])  # a caller's asyncpg pool lives on asyncio
async def test_a_callers_pool_is_checked_for_bypassing_rls_like_a_dsn(anyio_backend, pg_database):
    async with asyncpg.create_pool(pg_database.admin_dsn, min_size=1, max_size=2) as pool:
        async with PostgresStore(pool=pool) as store:
            with fs.tenant_scope("a"), pytest.raises(fs.TenancyNotEnforced, match="allow_bypass_rls"):
                await store.list_all()
    async with asyncpg.create_pool(pg_database.dsn, min_size=1, max_size=2) as pool:
        async with PostgresStore(pool=pool) as store:
            with fs.tenant_scope("a"):
                record = await store.create(asset_name="orders", status=Status.RUNNING)
                await store.update_status(record.id, Status.SUCCESS, metadata={"rows": 3})
                assert (await store.get_by_id(record.id)).metadata == {"rows": 3}


async def test_every_statement_names_the_tenant_even_where_rls_is_bypassed(anyio_backend, pg_database):
    """Defence in depth: with a role that bypasses RLS (opted in) and no tenant, another
    tenant's ids are still not found."""
    async with PostgresStore(pg_database.dsn) as store:
        with fs.tenant_scope("a"):
            record = await store.create(asset_name="orders", status=Status.RUNNING)
            saved = _saved_backfill("a")
            await store.save_backfill(saved.spec.id, saved, owner="me")
    async with PostgresStore(pg_database.admin_dsn, allow_bypass_rls=True) as bypassing:
        for tenant in (None, "b"):
            with fs.tenant_scope(tenant) if tenant else _nothing():
                with pytest.raises(fs.NotFound):
                    await bypassing.get_by_id(record.id)
                assert await bypassing.get_by_run_id(record.run_id) == []
                with pytest.raises(fs.NotFound):
                    await bypassing.update_status(record.id, Status.CANCELLED)
                with pytest.raises(fs.NotFound):
                    await bypassing.complete(record, Status.SUCCESS)
                assert await bypassing.load_backfill(saved.spec.id) is None
                with pytest.raises(fs.BackfillNotFound):
                    await bypassing.claim_backfill(saved.spec.id, "thief", stale_after=0)
                assert await bypassing.close_orphans(record.executor_node or "", "x") == 0
        with fs.tenant_scope("a"):
            assert (await bypassing.get_by_id(record.id)).status is Status.RUNNING


def _saved_backfill(tenant):
    from flowstone.runtime.backfill import BackfillSpec, BackfillStatus, Saved

    backfill = uuid.uuid4()
    spec = BackfillSpec(id=backfill, asset="orders", partitions=("1",), max_parallel=1, upstream="missing",
                        force=False, io=None, context=None, tenant=tenant)
    return Saved(spec, BackfillStatus(id=backfill, asset="orders", state="running", total=1, queued=1, running=0,
                                      succeeded=0, failed=0, cancelled=0))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


# ------------------------------------------------------- compare-and-set


async def test_concurrent_moves_of_one_record_let_exactly_one_win(anyio_backend, pg_dsn):
    async with PostgresStore(pg_dsn) as first, PostgresStore(pg_dsn) as second:
        for _ in range(10):
            record = await first.create(asset_name="orders", status=Status.RUNNING)
            outcomes: list[object] = []

            async def move(store, status, record=record, outcomes=outcomes):
                try:
                    outcomes.append(await store.update_status(record.id, status))
                except fs.InvalidTransition as error:
                    outcomes.append(error)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(move, first, Status.SUCCESS)
                tasks.start_soon(move, second, Status.CANCELLED)
            winners = [o for o in outcomes if isinstance(o, fs.Materialization)]
            assert len(winners) == 1 and len(outcomes) == 2
            assert (await first.get_by_id(record.id)).status is winners[0].status


async def test_complete_on_a_record_moved_by_someone_else_is_invalid_transition(anyio_backend, pg_dsn):
    async with PostgresStore(pg_dsn) as store:
        record = await store.create(asset_name="orders", status=Status.RUNNING)
        await store.update_status(record.id, Status.CANCELLED)
        with pytest.raises(fs.InvalidTransition):
            await store.complete(record, Status.SUCCESS)
        assert (await store.get_by_id(record.id)).status is Status.CANCELLED


async def test_one_bad_row_in_a_batch_fails_only_its_writer(anyio_backend, pg_dsn):
    async with PostgresStore(pg_dsn) as store:
        taken = await store.create(asset_name="orders")
        outcomes: dict[int, object] = {}

        async def write(index):
            try:
                fields = {"id": taken.id} if index == 3 else {}
                outcomes[index] = await store.create(asset_name="orders", partition=str(index), **fields)
            except fs.FlowstoneError as error:
                outcomes[index] = error

        async with anyio.create_task_group() as tasks:
            for index in range(8):
                tasks.start_soon(write, index)
        assert isinstance(outcomes[3], fs.DefinitionError) and "already exists" in str(outcomes[3])
        assert all(isinstance(outcomes[i], fs.Materialization) for i in range(8) if i != 3)
        assert len(await store.list_all()) == 8


async def test_values_postgres_cannot_hold_are_serialization_errors_and_store_nothing(anyio_backend, pg_dsn):
    async with PostgresStore(pg_dsn) as store:
        record = await store.create(asset_name="orders", status=Status.RUNNING)
        for metadata in ({"when": date(2025, 1, 1)}, {1: "int key"}, {"x": float("nan")}, {"x": "nul\x00"}):
            with pytest.raises(fs.SerializationError):
                await store.complete(record, Status.SUCCESS, metadata=metadata)
        with pytest.raises(fs.SerializationError):
            await store.create(asset_name="orders", partition="nul\x00key")
        with pytest.raises(fs.SerializationError):
            await store.create(asset_name="orders", partition="lone \ud800")
        done = await store.complete(record, Status.FAILED, error_message="boom \x00 and \udc00 in the text")
        expected = "boom \ufffd and \ufffd in the text"
        assert (await store.get_by_id(record.id)).error_message == done.error_message == expected
        assert len(await store.list_all()) == 1


async def test_sql_in_keys_and_metadata_is_stored_as_data(anyio_backend, pg_dsn):
    hostile = "x'); DROP TABLE flowstone_materializations; --"
    async with PostgresStore(pg_dsn) as store:
        record = await store.create(asset_name="orders", partition=hostile, status=Status.RUNNING)
        await store.complete(record, Status.SUCCESS, metadata={hostile: hostile})
        found = await store.get("orders", hostile)
        assert found.partition == hostile and dict(found.metadata) == {hostile: hostile}


# ----------------------------------------------------------- the runtime


def chain(calls: list[str]) -> list[fs.Asset]:
    async def raw_fn(ctx, deps):
        calls.append("raw")
        return [1, 2, 3]

    async def clean_fn(ctx, deps):
        calls.append("clean")
        return [v * 2 for v in deps["raw"]]

    async def report_fn(ctx, deps):
        calls.append("report")
        return {"total": sum(deps["clean"])}

    return [
        fs.Asset(name="raw", execute_fn=raw_fn),
        fs.Asset(name="clean", execute_fn=clean_fn, depends_on=["raw"]),
        fs.Asset(name="report", execute_fn=report_fn, depends_on=["clean"]),
    ]


async def test_the_runtime_on_postgres_skips_marks_stale_and_rebuilds(anyio_backend, pg_dsn):
    calls: list[str] = []
    values = fs.io.MemoryIO()
    async with PostgresStore(pg_dsn) as store:
        async with fs.open_runtime(chain(calls), store=store, io_managers={"memory": values}) as rt:
            first = await rt.materialize("report")
            assert calls == ["raw", "clean", "report"]
            assert first.materializations["report"].upstream_partitions == {"clean": (None,)}
        calls.clear()
        # A new runtime (a restart) on the same database: nothing to do.
        async with fs.open_runtime(chain(calls), store=store, io_managers={"memory": values}) as rt:
            again = await rt.materialize("report")
            assert calls == [] and set(again.skipped) == {"raw", "clean", "report"}
            await rt.materialize("raw", force=True)
            assert (await rt.store.get_by_id(first.materializations["clean"].id)).status is Status.STALE
            assert (await rt.store.get_by_id(first.materializations["report"].id)).status is Status.STALE
            calls.clear()
            rebuilt = await rt.materialize("report")
            assert calls == ["clean", "report"] and rebuilt.skipped == ("raw",)
            assert await rt.load("report") == {"total": 12}


async def test_a_backfill_survives_a_restart_and_resume_runs_only_what_is_not_done(anyio_backend, pg_dsn):
    calls: list[str] = []
    release = anyio.Event()

    async def work(ctx, deps):
        calls.append(ctx.partition_key)
        if len(calls) > 10:
            await release.wait()  # stall so the first runtime stops with the backfill half done
        return ctx.partition_key

    events = [fs.Asset(name="events", execute_fn=work, partitioned_by=DAILY)]
    values = fs.io.MemoryIO()
    async with PostgresStore(pg_dsn) as store:
        async with fs.open_runtime(events, store=store, io_managers={"memory": values}) as rt:
            backfill = await rt.backfill("events", partitions=DAYS, max_parallel=3)

            async def ten_done():
                return (await rt.backfill_status(backfill)).succeeded >= 10

            await until(ten_done)
        # The first runtime is gone; a second one on the same database sees the backfill.
        release.set()
        calls.clear()
        async with fs.open_runtime(events, store=store, io_managers={"memory": values}) as rt:
            stopped = await rt.backfill_status(backfill)
            assert stopped.state == "cancelled" and stopped.succeeded >= 10 and stopped.total == len(DAYS)
            assert stopped.interrupted  # kept through the JSON the database holds
            await rt.resume_backfill(backfill)
            final = await rt.wait_backfill(backfill)
            assert final.state == "succeeded" and final.succeeded == len(DAYS)
            assert len(calls) == len(DAYS) - stopped.succeeded
            records = await rt.store.list_all(limit=10_000)
            successes = [r for r in records if r.status is Status.SUCCESS]
            assert sorted(r.partition for r in successes) == sorted(d.isoformat() for d in DAYS)
            assert all(r.status in TERMINAL for r in records)


_KILLED_WORKER = """
import sys
from datetime import date, timedelta
import anyio
import flowstone as fs
import flowstone.runtime.backfill

flowstone.runtime.backfill.CHECKPOINT_SECONDS = 0.02
DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(40)]

async def main(dsn):
    done = []

    async def raw(ctx, deps):
        if len(done) >= 10:
            print("stalled", flush=True)
            await anyio.sleep_forever()  # killed here, in the upstream asset, a quarter done
        done.append(ctx.partition_key)
        return ctx.partition_key

    assets = [
        fs.Asset(name="raw", execute_fn=raw, partitioned_by=DAILY, code_version="1", io_manager="postgres"),
        fs.Asset(name="events", execute_fn=lambda ctx, deps: deps["raw"], partitioned_by=DAILY, code_version="1",
                 io_manager="postgres", depends_on=("raw",)),
    ]
    async with fs.store.PostgresStore(dsn) as store, fs.io.PostgresIO(dsn) as values:
        async with fs.open_runtime(assets, store=store, io_managers={"postgres": values}) as rt:
            print(await rt.backfill("events", partitions=DAYS, max_parallel=1), flush=True)
            await anyio.sleep_forever()

anyio.run(main, sys.argv[1])
"""


async def test_a_backfill_killed_with_its_process_is_resumed_from_what_the_database_holds(anyio_backend, pg_database):
    """SIGKILL, not a clean stop. While the dead owner's heartbeat is fresh a resume is
    refused (it may be alive); once it is stale (aged here as time would) another
    process takes the backfill over, closes what the dead one left open in every
    asset (here the upstream one), and computes only the partitions without a success."""
    import subprocess
    import sys

    pg_dsn = pg_database.dsn
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_WORKER, pg_dsn], stdout=subprocess.PIPE, text=True
    ) as worker:
        try:
            with anyio.fail_after(30):
                backfill = (await anyio.to_thread.run_sync(worker.stdout.readline)).strip()
                assert await anyio.to_thread.run_sync(worker.stdout.readline) == "stalled\n", backfill
                async with PostgresStore(pg_dsn) as store:

                    async def checkpointed():
                        saved = await store.load_backfill(uuid.UUID(backfill))
                        return saved is not None and saved.status.succeeded == 10

                    await until(checkpointed)
        finally:
            worker.kill()
            worker.wait()
    calls: list[str] = []

    def raw(ctx, deps):
        calls.append(ctx.partition_key)
        return ctx.partition_key

    assets = [
        fs.Asset(name="raw", execute_fn=raw, partitioned_by=DAILY, code_version="1", io_manager="postgres"),
        fs.Asset(name="events", execute_fn=lambda ctx, deps: deps["raw"], partitioned_by=DAILY, code_version="1",
                 io_manager="postgres", depends_on=("raw",)),
    ]
    async with PostgresStore(pg_dsn) as store, fs.io.PostgresIO(pg_dsn) as values:
        async with fs.open_runtime(assets, store=store, io_managers={"postgres": values}) as rt:
            killed = await rt.backfill_status(backfill)
            assert killed.state == "running" and killed.succeeded == 10  # the last checkpoint
            [orphan] = await rt.store.list_by_status("running", limit=100)  # the killed process's job
            assert orphan.asset_name == "raw"
            with pytest.raises(fs.BackfillOwned, match="last seen") as refused:
                await rt.resume_backfill(backfill)
            assert orphan.executor_node.startswith(refused.value.owner + "/")
            # Time passes: the dead owner's heartbeat and lease grow old.
            await anyio.to_thread.run_sync(
                run_sync, admin, pg_database.admin_dsn,
                "UPDATE flowstone_backfills SET heartbeat_at = heartbeat_at - interval '1 hour'",
                "UPDATE flowstone_leases SET expires_at = expires_at - interval '1 hour'",
            )
            await rt.resume_backfill(backfill)
            final = await rt.wait_backfill(backfill)
            assert final.state == "succeeded" and final.succeeded == len(DAYS)
            assert sorted(calls) == [d.isoformat() for d in DAYS[10:]]
            # One success per partition, its value in the database, nothing left open, in both assets.
            for asset in ("raw", "events"):
                (await check_integrity(rt.store, asset, DAYS, rt.io_managers)).raise_if_bad()
            assert await rt.load("events", DAYS[0]) == DAYS[0].isoformat()  # written by the killed process
            closed = await rt.store.get_by_id(orphan.id)
            assert closed.status is Status.FAILED and closed.error_message.startswith(
                f"orphaned: {refused.value.owner} stopped"
            )


async def test_terminated_connections_mid_backfill_lose_and_duplicate_nothing(anyio_backend, pg_database):
    """pg_terminate_backend on every connection of the store, several times, while a
    backfill runs: each partition still ends in exactly one terminal record."""
    started = anyio.Event()

    async def work(ctx, deps):
        started.set()
        return ctx.partition_key

    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(200)]
    events = [fs.Asset(name="events", execute_fn=work, partitioned_by=DAILY)]
    async with PostgresStore(pg_database.dsn, max_size=6) as store:
        async with fs.open_runtime(events, store=store) as rt:
            backfill = await rt.backfill("events", partitions=days, max_parallel=10)
            await started.wait()
            killed = 0
            for round_ in range(3):  # at three points of progress, not at three times
                killed += await terminate_connections(pg_database.dsn)  # as the app role itself

                async def moved_on(at_least=20 * (round_ + 1)):
                    return (await rt.backfill_status(backfill)).succeeded >= at_least

                await until(moved_on)
            final = await rt.wait_backfill(backfill)
            assert killed > 0
            assert final.succeeded + final.failed == len(days) and final.state in ("succeeded", "failed")
            records = await rt.store.list_all(limit=10_000)
    assert all(r.status in TERMINAL for r in records)
    by_partition: dict[str | None, list[fs.Materialization]] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    assert len(by_partition) == len(days)
    for partition, found in by_partition.items():
        assert len(found) == 1, (partition, [(r.status, r.error_message) for r in found])
    assert len({r.id for r in records}) == len(records)


async def test_a_tenant_runtime_on_postgres_sees_only_its_own_records(anyio_backend, pg_dsn):
    calls: list[str] = []
    async with PostgresStore(pg_dsn) as store:
        async with fs.open_runtime(chain(calls), store=store) as rt:
            with fs.tenant_scope("a"):
                await rt.materialize("report")
            with fs.tenant_scope("b"):
                assert await rt.store.list_all() == []
                result = await rt.materialize("report")
                assert result.skipped == ()
                assert {r.tenant_id for r in await rt.store.list_all()} == {"b"}
            assert await rt.store.list_all() == []
    assert uuid.UUID(str(result.run_id))


def test_a_store_used_from_one_event_loop_after_another_opens_a_new_pool(pg_database):
    """A pool belongs to its event loop: a store kept across ``anyio.run`` calls (a
    CLI calling it twice, a test suite) reconnects instead of using a dead loop's pool,
    and the ended loop's connections are closed with it, not leaked."""
    store = PostgresStore(pg_database.dsn)

    def connected() -> int:
        async def count() -> int:
            connection = await asyncpg.connect(pg_database.admin_dsn)
            try:
                return await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    pg_database.name,
                )
            finally:
                await connection.close()

        for _ in range(200):  # a closed connection's backend takes a moment to go; each try is a round trip
            if (n := run_sync(count)) == 0:
                return 0
        return n

    async def write() -> uuid.UUID:
        record = await store.create(asset_name="a", partition=None, run_id=uuid.uuid4())
        return record.id

    async def read(record_id: uuid.UUID) -> str:
        return (await store.get_by_id(record_id)).asset_name

    try:
        first = anyio.run(write)
        assert connected() == 0
        assert anyio.run(read, first, backend="trio") == "a"
        assert connected() == 0
        second = anyio.run(write, backend="trio")
        assert anyio.run(read, second) == "a"
        assert connected() == 0
    finally:
        anyio.run(store.close)


async def test_a_backfill_over_a_range_is_saved_as_the_range_and_resumes_from_it(anyio_backend, pg_database):
    from datetime import datetime, timezone

    hourly = fs.HourlyPartitions(start=datetime(2000, 1, 1, tzinfo=timezone.utc))
    hours = fs.partition_range(
        datetime(2000, 1, 1, tzinfo=timezone.utc),
        datetime(2000, 1, 1, tzinfo=timezone.utc) + timedelta(hours=9_999_999),
        "hour",
    )

    async def hour(ctx, deps):
        return ctx.partition.hour

    assets = [fs.Asset(name="hourly", execute_fn=hour, partitioned_by=hourly)]
    async with PostgresStore(pg_database.dsn) as store:
        async with fs.open_runtime(assets, store=store) as rt:
            backfill = await rt.backfill("hourly", hours, max_parallel=2)
            await rt.cancel_backfill(backfill)
        async def saved_spec() -> str:
            connection = await asyncpg.connect(pg_database.admin_dsn)
            try:
                return await connection.fetchval("SELECT spec::text FROM flowstone_backfills WHERE id = $1", backfill)
            finally:
                await connection.close()

        spec = run_sync(saved_spec)
        assert len(spec) < 1_000
        assert '"range": ["2000-01-01T00:00:00Z", "3140-10-17T15:00:00Z", "hour", "datetime"]' in spec
        async with fs.open_runtime(assets, store=store) as rt:
            await rt.resume_backfill(backfill)
            assert (await rt.backfill_status(backfill)).total == 10_000_000
            assert (await rt.cancel_backfill(backfill)).state == "cancelled"


async def test_queries_cancelled_midway_leave_the_store_working(anyio_backend_name, pg_dsn):
    """A cancel (a backfill cancelled, a timeout) lands while asyncpg waits on the
    server: the connection is dropped, and on trio the hosted asyncio loop must not
    die of the errors asyncpg leaves behind."""

    async def slow(connection):
        await connection.execute("SELECT pg_sleep(0.05)")

    if anyio_backend_name == "asyncio":
        # asyncpg's cancel request goes over an extra connection that, with SSL
        # negotiation, leaves a future whose error nobody retrieves: on asyncio that
        # is a logged "Future exception was never retrieved" (which anyio's test
        # runner turns into a failure); on trio it is what FlowStone's loop survives.
        pg_dsn += ("&" if "?" in pg_dsn else "?") + "sslmode=disable"
    async with PostgresStore(pg_dsn) as store:
        for _ in range(60):
            with anyio.move_on_after(0.005):
                await store.db.run("t", slow)
        assert await store.list_all() == []
        record = await store.create(asset_name="after")
        assert (await store.get_by_id(record.id)).asset_name == "after"


_UNDO_16 = (  # the triggers of schema version 16, which replaced those of 12 and 13
    "DROP TRIGGER flowstone_records_inserted ON flowstone_materializations",
    "DROP TRIGGER flowstone_records_updated ON flowstone_materializations",
    "DROP FUNCTION flowstone_records_written()",
)


async def _migrate_again(pg_database, version, table, *undo):
    """Take the database back to before migration ``version`` (``undo`` it and what
    version 16 made of it, forget both), migrate it again as its owner (both are
    applied), and let the app role use the new ``table`` (an upgrade that adds a table
    asks for the grant again, as the guide says)."""
    await anyio.to_thread.run_sync(
        run_sync, admin, pg_database.admin_dsn, *_UNDO_16, *undo,
        f"DELETE FROM flowstone_schema_migrations WHERE version IN ({int(version)}, 16)",
    )
    async with PostgresStore(pg_database.admin_dsn, allow_bypass_rls=True) as owner:
        assert await owner.migrate() == [version, 16]
    await anyio.to_thread.run_sync(run_sync, admin, pg_database.admin_dsn,
                                   f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO flowstone_app")


async def test_the_partition_states_table_is_filled_from_every_tenants_records(anyio_backend, pg_database):
    """Schema version 12 keeps each partition's state in a table kept by triggers; a
    database made before it gets the table filled from its records, every tenant's."""
    async with PostgresStore(pg_database.dsn) as store:
        await store.create(asset_name="a", partition="1", status=Status.FAILED)
        await store.create(asset_name="a", partition="1", status=Status.SUCCESS)
        await store.create(asset_name="a", status=Status.RUNNING)
        with fs.tenant_scope("acme"):
            await store.create(asset_name="a", partition="1", status=Status.PENDING)
    await _migrate_again(  # from a database as schema version 11 had it
        pg_database, 12, "flowstone_partition_states", "DROP TABLE flowstone_partition_states",
    )
    async with PostgresStore(pg_database.dsn) as store:
        assert await store.partition_states("a") == {"1": Status.SUCCESS, None: Status.RUNNING}
        with fs.tenant_scope("acme"):
            assert await store.partition_states("a") == {"1": Status.PENDING}
        await store.create(asset_name="a", partition="1", status=Status.FAILED)  # the triggers are back
        assert (await store.partition_states("a"))["1"] is Status.FAILED


async def test_the_reads_table_is_filled_from_every_tenants_successes(anyio_backend, pg_database):
    """Schema version 13 keeps what each success read in a table kept by triggers (the
    stale cascade looks readers up there); a database made before it gets the table
    filled from its successes, every tenant's, and the cascade follows them."""
    async def success(name, key, reads):
        record = await store.create(asset_name=name, partition=key, status=Status.RUNNING,
                                    upstream_assets=tuple(reads), upstream_partitions=reads)
        return await store.complete(record, Status.SUCCESS)

    async with PostgresStore(pg_database.dsn) as store:
        await success("raw", "1", {})
        clean = await success("clean", "1", {"raw": ("1",)})
        report = await success("report", None, {"clean": ("1", "2")})
        with fs.tenant_scope("acme"):
            theirs = await success("clean", "1", {"raw": ("1",)})
    await _migrate_again(  # from a database as schema version 12 had it
        pg_database, 13, "flowstone_reads", "DROP TABLE flowstone_reads",
    )
    async with PostgresStore(pg_database.dsn) as store:
        await store.mark_stale("raw", "1")
        assert (await store.get_by_id(clean.id)).status is Status.STALE
        assert (await store.get_by_id(report.id)).status is Status.STALE  # through clean, transitively
        with fs.tenant_scope("acme"):
            assert (await store.get_by_id(theirs.id)).status is Status.SUCCESS  # another tenant's
            await store.mark_stale("raw", "1")
            assert (await store.get_by_id(theirs.id)).status is Status.STALE


async def test_the_triggers_find_states_and_reads_by_key_whatever_the_tables_hold(anyio_backend, pg_database):
    """Schema version 16 keeps partition states and reads with one trigger call per
    statement. Its statements find rows by key: on tables of 20,000 partitions whose
    statistics say they are empty (as when a first backfill's plans are made), moving
    five records and adding five successes read a few rows of each, not the tables."""
    run_sync(admin, pg_database.admin_dsn, "ANALYZE flowstone_partition_states", "ANALYZE flowstone_reads", """
        INSERT INTO flowstone_materializations
            (id, asset_name, partition, run_id, status, upstream_assets, upstream_partitions, inserted_at, updated_at)
        SELECT gen_random_uuid(), 'old', g::text, gen_random_uuid(), 'success', '{raw}',
               jsonb_build_object('raw', jsonb_build_array(g::text)), now(), now()
        FROM generate_series(1, 20000) AS g""")

    async def moves():
        connection = await asyncpg.connect(pg_database.dsn)
        try:
            async with connection.transaction():
                await connection.execute(
                    "UPDATE flowstone_materializations SET status = 'stale' "
                    "WHERE asset_name = 'old' AND partition = ANY($1::text[])", [str(g) for g in range(1, 6)])
                await connection.execute("""
                    INSERT INTO flowstone_materializations (id, asset_name, partition, run_id, status,
                        upstream_assets, upstream_partitions, inserted_at, updated_at)
                    SELECT gen_random_uuid(), 'new', g::text, gen_random_uuid(), 'success', '{old}',
                           jsonb_build_object('old', jsonb_build_array(g::text)), now(), now()
                    FROM generate_series(1, 5) AS g""")
                return {row[0]: row[1] + row[2] for row in await connection.fetch(
                    "SELECT relname, coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0) "
                    "FROM pg_stat_xact_user_tables WHERE relname IN ('flowstone_partition_states', 'flowstone_reads')")}
        finally:
            await connection.close()

    read = run_sync(moves)
    assert set(read) == {"flowstone_partition_states", "flowstone_reads"}
    assert all(rows <= 20 for rows in read.values()), read
    async with PostgresStore(pg_database.dsn) as store:
        states = await store.partition_states("old")
        assert len(states) == 20000 and [states[str(g)] for g in range(1, 7)] == [Status.STALE] * 5 + [Status.SUCCESS]
        assert await store.partition_states("new") == {str(g): Status.SUCCESS for g in range(1, 6)}
    readers = await raw(pg_database.admin_dsn, """
        SELECT r.asset_name, count(*) FROM flowstone_reads r JOIN flowstone_materializations m ON m.id = r.reader
        GROUP BY r.asset_name ORDER BY r.asset_name""")
    assert [tuple(row) for row in readers] == [("old", 5), ("raw", 19995)]  # stale ones read nothing now


def _nodes(node):
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _rows_read(plans, prefix):
    """(index or table, rows it read: found and filtered out, every loop) of each node
    of ``plans`` (``EXPLAIN (ANALYZE, FORMAT JSON)``) over a relation named ``prefix...``."""
    return [(name, (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"])
            for plan in plans for node in _nodes(plan[0]["Plan"])
            if (name := node.get("Index Name") or node.get("Relation Name") or "").startswith(prefix)]


async def test_a_batch_of_completions_reads_its_own_records_whatever_the_table_holds(
    anyio_backend, pg_database, monkeypatch
):
    """On a young table whose statistics lag behind its growth (a first backfill), the
    tenant test of the completion (the statement's own, and row-level security's) was
    an index condition the planner picked: to complete five records it read every
    record of the tenant through an index leading with tenant_id. Records are found by
    key (schema version 14), leases by fence (15) and current records through the
    partition states (25): what each begin, lookup and completion reads, rows filtered
    out included, does not grow with the tables. The leases' statistics say the table
    is empty, as they do when a first backfill's plan is made and then kept."""
    run_sync(admin, pg_database.admin_dsn, """
        INSERT INTO flowstone_materializations (id, asset_name, partition, run_id, status, inserted_at, updated_at)
        SELECT gen_random_uuid(), 'old', g::text, gen_random_uuid(), 'success', now(), now()
        FROM generate_series(1, 3000) AS g""",
        "ANALYZE flowstone_leases")  # an empty table, as its statistics say when a first backfill plans
    plans = []
    explained_kinds: set[str] = set()
    fetch = asyncpg.connection.Connection.fetch

    kinds = (store_module._COMPLETE_BATCH, store_module._END_BATCH, store_module._BEGIN,
             store_module._LATEST_SUCCESSES)

    async def explained(self, query, *args, **kwargs):
        if query in kinds:  # its plan measured, then undone
            await self.execute("SAVEPOINT explained")
            explained_kinds.add(query)
            plans.append(json.loads(await self.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)))
            await self.execute("ROLLBACK TO SAVEPOINT explained")
        return await fetch(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", explained)
    async with PostgresStore(pg_database.dsn) as store:
        async def one(day, restarted):
            assert await store.latest_successes([("events", day), ("old", "7")]) != {}  # "old" has its own
            record, lease = await store.begin("me", 60, asset_name="events", partition=day, status=Status.RUNNING)
            fields = {"started_at": datetime.now(timezone.utc)} if restarted else {}
            await store.complete(record, Status.SUCCESS, lease=lease, **fields)

        async with anyio.create_task_group() as tasks:
            for day in range(5):  # how jobs end (_END_BATCH); one also moves its start (_COMPLETE_BATCH)
                tasks.start_soon(one, f"2024-01-0{day + 1}", day == 0)
        assert {r.partition for r in await store.list_by_status("success", limit=10) if r.asset_name == "events"} \
            == {f"2024-01-0{day + 1}" for day in range(5)}
    assert explained_kinds == set(kinds)
    scans = [(node.get("Index Name") or node.get("Relation Name") or "",
              (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"])
             for plan in plans for node in _nodes(plan[0]["Plan"])]
    read = [(name, rows) for name, rows in scans if name.startswith("flowstone_materializations")]
    assert read and all(rows <= 10 for _, rows in read), read
    # Leases are looked up by fence or by their whole key, never by the tenant alone
    # (the planner's choice on a leases table that its statistics say is empty).
    lease_scans = [(node["Index Name"], node.get("Index Cond", "")) for plan in plans
                   for node in _nodes(plan[0]["Plan"]) if node.get("Index Name", "").startswith("flowstone_leases")]
    assert lease_scans and all(name == "flowstone_leases_fence" or "asset_name" in cond
                               for name, cond in lease_scans), lease_scans


def test_a_temporary_cluster_takes_settings_and_a_program_that_runs_the_server():
    """``TemporaryPostgres(settings=..., program=...)``: more ``-c`` settings, and a
    program ``pg_ctl`` starts in the server's place (``stress instructions --store
    postgres`` runs every server process under callgrind that way). A setting that is
    not plain words is refused: it would go through a shell's command line."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from flowstone.testing.postgres import TemporaryPostgres, find_binaries

    folder = Path(tempfile.mkdtemp(prefix="flowstone-program-"))
    try:
        folder.chmod(0o777)  # run as root, the server is the postgres user: it runs the program and writes the mark
        mark = folder / "ran"
        program = folder / "postgres.sh"
        program.write_text(f'#!/bin/sh\ntouch {mark}\nexec {os.path.join(find_binaries(), "postgres")} "$@"\n')
        program.chmod(0o755)
        with TemporaryPostgres(fsync=False, settings={"work_mem": "7MB"}, program=str(program)) as cluster:
            assert anyio.run(_show_work_mem, cluster.dsn()) == "7MB"
        assert mark.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with pytest.raises(ValueError, match="plain words"):
        TemporaryPostgres(settings={"work_mem": "7MB -c fsync=off"})


async def _show_work_mem(dsn: str) -> str:
    connection = await asyncpg.connect(dsn)
    try:
        return str(await connection.fetchval("SHOW work_mem"))
    finally:
        await connection.close()


_RARE_ROWS = "SELECT tenant_id, status, seq, id FROM {} ORDER BY tenant_id, status, seq"
_RARE_EXPECTED = ("SELECT tenant_id, status, seq, id FROM flowstone_materializations WHERE status IN "
                  "('pending', 'failed', 'stale', 'waiting_approval', 'cancelled') ORDER BY tenant_id, status, seq")


async def test_the_rare_records_table_follows_every_records_status(anyio_backend, pg_database):
    """Schema version 26 names the records of the rare statuses in a table of their
    own, kept by triggers: a record enters it with a rare status (inserted so, or moved
    there), leaves it when it moves on or is deleted, and the table always holds what
    the records say, for every tenant; each tenant lists only its own."""
    async with PostgresStore(pg_database.dsn) as store:
        await store.create(asset_name="a", partition="1", status=Status.PENDING)
        running = await store.create(asset_name="a", partition="2", status=Status.RUNNING)
        await store.complete(running, Status.FAILED, error_message="boom")
        waiting = await store.create(asset_name="a", partition="3", status=Status.WAITING_APPROVAL)
        await store.update_status(waiting.id, Status.RUNNING)  # leaves the table
        upstream = await store.complete(await store.create(asset_name="raw", partition="1", status=Status.RUNNING),
                                        Status.SUCCESS)
        reader = await store.create(asset_name="clean", partition="1", status=Status.RUNNING,
                                    upstream_assets=("raw",), upstream_partitions={"raw": ("1",)})
        reader = await store.complete(reader, Status.SUCCESS)
        await store.mark_stale("raw", "1")  # success -> stale: enters
        assert [r.id for r in await store.list_by_status("stale")] == [reader.id]
        again = await store.complete(await store.create(asset_name="clean", partition="1", status=Status.RUNNING),
                                     Status.SUCCESS)  # the stale one superseded: leaves
        assert (await store.get_by_id(reader.id)).status is Status.SUPERSEDED and again.status is Status.SUCCESS
        with fs.tenant_scope("acme"):
            theirs = await store.create(asset_name="a", partition="1", status=Status.CANCELLED)
            assert [r.id for r in await store.list_by_status("cancelled")] == [theirs.id]
            assert await store.list_by_status("failed") == []
        assert [r.status for r in await store.list_by_status("failed")] == [Status.FAILED]
        assert await store.list_by_status("cancelled") == [] and await store.list_by_status("stale") == []
        assert [r.partition for r in await store.list_by_status("pending")] == ["1"]
        assert upstream.status is Status.SUCCESS
    rows = await raw(pg_database.admin_dsn, _RARE_ROWS.format("flowstone_rare_records"))
    expected = await raw(pg_database.admin_dsn, _RARE_EXPECTED)
    assert [tuple(r) for r in rows] == [tuple(r) for r in expected]
    assert sorted((r["tenant_id"], r["status"]) for r in rows) == [
        ("", "failed"), ("", "pending"), ("acme", "cancelled")]
    await raw(pg_database.admin_dsn, "DELETE FROM flowstone_materializations WHERE status IN ('failed', 'cancelled')")
    rows = await raw(pg_database.admin_dsn, _RARE_ROWS.format("flowstone_rare_records"))
    assert [(r["tenant_id"], r["status"]) for r in rows] == [("", "pending")]


async def test_listing_a_rare_status_reads_the_records_it_finds_not_the_table(
    anyio_backend, pg_database, monkeypatch
):
    """Before schema version 26 a failed record under 3,000 successes was found by
    walking all of them newest first; now through the rare records' table, one row
    read of the records for each found. A database made before 26 gets the table
    filled from its records, every tenant's."""
    run_sync(admin, pg_database.admin_dsn, """
        INSERT INTO flowstone_materializations (id, asset_name, partition, run_id, status, inserted_at, updated_at)
        SELECT gen_random_uuid(), 'old', g::text, gen_random_uuid(), 'success', now(), now()
        FROM generate_series(1, 3000) AS g""")
    async with PostgresStore(pg_database.dsn) as store:
        first = await store.create(asset_name="a", partition="1", status=Status.FAILED)
        await store.create(asset_name="b", partition="1", status=Status.SUCCESS)  # after it: the walk's first
        with fs.tenant_scope("acme"):
            theirs = await store.create(asset_name="a", partition="1", status=Status.FAILED)
    await anyio.to_thread.run_sync(  # back to version 25, then migrated again: the table filled
        run_sync, admin, pg_database.admin_dsn, "DROP TABLE flowstone_rare_records",
        "DROP FUNCTION flowstone_keep_rare_records() CASCADE",
        "DELETE FROM flowstone_schema_migrations WHERE version = 26")
    async with PostgresStore(pg_database.admin_dsn, allow_bypass_rls=True) as owner:
        assert await owner.migrate() == [26]
    await anyio.to_thread.run_sync(run_sync, admin, pg_database.admin_dsn,
                                   "GRANT SELECT, INSERT, UPDATE, DELETE ON flowstone_rare_records TO flowstone_app")
    plans = []
    fetch = asyncpg.connection.Connection.fetch

    async def explained(self, query, *args, **kwargs):
        if query == store_module._OF_RARE_STATUS:
            plans.append(json.loads(await self.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)))
        return await fetch(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", explained)
    async with PostgresStore(pg_database.dsn) as store:
        second = await store.create(asset_name="a", partition="2", status=Status.FAILED)
        assert [r.id for r in await store.list_by_status("failed")] == [second.id, first.id]
        with fs.tenant_scope("acme"):
            assert [r.id for r in await store.list_by_status(Status.FAILED)] == [theirs.id]
    assert len(plans) == 2
    read = _rows_read(plans, "flowstone_materializations")
    assert read and all(rows <= 2 for _, rows in read), read


async def test_check_integrity_finds_a_rare_record_its_listing_misses(anyio_backend, pg_database):
    """``check_integrity`` lists each rare status the asset's records have and
    compares: a failed record missing from the rare records' table (taken out by hand
    here) is a problem it names; before that, listing agrees with the records."""
    async with PostgresStore(pg_database.dsn) as store:
        first = await store.create(asset_name="a", partition="1", status=Status.FAILED)
        await store.create(asset_name="a", partition="2", status=Status.FAILED)
        await store.create(asset_name="other", partition="1", status=Status.FAILED)

        def listing(report):
            return [problem for problem in report.problems if problem.startswith("list_by_status")]

        assert listing(await check_integrity(store, "a", ["1", "2"], {})) == []
        await raw(pg_database.admin_dsn, "DELETE FROM flowstone_rare_records WHERE id = $1", first.id)
        assert listing(await check_integrity(store, "a", ["1", "2"], {})) == [
            "list_by_status('failed') finds 1 of the asset's 2 failed records and 0 others"]


async def test_every_table_the_migrations_make_keeps_tenants_apart(anyio_backend, pg_database):
    """Row-level security enabled and forced on every table the schema makes but its
    own list of versions (which holds no tenant's data): a new table (as schema 26's
    rare records) cannot ship without it."""
    tables = await raw(
        pg_database.admin_dsn,
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relkind = 'r' AND relname LIKE 'flowstone\\_%' AND relname <> 'flowstone_schema_migrations' "
        "ORDER BY relname",
    )
    names = [row["relname"] for row in tables]
    assert "flowstone_rare_records" in names and "flowstone_materializations" in names, names
    assert [row["relname"] for row in tables if not (row["relrowsecurity"] and row["relforcerowsecurity"])] == []


async def test_an_assets_states_are_read_through_the_states_indexes(anyio_backend, pg_database, monkeypatch):
    """The statements that read one asset's partition states (``partition_states``,
    retention's choice) read that asset's states, not every asset's: as one condition
    on the tenant and asset they matched neither of the states' two partial indexes,
    and read 3,000 other states here (14 ms an asset among 200 of 500 partitions)."""
    run_sync(admin, pg_database.admin_dsn, """
        INSERT INTO flowstone_materializations (id, asset_name, partition, run_id, status, inserted_at, updated_at)
        SELECT gen_random_uuid(), 'old', g::text, gen_random_uuid(), 'success', now(), now()
        FROM generate_series(1, 3000) AS g""", "ANALYZE")
    async with PostgresStore(pg_database.dsn) as store:
        for status in (Status.SUCCESS, Status.SUCCESS, Status.FAILED):
            record = await store.create(asset_name="a", partition="1", status=Status.RUNNING)
            await store.complete(record, status)
        await store.create(asset_name="a", status=Status.SUCCESS)
    plans = []
    fetch, fetchval = asyncpg.connection.Connection.fetch, asyncpg.connection.Connection.fetchval

    async def explain(self, query, args):
        if query in (store_module._STATES_OF_ASSET, store_module._PRUNE_CHOOSE):
            plans.append(json.loads(await fetchval(self, f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)))

    async def explained_fetch(self, query, *args, **kwargs):
        await explain(self, query, args)
        return await fetch(self, query, *args, **kwargs)

    async def explained_fetchval(self, query, *args, **kwargs):
        await explain(self, query, args)
        return await fetchval(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", explained_fetch)
    monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", explained_fetchval)
    async with PostgresStore(pg_database.dsn) as store:
        assert await store.partition_states("a") == {"1": Status.FAILED, None: Status.SUCCESS}
        assert await store.prune("a", keep_last=0) == 1  # the superseded success; the failure is the latest
    assert len(plans) == 2
    read = _rows_read(plans, "flowstone_partition_states")
    assert read and all(rows <= 2 for _, rows in read), read
