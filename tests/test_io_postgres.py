"""PostgresIO: the shared IO contract against a real server, plus identifiers,
hostile input and values JSON cannot hold. Asyncio and trio."""

from __future__ import annotations

import re
from datetime import date

import anyio
import asyncpg
import pytest
from contracts.io import IOContract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgfixtures import admin, run_sync

import flowstone as fs
from flowstone.identifiers import sql_table

pytestmark = pytest.mark.anyio

SQL_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class TestPostgresIOContract(IOContract):
    @pytest.fixture
    async def io(self, pg_dsn):
        async with fs.io.PostgresIO(pg_dsn) as io:
            yield io


class TestPostgresIOOnATableItCreates(IOContract):
    @pytest.fixture
    def config(self):
        return {"table": "public.custom_values", "create": True}

    @pytest.fixture
    async def io(self, pg_dsn):
        async with fs.io.PostgresIO(pg_dsn) as io:
            yield io


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_only_strict_identifiers_become_table_names(name):
    parts = name.split(".")
    valid = len(parts) <= 2 and all(SQL_PART.fullmatch(part) for part in parts)
    if valid:
        assert sql_table(name) == ".".join(f'"{part}"' for part in parts)
    else:
        with pytest.raises(fs.InvalidIdentifier):
            sql_table(name)


@pytest.mark.parametrize("table", ['x"; DROP TABLE flowstone_values; --', "a.b.c", "", "1abc", "x" * 64, None, 3])
async def test_a_hostile_table_name_is_refused_before_any_sql(anyio_backend, pg_dsn, table):
    async with fs.io.PostgresIO(pg_dsn) as io:
        await io.store("kept", {"v": 1}, None, {})
        with pytest.raises(fs.InvalidIdentifier):
            await io.store("orders", {"v": 1}, None, {"table": table, "create": True})
        assert await io.load("kept", None, {}) == {"v": 1}


@pytest.mark.parametrize(
    "value", [date(2025, 1, 1), {1: "int key"}, float("nan"), {"s": "nul\x00"}, object(), b"bytes", {"set": {1}}]
)
async def test_what_json_cannot_hold_is_a_serialization_error_naming_asset_and_type(anyio_backend, pg_dsn, value):
    async with fs.io.PostgresIO(pg_dsn) as io:
        await io.store("orders", {"v": "before"}, None, {})
        with pytest.raises(fs.SerializationError) as info:
            await io.store("orders", value, None, {})
        assert info.value.asset == "orders" and type(value).__name__ in str(info.value)
        assert await io.load("orders", None, {}) == {"v": "before"}  # nothing already stored is lost


def _cyclic() -> dict:
    value: dict = {"name": "loop"}
    value["self"] = value
    return value


def _nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value, problem",
    [
        (_cyclic(), "a dict that contains itself (a cycle) at $.self"),
        (_nested(10_000), "nested more than 256 levels deep"),
        ({"n": 10**5000}, "an int of more than 4300 digits at $.n"),
    ],
)
async def test_cyclic_deep_and_oversized_values_are_serialization_errors(anyio_backend, pg_dsn, value, problem):
    async with fs.io.PostgresIO(pg_dsn) as io:
        await io.store("orders", {"v": "before"}, None, {})
        with pytest.raises(fs.SerializationError, match=re.escape(problem)):
            await io.store("orders", value, None, {})
        assert await io.load("orders", None, {}) == {"v": "before"}
        await io.store("orders", {"n": 2**70, "deep": _nested(200)}, None, {})  # within bounds: kept exactly
        assert await io.load("orders", None, {}) == {"n": 2**70, "deep": _nested(200)}


async def test_unknown_config_is_a_definition_error(anyio_backend, pg_dsn):
    async with fs.io.PostgresIO(pg_dsn) as io:
        with pytest.raises(fs.DefinitionError, match="colour"):
            await io.store("orders", 1, None, {"colour": "red"})


# Everything PostgreSQL text can hold: no NUL, no lone surrogates (tested below).
TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


def same_json(loaded, stored) -> bool:
    """Equal as JSON: JSONB keeps numbers as numeric, so a float written in exponent
    form (1e16) comes back as the int it equals; strings, lists, maps are exact."""
    if isinstance(stored, float) and not isinstance(loaded, bool):
        return isinstance(loaded, (int, float)) and float(loaded) == stored
    if isinstance(stored, dict):
        return isinstance(loaded, dict) and loaded.keys() == stored.keys() and all(
            same_json(loaded[k], stored[k]) for k in stored
        )
    if isinstance(stored, list):
        return isinstance(loaded, list) and len(loaded) == len(stored) and all(
            same_json(a, b) for a, b in zip(loaded, stored, strict=True)
        )
    return type(loaded) is type(stored) and loaded == stored


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(TEXT, JSON), max_size=25))
def test_sql_text_in_keys_and_values_is_data(pg_dsn, samples):
    samples = [("'; DROP TABLE flowstone_values; --", {"q": "SELECT * FROM pg_roles"}), *samples]

    async def check():
        async with fs.io.PostgresIO(pg_dsn) as io:
            expected = {}
            for key, value in samples:
                await io.store("data", value, key, {})
                expected[key] = value
            for key, value in expected.items():
                assert same_json(await io.load("data", key, {}), value), (key, value)

    run_sync(check)


@pytest.mark.parametrize("bad", ["nul\x00", "lone \ud800 surrogate"])
async def test_text_postgres_cannot_hold_is_a_serialization_error_in_keys_and_values(anyio_backend, pg_dsn, bad):
    async with fs.io.PostgresIO(pg_dsn) as io:
        with pytest.raises(fs.SerializationError):
            await io.store("orders", {"v": 1}, bad, {})
        with pytest.raises(fs.SerializationError):
            await io.store("orders", {"v": bad}, None, {})
        with pytest.raises(fs.SerializationError):
            await io.store("orders", {bad: 1}, None, {})
        assert not await io.exists("orders", None, {})


async def test_an_empty_key_and_no_partition_are_different_values(anyio_backend, pg_dsn):
    async with fs.io.PostgresIO(pg_dsn) as io:
        await io.store("a", "unpartitioned", None, {})
        await io.store("a", "empty key", "", {})
        assert await io.load("a", None, {}) == "unpartitioned"
        assert await io.load("a", "", {}) == "empty key"


async def test_the_runtime_stores_values_in_postgres(anyio_backend, pg_dsn):
    async def numbers(ctx, deps):
        return {"day": ctx.partition_key, "rows": [1, 2, 3]}

    async def total(ctx, deps):
        return sum(deps["numbers"]["rows"])

    assets = [
        fs.Asset(name="numbers", execute_fn=numbers, partitioned_by=fs.DailyPartitions(start=date(2025, 1, 1))),
        fs.Asset(name="total", execute_fn=total, depends_on=("numbers",),
                 partitioned_by=fs.DailyPartitions(start=date(2025, 1, 1))),
    ]
    async with fs.store.PostgresStore(pg_dsn) as store, fs.io.PostgresIO(pg_dsn) as io:
        async with fs.open_runtime(
            assets, store=store, io_managers={"postgres": io}, default_io_manager="postgres"
        ) as rt:
            await rt.materialize("total", date(2025, 1, 2))
            assert await rt.load("total", date(2025, 1, 2)) == 6
        assert await io.load("numbers", date(2025, 1, 2), {}) == {"day": "2025-01-02", "rows": [1, 2, 3]}


async def test_no_dsn_anywhere_is_a_definition_error(monkeypatch):
    monkeypatch.delenv("FLOWSTONE_DSN", raising=False)
    with pytest.raises(fs.DefinitionError, match="FLOWSTONE_DSN"):
        fs.io.PostgresIO()


async def test_a_tenants_values_are_invisible_to_raw_sql_as_another_tenant(anyio_backend, pg_database):
    import asyncpg

    async with fs.io.PostgresIO(pg_database.dsn) as io:
        with fs.tenant_scope("a"):
            await io.store("secret", {"owner": "a"}, None, {})

    async def peek():
        connection = await asyncpg.connect(pg_database.dsn)
        try:
            seen = []
            for tenant in ("b", ""):
                async with connection.transaction():
                    await connection.execute("SELECT set_config('flowstone.tenant_id', $1, true)", tenant)
                    seen.append(await connection.fetchval("SELECT count(*) FROM flowstone_values"))
            return seen
        finally:
            await connection.close()

    assert await anyio.to_thread.run_sync(run_sync, peek) == [0, 0]


# ------------------------------------------------------------ a table of your own

_EVENTS = """
CREATE TABLE events (
    id serial PRIMARY KEY,
    partition_key text NOT NULL UNIQUE,
    data jsonb NOT NULL,
    updated_at timestamptz NOT NULL,
    note text DEFAULT 'kept'
);
GRANT SELECT, INSERT, UPDATE, DELETE ON events TO flowstone_app;
GRANT USAGE ON SEQUENCE events_id_seq TO flowstone_app;
"""
EVENTS = {"table": "events", "partition_column": "partition_key", "data_column": "data"}


async def _rows(admin_dsn: str, sql: str) -> list:
    async def fetch() -> list:
        connection = await asyncpg.connect(admin_dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return run_sync(fetch)


async def test_values_go_into_a_table_the_user_already_has(anyio_backend, pg_database):
    run_sync(admin, pg_database.admin_dsn, _EVENTS)

    async def daily(ctx, deps):
        return {"day": ctx.partition_key, "n": ctx.partition.day}

    asset = fs.Asset(name="daily", execute_fn=daily, io_manager="postgres", io_config=EVENTS,
                     partitioned_by=fs.DailyPartitions(start=date(2025, 1, 1)))
    async with fs.io.PostgresIO(pg_database.dsn) as io:
        async with fs.open_runtime([asset], io_managers={"postgres": io}) as rt:
            await rt.materialize("daily", date(2025, 1, 2))
            await rt.materialize("daily", date(2025, 1, 2), force=True)  # an upsert: still one row
            await rt.materialize("daily", date(2025, 1, 3))
            assert await rt.load("daily", date(2025, 1, 3)) == {"day": "2025-01-03", "n": 3}
        assert (await io.metadata("daily", date(2025, 1, 2), EVENTS))["size_bytes"] > 0
        assert await io.exists("daily", date(2025, 1, 2), EVENTS)
        await io.delete("daily", date(2025, 1, 3), EVENTS)
        assert not await io.exists("daily", date(2025, 1, 3), EVENTS)
        with pytest.raises(fs.NotFound):
            await io.load("daily", date(2025, 1, 3), EVENTS)
    rows = await _rows(
        pg_database.admin_dsn, "SELECT partition_key, data::text, note, updated_at IS NOT NULL FROM events")
    assert rows == [("2025-01-02", '{"n": 2, "day": "2025-01-02"}', "kept", True)]


@pytest.mark.parametrize(
    "table_sql, config, problem",
    [
        ("CREATE TABLE t (k text UNIQUE, data jsonb, updated_at timestamptz)",
         {"partition_column": "missing", "data_column": "data"}, "has no column 'missing'"),
        ("CREATE TABLE t (k text UNIQUE, data text, updated_at timestamptz)",
         {"partition_column": "k", "data_column": "data"}, "t\".data is text; a jsonb column is needed"),
        ("CREATE TABLE t (k text UNIQUE, data jsonb)",
         {"partition_column": "k", "data_column": "data"}, "has no column 'updated_at'"),
        ("CREATE TABLE t (k text, data jsonb, updated_at timestamptz)",
         {"partition_column": "k", "data_column": "data"}, "needs a unique index on (k)"),
        ("CREATE TABLE t (k text UNIQUE, data jsonb, updated_at timestamptz)",
         {"partition_column": "k"}, "give both partition_column and data_column"),
        ("CREATE TABLE t (k text UNIQUE, data jsonb, updated_at timestamptz)",
         {"partition_column": "k", "data_column": "data", "create": True}, "create a table of your own yourself"),
    ],
)
async def test_a_table_that_cannot_hold_values_is_a_definition_error_naming_why(
    anyio_backend, pg_database, table_sql, config, problem
):
    run_sync(admin, pg_database.admin_dsn, f"{table_sql}; GRANT ALL ON t TO flowstone_app")
    async with fs.io.PostgresIO(pg_database.dsn) as io:
        with pytest.raises(fs.DefinitionError, match=re.escape(problem)):
            await io.store("a", {"v": 1}, "p1", {"table": "t", **config})


@pytest.mark.parametrize("column", ['k" = k; DROP TABLE t; --', "k;", "", "k" * 64, "data\x00"])
async def test_hostile_column_names_are_refused_before_any_sql(anyio_backend, pg_dsn, column):
    async with fs.io.PostgresIO(pg_dsn) as io:
        with pytest.raises(fs.InvalidIdentifier):
            await io.store("a", {"v": 1}, "p1", {"table": "t", "partition_column": column, "data_column": "data"})


async def test_a_user_table_keeps_tenants_apart_only_with_a_tenant_column(anyio_backend, pg_database):
    run_sync(admin, pg_database.admin_dsn, _EVENTS, """
        CREATE TABLE shared_events (
            tenant_id text NOT NULL, partition_key text NOT NULL, data jsonb NOT NULL,
            updated_at timestamptz NOT NULL, UNIQUE (tenant_id, partition_key)
        );
        GRANT ALL ON shared_events TO flowstone_app;
    """)
    shared = {**EVENTS, "table": "shared_events"}
    async with fs.io.PostgresIO(pg_database.dsn) as io:
        for tenant in ("a", "b"):
            with fs.tenant_scope(tenant):
                await io.store("daily", {"owner": tenant}, "p1", shared)
        with fs.tenant_scope("a"):
            assert await io.load("daily", "p1", shared) == {"owner": "a"}
            with pytest.raises(fs.TenancyNotEnforced, match="no tenant_id column"):
                await io.store("daily", {"v": 1}, "p1", EVENTS)
        with pytest.raises(fs.DefinitionError, match="keyed by partition"):
            await io.store("daily", {"v": 1}, None, EVENTS)
    assert await _rows(pg_database.admin_dsn, "SELECT count(*) FROM events") == [(0,)]
    assert await _rows(pg_database.admin_dsn, "SELECT tenant_id FROM shared_events ORDER BY 1") == [("a",), ("b",)]
