"""The embedded store's SQLite schema, as numbered migrations (like PostgreSQL's).

``migrate(connection)`` runs inside a ``BEGIN IMMEDIATE`` transaction (the
caller's): several processes opening one new file take turns, and the second
finds nothing to do. Every table that holds tenant data has ``tenant_id TEXT NOT
NULL`` ('' is "no tenant": tenant ids are never empty) and every index leads with
it, because every statement of the store names the caller's tenant.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

__all__ = ["MIGRATIONS", "RECORD_COLUMNS", "RELEASED", "migrate"]

RECORD_COLUMNS = (
    "id, tenant_id, asset_name, partition, run_id, status, started_at, completed_at, duration_ms, "
    "upstream_assets, upstream_partitions, dependency_hash, metadata, error_message, error_traceback, "
    "executor_node, inserted_at, updated_at"
)
"""A materialization's columns in the order the store's rows (``_values``) hold them."""
COUNT = "UPDATE flowstone_changes SET n = n + 1"
"""Run once before a statement that makes successes (writers take the lock in turn):
the number that statement gives them (``WRITTEN``), which a look's mark (the count it
read) is below until that write commits."""
NUMBER = "(SELECT n FROM flowstone_changes)"
"""The number a success gets from the statement that makes it, ``COUNT`` having run."""
WRITTEN = f"written = {NUMBER}"
"""The ``SET`` of every statement that may make a success (any other status ignores it)."""

RELEASED = float("-inf")
"""The expiry of a released lease (``owner`` '')."""

_V1 = """
-- seq orders records (newest first in listings); without AUTOINCREMENT SQLite
-- gives max(seq) + 1 and writes no sequence table per insert. Records are never
-- deleted newest-first, so seq only grows.
CREATE TABLE flowstone_materializations (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    asset_name TEXT NOT NULL,
    partition TEXT,
    run_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'success', 'failed', 'stale',
                                           'waiting_approval', 'cancelled', 'superseded')),
    started_at TEXT,
    completed_at TEXT,
    duration_ms REAL,
    upstream_assets TEXT NOT NULL,
    upstream_partitions TEXT NOT NULL,
    dependency_hash TEXT,
    metadata TEXT NOT NULL,
    error_message TEXT,
    error_traceback TEXT,
    executor_node TEXT,
    inserted_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX flowstone_materializations_partition
    ON flowstone_materializations (tenant_id, asset_name, partition, seq);
CREATE INDEX flowstone_materializations_run ON flowstone_materializations (tenant_id, run_id, seq);
-- Successes and superseded records are most of the table and are listed by walking
-- it newest first; the index holds the others, so a record's move to success
-- takes it out instead of moving it.
CREATE INDEX flowstone_materializations_status ON flowstone_materializations (tenant_id, status, seq)
    WHERE status NOT IN ('success', 'superseded');
-- One current record (success or stale) per partition; char(0) stands for "no
-- partition" (keys never hold a NUL).
CREATE UNIQUE INDEX flowstone_materializations_current
    ON flowstone_materializations (tenant_id, asset_name, coalesce(partition, char(0)))
    WHERE status IN ('success', 'stale');

-- Who computes a partition now (ADR 0009): owner, expiry, fencing number. A
-- released lease stays (owner '', expired), naming the success it ended with;
-- rows are never deleted, so the next fence is one more than the largest (the
-- unique index on fence answers that in one lookup, under the write lock).
CREATE TABLE flowstone_leases (
    tenant_id TEXT NOT NULL,
    asset_name TEXT NOT NULL,
    partitioned INTEGER NOT NULL,
    partition TEXT NOT NULL,
    owner TEXT NOT NULL,
    fence INTEGER NOT NULL UNIQUE,
    record_id TEXT,
    expires_at REAL NOT NULL,
    done_id TEXT,
    done_hash TEXT,
    PRIMARY KEY (tenant_id, asset_name, partitioned, partition)
) WITHOUT ROWID;

CREATE TABLE flowstone_backfills (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    asset_name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    heartbeat_at REAL NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX flowstone_backfills_tenant ON flowstone_backfills (tenant_id, updated_at);
"""

MIGRATIONS: tuple[tuple[int, str | tuple[str, ...]], ...] = (
    (1, _V1),
    (2, "ALTER TABLE flowstone_backfills ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0"),
    (3, """CREATE TABLE flowstone_decisions (
            tenant_id TEXT NOT NULL,
            record_id TEXT NOT NULL,
            approve INTEGER NOT NULL,
            reason TEXT,
            decided_at TEXT NOT NULL,
            PRIMARY KEY (tenant_id, record_id)
        ) WITHOUT ROWID"""),
    (4, """CREATE TABLE flowstone_ticks (
            tenant_id TEXT NOT NULL,
            schedule TEXT NOT NULL,
            at TEXT NOT NULL,
            owner TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'running',
            run_id TEXT,
            error TEXT,
            claimed_at TEXT NOT NULL,
            finished_at TEXT,
            PRIMARY KEY (tenant_id, schedule, at)
        ) WITHOUT ROWID"""),
    (5, """CREATE TABLE flowstone_roles (
            tenant_id TEXT NOT NULL,
            role TEXT NOT NULL,
            owner TEXT NOT NULL,
            fence INTEGER NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, role)
        ) WITHOUT ROWID"""),
    (6, """ALTER TABLE flowstone_roles ADD COLUMN heartbeat_at REAL;
        CREATE INDEX flowstone_ticks_unfinished ON flowstone_ticks (tenant_id, at) WHERE state = 'running'"""),
    (7, """CREATE TABLE flowstone_cursors (
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            value TEXT,
            error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (tenant_id, name)
        ) WITHOUT ROWID"""),
    (8, "CREATE INDEX flowstone_materializations_asset_seq ON flowstone_materializations (tenant_id, asset_name, seq)"),
    # Each partition's latest record's status, kept by the database as records are
    # written: what status and the web view read, one row per partition whatever the
    # history (char(0) stands for "no partition", as in the current index).
    (9, (
        """CREATE TABLE flowstone_partition_states (
            tenant_id TEXT NOT NULL,
            asset_name TEXT NOT NULL,
            partition TEXT NOT NULL,
            seq INTEGER NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY (tenant_id, asset_name, partition)
        ) WITHOUT ROWID""",
        """INSERT INTO flowstone_partition_states
            SELECT tenant_id, asset_name, coalesce(partition, char(0)), max(seq), status
            FROM flowstone_materializations GROUP BY tenant_id, asset_name, partition""",
        """CREATE TRIGGER flowstone_partition_states_insert AFTER INSERT ON flowstone_materializations BEGIN
            INSERT INTO flowstone_partition_states
                VALUES (NEW.tenant_id, NEW.asset_name, coalesce(NEW.partition, char(0)), NEW.seq, NEW.status)
                ON CONFLICT (tenant_id, asset_name, partition) DO UPDATE
                SET seq = excluded.seq, status = excluded.status WHERE excluded.seq > seq;
        END""",
        """CREATE TRIGGER flowstone_partition_states_update AFTER UPDATE OF status ON flowstone_materializations BEGIN
            UPDATE flowstone_partition_states SET status = NEW.status
            WHERE tenant_id = NEW.tenant_id AND asset_name = NEW.asset_name
              AND partition = coalesce(NEW.partition, char(0)) AND seq = NEW.seq;
        END""",
    )),
    # What each success read (upstream asset, partition; char(0) for "no partition"),
    # kept by triggers: the stale cascade finds readers through an index instead of
    # reading every success's lineage.
    (10, (
        """CREATE TABLE flowstone_reads (
            tenant_id TEXT NOT NULL,
            asset_name TEXT NOT NULL,
            partition TEXT NOT NULL,
            reader INTEGER NOT NULL
        )""",
        "CREATE INDEX flowstone_reads_read ON flowstone_reads (tenant_id, asset_name, partition)",
        "CREATE INDEX flowstone_reads_reader ON flowstone_reads (reader)",
        """INSERT INTO flowstone_reads
            SELECT m.tenant_id, r.key, coalesce(k.value, char(0)), m.seq
            FROM flowstone_materializations m, json_each(m.upstream_partitions) r, json_each(r.value) k
            WHERE m.status = 'success'""",
        """CREATE TRIGGER flowstone_reads_insert AFTER INSERT ON flowstone_materializations
           WHEN NEW.status = 'success' BEGIN
            INSERT INTO flowstone_reads SELECT NEW.tenant_id, r.key, coalesce(k.value, char(0)), NEW.seq
                FROM json_each(NEW.upstream_partitions) r, json_each(r.value) k;
        END""",
        """CREATE TRIGGER flowstone_reads_update AFTER UPDATE OF status ON flowstone_materializations
           WHEN OLD.status IS NOT NEW.status AND 'success' IN (OLD.status, NEW.status) BEGIN
            DELETE FROM flowstone_reads WHERE reader = OLD.seq AND OLD.status = 'success';
            INSERT INTO flowstone_reads SELECT NEW.tenant_id, r.key, coalesce(k.value, char(0)), NEW.seq
                FROM json_each(NEW.upstream_partitions) r, json_each(r.value) k WHERE NEW.status = 'success';
        END""",
    )),
    # A backfill's spec (every partition it was given: 13 MB for a million) in a table
    # of its own: SQLite writes a row whole, so each checkpoint's status, a claim's owner
    # and a cancel request rewrote the spec with it, and reading the status walked
    # through it. The table is rebuilt without the column (older SQLites cannot drop one).
    (11, (
        "CREATE TABLE flowstone_backfill_specs (id TEXT PRIMARY KEY, spec TEXT NOT NULL)",
        "INSERT INTO flowstone_backfill_specs (id, spec) SELECT id, spec FROM flowstone_backfills",
        """CREATE TABLE flowstone_backfills_moved (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            asset_name TEXT NOT NULL,
            state TEXT NOT NULL,
            status TEXT NOT NULL,
            owner TEXT,
            heartbeat_at REAL NOT NULL,
            updated_at TEXT NOT NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        """INSERT INTO flowstone_backfills_moved
            SELECT id, tenant_id, asset_name, state, status, owner, heartbeat_at, updated_at, cancel_requested
            FROM flowstone_backfills""",
        "DROP TABLE flowstone_backfills",
        "ALTER TABLE flowstone_backfills_moved RENAME TO flowstone_backfills",
        "CREATE INDEX flowstone_backfills_tenant ON flowstone_backfills (tenant_id, updated_at)",
        """CREATE TRIGGER flowstone_backfill_specs_delete AFTER DELETE ON flowstone_backfills BEGIN
            DELETE FROM flowstone_backfill_specs WHERE id = OLD.id;
        END""",
    )),
    # An asset's successes by when they became successes: the daemon asks every few
    # seconds what succeeded since its last look, and read every partition's record.
    (12, """CREATE INDEX IF NOT EXISTS flowstone_materializations_successes
            ON flowstone_materializations (tenant_id, asset_name, updated_at) WHERE status = 'success';"""),
    # Successes numbered in the order they became so: a writer's own clock stamps
    # ``updated_at`` before it waits for the write lock, so a look by time had to read
    # a minute back again each time. Writers take the lock in turn, so the count of
    # successes in the file, read in a look's snapshot, says exactly what it saw.
    (13, (
        "ALTER TABLE flowstone_materializations ADD COLUMN written INTEGER",
        "CREATE TABLE IF NOT EXISTS flowstone_changes (n INTEGER NOT NULL)",
        "INSERT INTO flowstone_changes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM flowstone_changes)",
        "DROP INDEX IF EXISTS flowstone_materializations_successes",
        """CREATE INDEX IF NOT EXISTS flowstone_materializations_written
            ON flowstone_materializations (tenant_id, asset_name, written) WHERE status = 'success'""",
        """CREATE TRIGGER flowstone_written_insert AFTER INSERT ON flowstone_materializations
            WHEN NEW.status = 'success' BEGIN
            UPDATE flowstone_changes SET n = n + 1;
            UPDATE flowstone_materializations SET written = (SELECT n FROM flowstone_changes) WHERE seq = NEW.seq;
        END""",
        """CREATE TRIGGER flowstone_written_update AFTER UPDATE OF status ON flowstone_materializations
            WHEN NEW.status = 'success' AND OLD.status <> 'success' BEGIN
            UPDATE flowstone_changes SET n = n + 1;
            UPDATE flowstone_materializations SET written = (SELECT n FROM flowstone_changes) WHERE seq = NEW.seq;
        END""",
    )),
    # The statement that makes a record a success writes its number, after one count
    # (``COUNT``) per statement: the triggers of 13 counted and wrote the row a second
    # time for every success (a chain's asset: 3.5% more instructions).
    (14, """DROP TRIGGER IF EXISTS flowstone_written_insert;
            DROP TRIGGER IF EXISTS flowstone_written_update;"""),
)
"""(version, SQL): a script of statements ending in ";", or a tuple of statements (for
those holding ";" themselves, as triggers do). Append only: a shipped migration never
changes."""


def migrate(connection: sqlite3.Connection) -> list[int]:
    """Apply the missing migrations in the caller's write transaction; the versions applied."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS flowstone_schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
    )
    done = {row[0] for row in connection.execute("SELECT version FROM flowstone_schema_migrations")}
    applied = []
    for version, script in MIGRATIONS:
        if version in done:
            continue
        for statement in script if isinstance(script, tuple) else _statements(script):
            connection.execute(statement)
        connection.execute(
            "INSERT INTO flowstone_schema_migrations VALUES (?, ?)",
            (version, datetime.now(timezone.utc).isoformat()),
        )
        applied.append(version)
    return applied


def _statements(script: str) -> list[str]:
    """The statements of a migration (``executescript`` would commit the transaction)."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]
