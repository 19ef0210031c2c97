"""``fs.io.PostgresIO``: asset values as JSONB rows, one per (tenant, asset, partition).

``config`` per call: ``table`` (default ``flowstone_values``, created by
``store.migrate()``; ``schema.table`` allowed) and ``create`` (default False:
create the table, with its row-level security, when it does not exist). Table
names are checked against a strict pattern and double-quoted; every value is a
bound parameter; values are strict JSON (see ``flowstone.postgres.jsonvalues``),
so what JSON cannot hold is a SerializationError before anything is written.
Tenants are kept apart by the table's row-level security, as for records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..definitions import FieldError
from ..errors import DefinitionError, NotFound, SerializationError
from ..identifiers import sql_table
from ..partitions import serialize_partition
from ..postgres.database import PostgresClient
from ..postgres.jsonvalues import text_problem, to_json
from ..postgres.schema import LOCK_KEY, values_table
from ..tenancy import current_tenant

__all__ = ["PostgresIO"]

DEFAULT_TABLE = "flowstone_values"
_CONFIG_KEYS = frozenset({"table", "create"})


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

    # ----------------------------------------------------------- protocol

    async def store(self, asset: str, value: Any, partition: Any, config: Mapping[str, Any]) -> None:
        key = serialize_partition(partition)
        text = to_json(value, asset=asset, partition=key, what=f"a {type(value).__name__} value")
        table = await self._table(config)
        tenant = current_tenant()
        await self.db.run(
            tenant, _execute,
            f"""INSERT INTO {table} (tenant_id, asset_name, partitioned, partition, value, size_bytes, updated_at)
                VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7)
                ON CONFLICT (tenant_id, asset_name, partitioned, partition)
                DO UPDATE SET value = EXCLUDED.value, size_bytes = EXCLUDED.size_bytes, updated_at = EXCLUDED.updated_at""",
            tenant or "", asset, *_where(key), text, len(text.encode("utf-8")), datetime.now(timezone.utc),
        )

    async def load(self, asset: str, partition: Any, config: Mapping[str, Any]) -> Any:
        row = await self._select(asset, partition, config, "value")
        return row[0]

    async def delete(self, asset: str, partition: Any, config: Mapping[str, Any]) -> None:
        key, table, tenant = serialize_partition(partition), await self._table(config), current_tenant()
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
        key, table, tenant = serialize_partition(partition), await self._table(config), current_tenant()
        row = await self.db.run(
            tenant, _fetchrow,
            f"SELECT {columns} FROM {table} "
            "WHERE tenant_id = $1 AND asset_name = $2 AND partitioned = $3 AND partition = $4",
            tenant or "", asset, *_where(key),
        )
        if row is None:
            raise NotFound("no stored value", asset=asset, partition=key, tenant=tenant)
        return row

    async def _table(self, config: Mapping[str, Any]) -> str:
        """The checked, quoted table of ``config``, created first when asked to."""
        unknown = set(config or {}) - _CONFIG_KEYS
        if unknown:
            raise DefinitionError(
                [FieldError("config", f"unknown PostgresIO settings {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")]
            )
        table = sql_table((config or {}).get("table", DEFAULT_TABLE), "PostgresIO table")
        if (config or {}).get("create") and table not in self._created:
            await self.db.run_plain(_create_table, table)
            self._created.add(table)
        return table


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
