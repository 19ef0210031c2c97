"""Upgrading a PostgreSQL database from each past schema version.

A database made at version ``k`` and filled with records, then migrated to the
newest version, must hold what a database made at the newest version holds for the
same records: every FlowStone table, row for row (the tables that triggers and
migrations fill from the records included). Then the same writes through the store
on both must leave both equal again (the triggers an upgrade leaves are the new
ones). A migration that fills a table from the records wrongly, or leaves an old
trigger body behind, shows up as a difference.

Versions 1 and 2 are not started from: they had no ``superseded`` status, so the
same records cannot be written there (version 3 turns older successes into
superseded ones).
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any

import asyncpg
import pytest
from pgfixtures import admin, run_sync

import flowstone as fs
from flowstone.postgres import schema
from flowstone.postgres.schema import MIGRATIONS
from flowstone.store import PostgresStore, Status

_AT = datetime(2024, 1, 1, tzinfo=timezone.utc)
_COLUMNS = ("id", "tenant_id", "asset_name", "partition", "run_id", "status", "upstream_assets",
            "upstream_partitions", "inserted_at", "updated_at")
_INSERT = (f"INSERT INTO flowstone_materializations ({', '.join(_COLUMNS)}) "
           f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)")


def _records() -> list[tuple[Any, ...]]:
    """Records of two tenants in every status, with reads between them, oldest first."""
    rows: list[tuple[Any, ...]] = []

    def record(tenant: str, asset: str, key: str | None, status: str, reads: dict[str, list[str]] | None = None):
        number = len(rows) + 1
        rows.append((uuid.UUID(int=number), tenant, asset, key, uuid.UUID(int=10_000 + number), status,
                     sorted(reads or {}), json.dumps(reads or {}, sort_keys=True),
                     _AT.replace(second=number % 60, minute=number // 60)))

    for tenant in ("", "acme"):
        record(tenant, "raw", "1", "superseded")
        record(tenant, "raw", "1", "superseded")
        record(tenant, "raw", "1", "success")
        record(tenant, "raw", "2", "failed")
        record(tenant, "raw", "2", "success")
        record(tenant, "raw", "3", "failed")
        record(tenant, "raw", "4", "cancelled")
        record(tenant, "raw", None, "running")
        record(tenant, "clean", "1", "success", {"raw": ["1"]})
        record(tenant, "clean", "2", "stale", {"raw": ["2"]})
        record(tenant, "clean", "3", "pending")
        record(tenant, "clean", "4", "waiting_approval")
        record(tenant, "report", None, "success", {"clean": ["1", "2"]})
    return rows


async def _migrate_to(connection: asyncpg.Connection, last: int | None) -> list[int]:
    """``schema.migrate`` with the migrations up to ``last`` only (None: all of them)."""
    every = schema.MIGRATIONS
    schema.MIGRATIONS = tuple(m for m in every if last is None or m[0] <= last)
    try:
        return await schema.migrate(connection)
    finally:
        schema.MIGRATIONS = every


async def _tables(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every FlowStone table's rows, sorted, as comparable tuples (``_comparable``)."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        names = [row["tablename"] for row in await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'flowstone\\_%' "
            "AND tablename <> 'flowstone_schema_migrations' ORDER BY tablename")]
        tables = {}
        for name in names:
            kinds = {row["attname"]: row["typname"] for row in await connection.fetch(
                "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped", name)}
            rows = await connection.fetch(f"SELECT * FROM {name}")
            tables[name] = sorted((tuple(_comparable(column, kinds[column], value) for column, value in row.items())
                                   for row in rows), key=repr)
        return tables
    finally:
        await connection.close()


def _comparable(column: str, kind: str, value: Any) -> tuple[str, Any]:
    """A cell as two databases given the same records agree on it: a time the server
    took (``now()``, not a record's own) only as whether it is set; a transaction id
    not at all (the records written before version 21 have none, by design: the
    followers that look them up by it start after the upgrade)."""
    if kind in ("xid8", "xid"):
        return column, "a transaction"
    if isinstance(value, datetime) and value.year != _AT.year:
        return column, value is not None
    return column, value


async def _upgrade_and_compare(server: Any, version: int) -> None:
    old, new = (f"flowstone_upgrade_{os.getpid()}_{version}_{which}" for which in ("old", "new"))
    await admin(server.admin, *(f"CREATE DATABASE {name} TEMPLATE template0" for name in (old, new)))
    try:
        rows = _records()
        for name, first in ((old, version), (new, None)):
            connection = await asyncpg.connect(server.dsn(name), timeout=10)
            try:
                applied = await _migrate_to(connection, first)
                assert applied == [m[0] for m in MIGRATIONS if first is None or m[0] <= first]
                await connection.executemany(_INSERT, rows)
                upgraded = await _migrate_to(connection, None)
                assert upgraded == [m[0] for m in MIGRATIONS if first is not None and m[0] > first]
            finally:
                await connection.close()
        before = await _tables(server.dsn(old))
        assert before == await _tables(server.dsn(new)), f"upgraded from {version}: the tables differ"
        assert len(before["flowstone_materializations"]) == len(rows)

        pruned: dict[str, int] = {}
        for name in (old, new):  # the same writes on both: the triggers in place are the same
            async with PostgresStore(server.dsn(name), allow_bypass_rls=True) as store:
                for number, scope in enumerate((nullcontext(), fs.tenant_scope("acme"))):
                    with scope:
                        await store.mark_stale("raw", "1")  # clean 1 goes stale
                        started = await store.create(
                            id=uuid.UUID(int=90_000 + number), run_id=uuid.UUID(int=91_000 + number),
                            asset_name="clean", partition="2", status=Status.RUNNING, upstream_assets=("raw",),
                            upstream_partitions={"raw": ("2",)})
                        await store.complete(started, Status.SUCCESS)  # supersedes the stale clean 2
                        pruned[name] = pruned.get(name, 0) + await store.prune("raw", keep_last=1)
        after = await _tables(server.dsn(old))
        assert after == await _tables(server.dsn(new)), f"upgraded from {version}: the tables differ after writes"
        assert pruned[old] == pruned[new] > 0
        assert len(after["flowstone_materializations"]) == len(rows) + 2 - pruned[new]
    finally:
        await admin(server.admin, *(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in (old, new)))


@pytest.mark.parametrize("version", [m[0] for m in MIGRATIONS[2:-1]])
def test_an_upgraded_database_holds_what_a_new_one_holds(pg_server, version):
    run_sync(_upgrade_and_compare, pg_server, version)
