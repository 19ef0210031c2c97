"""``fs.io.PostgresIO``: asset values as JSONB rows, one per (tenant, asset, partition).

``config`` per call: ``table`` (default ``flowstone_values``, created by
``store.migrate()``; ``schema.table`` allowed) and ``create`` (default False:
create the table, with its row-level security, when it does not exist). Table
names are checked against a strict pattern and double-quoted; every value is a
bound parameter; values are strict JSON (see ``flowstone.plumbing.jsonvalues``),
so what JSON cannot hold is a SerializationError before anything is written.
Tenants are kept apart by the table's row-level security, as for records.

A table of your own: ``config={"table": "events", "partition_column":
"partition_key", "data_column": "data"}`` writes each partition's value as one row
of ``events`` (upsert on the partition column, which needs a unique index; the
JSONB data column and an ``updated_at`` column are set, other columns are left
alone). Such a table holds one asset's values, keyed by partition key. When it has
a ``tenant_id`` text column, rows are kept per tenant (the unique index then covers
``(tenant_id, partition column)``, and its own row-level security, if any, sees the
current tenant as FlowStone's tables do); without one it can only be used outside
a tenant scope, since nothing in it would keep tenants apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

from ..definitions import FieldError
from ..errors import DefinitionError, InvalidIdentifier, NotFound, SerializationError, TenancyNotEnforced
from ..identifiers import SQL_NAME_LIMIT, check_identifier, sql_table
from ..partitions import serialize_partition
from ..plumbing.jsonvalues import text_problem, to_json
from ..postgres.database import PostgresClient
from ..postgres.schema import LOCK_KEY, values_table
from ..tenancy import current_tenant

__all__ = ["PostgresIO"]

DEFAULT_TABLE = "flowstone_values"
_CONFIG_KEYS = frozenset({"table", "create", "partition_column", "data_column"})


class PostgresIO(PostgresClient):
    """``PostgresIO(dsn)`` or ``PostgresIO(pool=asyncpg_pool)``; with neither, ``FLOWSTONE_DSN``.

    Connects lazily; ``await io.close()`` or ``async with`` releases the pool it made.
    """

    def __init__(self, dsn: str | None = None, pool: Any = None, **options: Any) -> None:
        """``options``: ``min_size``, ``max_size`` (the pool), ``allow_bypass_rls``."""
        dsn = dsn if dsn is not None or pool is not None else os.environ.get("FLOWSTONE_DSN")
        if dsn is None and pool is None:
            raise DefinitionError([FieldError("dsn", "PostgresIO needs a dsn, a pool, or FLOWSTONE_DSN set")])
        super().__init__(dsn, pool, **options)
        self._created: set[str] = set()
        self._tables: dict[tuple[str, str, str], _UserTable] = {}

    # ----------------------------------------------------------- protocol

    async def store(self, asset: str, value: Any, partition: Any, config: Mapping[str, Any]) -> None:
        key = serialize_partition(partition)
        text = to_json(value, asset=asset, partition=key, what=f"a {type(value).__name__} value")
        own = await self._user_table(asset, key, config)
        if own is not None:
            await self.db.run(own.tenant, _execute, own.table.upsert, *own.key_args, text, datetime.now(timezone.utc))
            return
        table = await self._table(config)
        tenant = current_tenant()
        await self.db.run(
            tenant, _execute,
            f"""INSERT INTO {table} (tenant_id, asset_name, partitioned, partition, value, size_bytes, updated_at)
                VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7)
                ON CONFLICT (tenant_id, asset_name, partitioned, partition)
                DO UPDATE SET value = EXCLUDED.value, size_bytes = EXCLUDED.size_bytes,
                              updated_at = EXCLUDED.updated_at""",
            tenant or "", asset, *_where(key), text, len(text.encode("utf-8")), datetime.now(timezone.utc),
        )

    async def load(self, asset: str, partition: Any, config: Mapping[str, Any]) -> Any:
        row = await self._select(asset, partition, config, "value")
        return row[0]

    async def delete(self, asset: str, partition: Any, config: Mapping[str, Any]) -> None:
        key = serialize_partition(partition)
        own = await self._user_table(asset, key, config)
        if own is not None:
            mine = own.table
            await self.db.run(own.tenant, _execute, f"DELETE FROM {mine.table} WHERE {mine.where}", *own.key_args)
            return
        table, tenant = await self._table(config), current_tenant()
        await self.db.run(
            tenant, _execute,
            f"DELETE FROM {table} WHERE tenant_id = $1 AND asset_name = $2 AND partitioned = $3 AND partition = $4",
            tenant or "", asset, *_where(key),
        )

    async def exists(self, asset: str, partition: Any, config: Mapping[str, Any]) -> bool:
        try:
            await self._select(asset, partition, config, "1")
        except NotFound:
            return False
        return True

    async def metadata(self, asset: str, partition: Any, config: Mapping[str, Any]) -> dict[str, Any]:
        row = await self._select(asset, partition, config, "size_bytes, updated_at")
        return {"size_bytes": row[0], "updated_at": row[1]}

    # ------------------------------------------------------------- inside

    async def _select(self, asset: str, partition: Any, config: Mapping[str, Any], columns: str) -> Any:
        key = serialize_partition(partition)
        own = await self._user_table(asset, key, config)
        if own is not None:
            mine = own.table
            wanted = {
                "value": mine.data, "1": "1",
                "size_bytes, updated_at": f"octet_length({mine.data}::text), updated_at",
            }
            row = await self.db.run(
                own.tenant, _fetchrow, f"SELECT {wanted[columns]} FROM {mine.table} WHERE {mine.where}", *own.key_args
            )
            if row is None:
                raise NotFound("no stored value", asset=asset, partition=key, tenant=own.tenant)
            return row
        table, tenant = await self._table(config), current_tenant()
        row = await self.db.run(
            tenant, _fetchrow,
            f"SELECT {columns} FROM {table} "
            "WHERE tenant_id = $1 AND asset_name = $2 AND partitioned = $3 AND partition = $4",
            tenant or "", asset, *_where(key),
        )
        if row is None:
            raise NotFound("no stored value", asset=asset, partition=key, tenant=tenant)
        return row

    async def _user_table(self, asset: str, key: str | None, config: Mapping[str, Any]) -> _Bound | None:
        """The user's own table of ``config`` (checked once), bound to this partition and
        the current tenant; None for FlowStone's values table."""
        config = config or {}
        _check_keys(config)
        if "partition_column" not in config and "data_column" not in config:
            return None
        problems = [FieldError(c, "give both partition_column and data_column for a table of your own")
                    for c in ("partition_column", "data_column") if c not in config]
        if "table" not in config:
            problems.append(FieldError(
                "table", "name the table of your own that partition_column and data_column are in"))
        if config.get("create"):
            problems.append(FieldError(
                "create", "creates FlowStone's own values table; create a table of your own yourself"))
        if problems:
            raise DefinitionError(problems, asset=asset)
        table = sql_table(config["table"], "PostgresIO table")
        partition_column = _column(config["partition_column"], "partition_column")
        data_column = _column(config["data_column"], "data_column")
        found = self._tables.get((table, partition_column, data_column))
        if found is None:
            found = await self.db.run_plain(_inspect_table, table, partition_column, data_column, asset)
            self._tables[(table, partition_column, data_column)] = found
        if key is None:
            raise DefinitionError(
                [FieldError("io_config", f"{table} is keyed by partition: an unpartitioned asset's value goes in "
                                         "FlowStone's own table (leave out partition_column and data_column)")],
                asset=asset,
            )
        tenant = current_tenant()
        if tenant is not None and not found.has_tenant:
            raise TenancyNotEnforced(
                f"{table} has no tenant_id column, so nothing in it keeps tenants apart: add a tenant_id text "
                "column (unique together with the partition column), or use it outside a tenant scope",
                asset=asset, partition=key, tenant=tenant,
            )
        return _Bound(found, tenant, (tenant, _where(key)[1]) if found.has_tenant else (_where(key)[1],))

    async def _table(self, config: Mapping[str, Any]) -> str:
        """The checked, quoted table of ``config``, created first when asked to (its
        keys were checked by ``_user_table``, which every caller asks first)."""
        table = sql_table((config or {}).get("table", DEFAULT_TABLE), "PostgresIO table")
        if (config or {}).get("create") and table not in self._created:
            await self.db.run_plain(_create_table, table)
            self._created.add(table)
        return table


def _check_keys(config: Mapping[str, Any]) -> None:
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise DefinitionError(
            [FieldError("config", f"unknown PostgresIO settings {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")]
        )


def _column(name: Any, what: str) -> str:
    check_identifier(name, f"PostgresIO {what}")
    if len(name) > SQL_NAME_LIMIT:
        raise InvalidIdentifier(f"PostgresIO {what} {name[:20]!r}... is longer than {SQL_NAME_LIMIT} characters")
    return f'"{name}"'


class _UserTable:
    """A table of the user's own, checked: its statements, built once from quoted names."""

    def __init__(self, table: str, partition: str, data: str, has_tenant: bool) -> None:
        self.table, self.data, self.has_tenant = table, data, has_tenant
        keys = f'"tenant_id", {partition}' if has_tenant else partition
        self.where = f'"tenant_id" = $1 AND {partition} = $2' if has_tenant else f"{partition} = $1"
        first = 3 if has_tenant else 2
        self.upsert = (
            f"INSERT INTO {table} ({keys}, {data}, updated_at) "
            f"VALUES ({', '.join(f'${i}' for i in range(1, first))}, ${first}::text::jsonb, ${first + 1}) "
            f"ON CONFLICT ({keys}) DO UPDATE SET {data} = EXCLUDED.{data}, updated_at = EXCLUDED.updated_at"
        )


@attrs.frozen
class _Bound:
    """A user table for one partition and tenant: its statements and their key arguments."""

    table: _UserTable
    tenant: str | None
    key_args: tuple[Any, ...]


async def _inspect_table(connection: Any, table: str, partition: str, data: str, asset: str) -> _UserTable:
    """Check a user's table has what a value needs; DefinitionError naming what is missing."""
    regclass = await connection.fetchval("SELECT to_regclass($1)::oid", table)
    if regclass is None:
        raise DefinitionError(
            [FieldError("table", f"{table} does not exist (or this role cannot see it)")], asset=asset)
    types = dict(await connection.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped", regclass,
    ))
    wanted = {
        partition.strip('"'): ("a text column", ("text", "character varying")),
        data.strip('"'): ("a jsonb column", ("jsonb",)),
        "updated_at": ("a timestamp column", ("timestamp with time zone", "timestamp without time zone")),
    }
    problems = []
    for column, (what, accepted) in wanted.items():
        kind = types.get(column)
        if kind is None:
            problems.append(FieldError("io_config", f"{table} has no column {column!r} ({what} is needed)"))
        elif not kind.startswith(accepted):
            problems.append(FieldError("io_config", f"{table}.{column} is {kind}; {what} is needed"))
    has_tenant = types.get("tenant_id", "").startswith(("text", "character varying"))
    keys = {"tenant_id", partition.strip('"')} if has_tenant else {partition.strip('"')}
    unique = await connection.fetch(
        "SELECT array_agg(a.attname::text) AS columns FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL GROUP BY i.indexrelid", regclass,
    )
    if not problems and not any(set(row["columns"]) == keys for row in unique):
        problems.append(FieldError(
            "io_config", f"{table} needs a unique index on ({', '.join(sorted(keys))}) so each partition has one row",
        ))
    if problems:
        raise DefinitionError(problems, asset=asset)
    return _UserTable(table, partition, data, has_tenant)


def _where(key: str | None) -> tuple[bool, str]:
    if key is None:
        return (False, "")
    problem = text_problem(key)
    if problem is not None:
        raise SerializationError(f"a partition key with {problem} cannot be stored in PostgreSQL", partition=key)
    return (True, key)


async def _execute(connection: Any, sql: str, *args: Any) -> None:
    await connection.execute(sql, *args)


async def _fetchrow(connection: Any, sql: str, *args: Any) -> Any:
    return await connection.fetchrow(sql, *args)


async def _create_table(connection: Any, table: str) -> None:
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        if await connection.fetchval("SELECT to_regclass($1)", table) is None:
            await connection.execute(values_table(table))
