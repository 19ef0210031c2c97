"""``fs.store.PostgresStore``: materialization records in PostgreSQL (asyncpg).

Tenancy is the database's job: every unit of work runs in a transaction that
sets ``flowstone.tenant_id`` and the tables' row-level security policies do the
filtering (ADR 0006). Queries also name the tenant, so that indexes apply.

Writes of records (``create`` and the runtime's ``complete``) are *group
committed*: a writer that finds fewer than ``FLUSHES`` flushes in progress
becomes a leader and writes what is queued (up to ``FLUSH_ROWS``) in one
transaction per tenant (one statement per kind of write for the whole batch); the
others wait for a flush. A record is in one flush at a time, so its writes stay in
order. A busy backfill pays one round trip per batch, not per row; a lone caller
pays one transaction, as it would anyway. Lookups of latest successes go together
the same way (``LOOKUPS`` in flight; ADR 0039). Every status change is a
compare-and-set in SQL: an update that loses a race raises ``InvalidTransition``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import anyio
import attrs

from ..errors import (
    BackfillNotFound,
    BackfillOwned,
    DatabaseUnavailable,
    FlowstoneError,
    InvalidTransition,
    LeaseLost,
    NotFound,
    SerializationError,
)
from ..partitions import serialize_partition
from ..plumbing.jsonvalues import mapping_to_json, plain, storable_text, to_json
from ..postgres.database import PostgresClient
from ..postgres.schema import RARE_STATUSES
from ..postgres.schema import migrate as _migrate
from ..tenancy import current_tenant
from .backfills import WrittenSpecs, saved_from_json, spec_to_json, status_from_json, status_to_json
from .leases import (
    BackfillClaim,
    CancelRequested,
    Cursor,
    End,
    FinishedElsewhere,
    Lease,
    LeaseHeld,
    RoleHolder,
    Start,
    Tick,
    cursor_fields,
    finished_state,
    in_one_write,
    lost,
    role_seconds,
    tick_time,
)
from .pruning import Choice, prune_key
from .records import (
    CURRENT,
    ENDING,
    STATUS_OF,
    STATUS_TEXT,
    TERMINAL,
    TRANSITIONS,
    Materialization,
    Status,
    bad_mark,
    build,
    check_batch,
    check_before,
    check_decidable,
    check_limit,
    check_retention,
    check_transition,
    completed,
    id_in_use,
    new_record,
    parse_id,
    read_mark,
    to_status,
    unstorable_text,
    update_fields,
)

__all__ = ["PostgresStore"]

FLUSHES = 2
"""Flushes in flight at once, each on a connection of its own: while the database
writes one batch, the next is sent."""

FLUSH_ROWS = 640
"""Most writes one flush takes; the rest wait for the next (ADR 0040). A flush of
everything queued kept a backfill's workers in one cohort that computed while the
database waited and waited while it wrote; smaller flushes come back one after
another, so the client computes on one's results while the database writes the
next. A quarter of the cohort of 20 workers' chunks of 128 (its addenda)."""

LOOKUPS = 1
"""Lookups of latest successes in flight at once: those asked meanwhile wait and go
together in the next one (see ``latest_successes``)."""

WRITE_TIMEOUT = 30.0
"""Longest a record write may take, retries included; it is shielded from
cancellation meanwhile, so a cancelled run still leaves its record consistent."""

TABLE = "flowstone_materializations"
_COLUMNS = (
    "id, tenant_id, asset_name, partition, run_id, status, started_at, completed_at, duration_ms, "
    "upstream_assets, upstream_partitions, dependency_hash, metadata, error_message, executor_node, "
    "inserted_at, updated_at, error_traceback"
)
_SELECT = f"SELECT {_COLUMNS} FROM {TABLE}"
_ROW_TYPES = (
    "id uuid, tenant_id text, asset_name text, partition text, run_id uuid, status text, expected text, "
    "started_at timestamptz, completed_at timestamptz, duration_ms double precision, upstream_assets jsonb, "
    "upstream_partitions jsonb, dependency_hash text, metadata jsonb, error_message text, executor_node text, "
    "inserted_at timestamptz, updated_at timestamptz, error_traceback text"
)
_INSERT = f"""
INSERT INTO {TABLE} ({_COLUMNS})
SELECT r.id, r.tenant_id, r.asset_name, r.partition, r.run_id, r.status, r.started_at, r.completed_at,
       r.duration_ms, ARRAY(SELECT jsonb_array_elements_text(r.upstream_assets)), r.upstream_partitions,
       r.dependency_hash, r.metadata, r.error_message, r.executor_node, r.inserted_at, r.updated_at,
           r.error_traceback
FROM jsonb_to_recordset($1::text::jsonb) AS r({_ROW_TYPES})
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
_OF_TENANT = "CASE WHEN m.tenant_id = $1 THEN true END"
"""The tenant test of a statement that finds records by key: as an equality it was an
index condition the planner could pick while the table's statistics lagged behind its
growth (reading every record of the tenant to change five). Row-level security filters
the same way (schema version 14)."""
_M_COLUMNS = ", ".join(f"m.{column}" for column in _COLUMNS.split(", "))
"""The columns of a record ``m`` (where a state ``s``, or a rare record ``r``, is in
the same query)."""
_CURRENT_TEST = f"{_OF_TENANT} AND m.status IN ('success', 'stale')"
"""A current record (success or stale) of the tenant. The states' ``current_id`` may
name a record that is no longer current (superseded by hand, with no success after
it): this test leaves it out."""


def _current_named(current_id: str, columns: str = _M_COLUMNS) -> str:
    """``columns`` of the current record whose id is ``current_id`` (an expression),
    by primary key. Every lookup here is a scalar subquery or has a LIMIT: the
    planner cannot merge it into a join, and so cannot trade the lookups by key for a
    walk through every state or record of the tenant (its choice when the tables'
    statistics say they are empty)."""
    return f"(SELECT {columns} FROM {TABLE} AS m WHERE m.id = {current_id} AND {_CURRENT_TEST} LIMIT 1)"


_STATES_KEYED = "s.tenant_id = $1 AND s.asset_name = $2 AND s.partition IS NOT NULL"
_STATES_WHOLE = "s.tenant_id = $1 AND s.asset_name = $2 AND s.partition IS NULL"
"""An asset's partition states ``s`` in two halves, the keyed partitions and the
unpartitioned one, each the condition of one of the states' two partial indexes: a
statement that reads an asset's states reads the halves and joins them (UNION ALL).
As one condition (tenant and asset alone) it matched neither index, and PostgreSQL
read every tenant's states for each asset."""


def _state_named(asset: str, key: str) -> str:
    """The ``current_id`` of the state of ``asset``'s partition ``key`` (expressions;
    a ``key`` that is NULL: the unpartitioned record's). One scalar subquery whose
    branches each use one of the states' two unique indexes (as a coalesce of two,
    it was no index condition and the records were scanned)."""
    return f"""(
        SELECT s.current_id FROM flowstone_partition_states AS s
        WHERE s.tenant_id = $1 AND s.asset_name = {asset} AND s.partition = {key}
        UNION ALL
        SELECT s.current_id FROM flowstone_partition_states AS s
        WHERE s.tenant_id = $1 AND s.asset_name = {asset} AND s.partition IS NULL AND {key} IS NULL
        LIMIT 1
    )"""


_LATEST_SUCCESSES = f"""
SELECT l.* FROM unnest($2::text[], $3::text[]) AS p(asset, key)
CROSS JOIN LATERAL {_current_named(_state_named("p.asset", "p.key"))} AS l
UNION ALL
SELECT l.* FROM unnest($4::text[]) AS p(asset)
CROSS JOIN LATERAL {_current_named(_state_named("p.asset", "NULL"))} AS l
"""
"""Each pair's current record, named by its partition's state (schema version 25): a
lookup by key, then one by id, with no index to choose between."""
_SUCCESSES_AFTER = f"""
SELECT m.*, pg_snapshot_xmax($3::text::pg_snapshot) <= pg_snapshot_xmax(pg_current_snapshot()) AS known,
       pg_current_snapshot()::text AS mark
FROM (SELECT 1) AS one LEFT JOIN LATERAL (
    SELECT c.* FROM (
        SELECT s.current_id, s.success_xid FROM flowstone_partition_states AS s
        WHERE s.tenant_id = $1 AND s.asset_name = $2 AND s.success_xid >= pg_snapshot_xmax($3::text::pg_snapshot)
        UNION ALL
        SELECT f.* FROM pg_snapshot_xip($3::text::pg_snapshot) AS x(xid) CROSS JOIN LATERAL (
            SELECT s.current_id, s.success_xid FROM flowstone_partition_states AS s
            WHERE s.tenant_id = $1 AND s.asset_name = $2 AND s.success_xid = x.xid
            OFFSET 0  -- a lookup per transaction: joined whole, the plan read every state of the asset
        ) AS f
    ) AS s CROSS JOIN LATERAL {_current_named("s.current_id", f"{_M_COLUMNS}, m.seq")} AS c
    WHERE c.status = 'success'
    ORDER BY s.success_xid, c.seq
) AS m ON true
"""
"""An asset's current successes made by transactions a snapshot (a mark) could not
see: those begun after it, and those in flight then, one by one. Each partition's
state keeps the transaction that last made a success of it (schema version 24;
ranges of an index by transaction: as one OR, or an array, the index gave only the
asset). With the snapshot of now, taken by this statement, as the next mark; one
row with no record when there are none. A mark from later than now (of another
cluster, or of a database restored elsewhere) is not ``known``: compared with it,
every success would look old."""
_CURRENT_OF_ASSET = f"""
SELECT c.* FROM flowstone_partition_states AS s CROSS JOIN LATERAL {_current_named("s.current_id")} AS c
WHERE {_STATES_KEYED}
UNION ALL
SELECT c.* FROM flowstone_partition_states AS s CROSS JOIN LATERAL {_current_named("s.current_id")} AS c
WHERE {_STATES_WHOLE}
"""
"""Each partition's current record (success or stale), through the asset's states and
one lookup by id each: not a walk through every record the asset ever had."""
_STATES_OF_ASSET = f"""
SELECT s.partition, s.status FROM flowstone_partition_states AS s WHERE {_STATES_KEYED}
UNION ALL
SELECT s.partition, s.status FROM flowstone_partition_states AS s WHERE {_STATES_WHOLE}
"""
"""Each partition's status, an asset's states read through the states' two partial
indexes (as one condition it matched neither, and every tenant's states were read:
14 ms for an asset of 500 partitions among 200)."""
_STATE_OF = "s.tenant_id = $1 AND s.asset_name = $2 AND s.partition = $3"
_LATEST, _LATEST_WHOLE = (
    f"{_SELECT} AS m WHERE m.tenant_id = $1 AND m.seq = (SELECT s.seq FROM flowstone_partition_states AS s WHERE {of})"
    for of in (_STATE_OF, _STATES_WHOLE)
)
"""A partition's latest record: the one its state names (schema versions 12 and 18),
found by the tenant's index of sequences."""
_STATE_EXISTS, _STATE_EXISTS_WHOLE = (
    f"SELECT EXISTS (SELECT 1 FROM flowstone_partition_states AS s WHERE {of})"
    for of in (_STATE_OF, _STATES_WHOLE)
)


def _by_state(keyed: str, whole: str, tenant: str | None, asset_name: str, key: str | None) -> tuple[Any, ...]:
    """The statement and arguments of a lookup through a partition's state: ``keyed``
    for a partition key, ``whole`` for the unpartitioned record."""
    return (keyed, tenant or "", asset_name, key) if key is not None else (whole, tenant or "", asset_name)


_OF_STATUS = f"{_SELECT} WHERE tenant_id = $1 AND status = $2 ORDER BY seq DESC LIMIT $3"
"""Records of a common status (running, success, superseded), newest first, found
walking the tenant's records newest first: no index reads the status (schema
version 24), so a record's end is a HOT update."""
_OF_RARE_STATUS = f"""
SELECT {_M_COLUMNS}
FROM flowstone_rare_records AS r JOIN {TABLE} AS m ON m.id = r.id
WHERE r.tenant_id = $1 AND r.status = $2 AND m.status = $2 AND {_OF_TENANT}
ORDER BY r.seq DESC LIMIT $3"""
"""Records of a rare status (``RARE_STATUSES``), newest first, through the table that
names them (schema version 26): as many rows read as found."""
_MARK_STALE = f"""
WITH RECURSIVE built_on(asset, partitioned, key) AS (
    SELECT $2::text, $3::text IS NOT NULL, coalesce($3::text, '')
  UNION
    SELECT m.asset_name, m.partition IS NOT NULL, coalesce(m.partition, '')
    FROM built_on b
    JOIN flowstone_reads r
      ON r.asset_name = b.asset AND r.partition = b.key AND r.partitioned = b.partitioned AND r.tenant_id = $1
    JOIN {TABLE} m ON m.id = r.reader AND {_OF_TENANT} AND m.status = 'success'
)
UPDATE {TABLE} AS m SET status = 'stale', updated_at = $4
FROM built_on b
JOIN flowstone_reads r
  ON r.asset_name = b.asset AND r.partition = b.key AND r.partitioned = b.partitioned AND r.tenant_id = $1
WHERE m.id = r.reader AND {_OF_TENANT} AND m.status = 'success'
"""
"""Every success built on ``$2 @ $3``, transitively, made stale: its readers are
looked up in ``flowstone_reads`` (kept by triggers, schema version 13) by equality,
which an index answers under row-level security, so the cost follows the records
found, not the size of the table."""
_CURRENT_OF_R = _current_named(_state_named("r.asset_name", "r.partition"), "m.id, m.dependency_hash, m.status")
"""The current record of ``r``'s partition, named by its state (schema version 25): a
lookup by key, then by id, whatever the planner knows of the tables."""

# Statements here name the rows they change by primary key inside ARRAY(...): the
# planner then looks them up one by one. Joined directly, it chose to scan an index
# of every success (or the whole table) once per batch, while the table grew.
_BY_STATUS = "CASE WHEN m.status IN ('success', 'stale') THEN true END"
"""A status test no index can serve, so the primary key is the only way in."""



def _supersede(rows: str, now: str, where: str = "TRUE") -> str:
    """An UPDATE that supersedes the current record of each row ``r`` of ``rows`` (the
    FROM clause naming them) other than ``r`` itself, when ``where`` holds for ``r``."""
    return f"""UPDATE {TABLE} AS m SET status = 'superseded', updated_at = {now}
    WHERE m.id = ANY(ARRAY(
        SELECT c.id FROM {rows} CROSS JOIN LATERAL {_CURRENT_OF_R} AS c WHERE c.id <> r.id AND {where}
    )) AND {_OF_TENANT} AND {_BY_STATUS}"""


_KEYS = "unnest({}::uuid[], {}::text[], {}::text[], {}::bigint[]) AS r(id, asset_name, partition, fence)"
"""Rows ``r`` of record keys (``_key_arrays``), from four parameters."""
_SUPERSEDE_NEW = _supersede(_KEYS.format("$2", "$4", "$5", "$6"), "$3")
_SUPERSEDE_FOR = _supersede(
    f"{TABLE} AS r", "$4", "r.id = $2 AND r.tenant_id = $1 AND r.status = ANY($3::text[])"
)
_LOCK_LEASES = """SELECT fence FROM flowstone_leases
    WHERE fence = ANY({fences}::bigint[]) AND CASE WHEN tenant_id = $1 THEN true END
    ORDER BY asset_name COLLATE "C", partitioned, partition COLLATE "C" FOR {mode}"""
"""Lease rows are locked in key order (the order of ``begin`` batches too), so two
processes whose statements touch the same rows wait for each other and never
deadlock: PostgreSQL breaks a deadlock only after ``deadlock_timeout`` (a second).
They are found by fence: the tenant test filters (as a plain equality, the plan
made once read every lease of the tenant through the primary key)."""

_PRUNE_FINISHED = """
WITH backfills AS (
    DELETE FROM flowstone_backfills WHERE id IN (
        SELECT id FROM flowstone_backfills
        WHERE tenant_id = $1 AND state <> 'running' AND updated_at < $2
        ORDER BY updated_at LIMIT $3)
    RETURNING 1
), ticks AS (
    DELETE FROM flowstone_ticks WHERE (schedule, at, tenant_id) IN (
        SELECT t.schedule, t.at, t.tenant_id FROM flowstone_ticks AS t
        WHERE t.tenant_id = $1 AND t.state <> 'running' AND t.at < $2
          AND t.at < (SELECT max(n.at) FROM flowstone_ticks AS n WHERE n.tenant_id = $1 AND n.schedule = t.schedule)
        ORDER BY t.at LIMIT greatest($3 - (SELECT count(*) FROM backfills), 0))
    RETURNING 1
)
SELECT (SELECT count(*) FROM backfills) + (SELECT count(*) FROM ticks)
"""
"""Finished backfills and ticks older than ``before``; each schedule's newest tick stays."""

_PRUNE_CHOOSE = f"""
WITH history AS (
    SELECT seq, partition, status, inserted_at,
           row_number() OVER (PARTITION BY partition ORDER BY seq DESC) AS rank
    FROM {TABLE}
    WHERE tenant_id = $1 AND asset_name = $2 AND status IN ('superseded', 'failed', 'cancelled')
), doomed AS (
    SELECT h.seq FROM history h
    WHERE (h.rank > $3::int OR h.inserted_at < $4::timestamptz)
      AND NOT (h.status = 'superseded' AND (h.partition = ANY($5::text[]) OR (h.partition IS NULL AND $6)))
      AND h.seq NOT IN (  -- not the latest record of its partition; each half through its partial index
          SELECT s.seq FROM flowstone_partition_states AS s WHERE {_STATES_KEYED}
          UNION ALL
          SELECT s.seq FROM flowstone_partition_states AS s WHERE {_STATES_WHOLE})
    ORDER BY h.seq LIMIT $7
)
SELECT coalesce(array_agg(seq ORDER BY seq), '{{}}') FROM doomed
"""
"""The sequence numbers of the history records beyond a retention, oldest first
(``prune``: a choice, see ``flowstone.store.pruning``); NULL limits are no limit."""

_PRUNE_DELETE = f"""
WITH gone AS (
    DELETE FROM {TABLE} AS m
    WHERE m.tenant_id = $1 AND m.seq = ANY($2::bigint[]) AND m.asset_name = $3
      AND m.status IN ('superseded', 'failed', 'cancelled')
    RETURNING 1
)
SELECT count(*) FROM gone
"""
"""Chosen history records, by sequence number (the index of an asset's records by
sequence finds each), if they are still what was chosen."""

def _unnest(columns: Sequence[tuple[str, str]], first: int) -> str:
    """Rows ``r`` with ``columns`` (name, type), one array parameter each from ``$first``:
    asyncpg encodes typed arrays in C, and the server reads them without parsing JSON.
    An array of one element stands for that value in every row (``_columns`` sends
    a value that all the rows share once), except the first column's, which is
    always whole and says how many rows there are."""
    whole = f"${first}::{columns[0][1]}[]"
    arrays = [whole]
    for i, (_, kind) in enumerate(columns[1:], start=1):
        array = f"${first + i}::{kind}[]"
        arrays.append(
            f"CASE WHEN cardinality({array}) = 1 THEN array_fill(({array})[1], ARRAY[cardinality({whole})]) "
            f"ELSE {array} END")
    return f"unnest({', '.join(arrays)}) AS r({', '.join(name for name, _ in columns)})"


def _complete_batch(sets: str, rows: str, done_hash: str) -> str:
    """A batch of completions in one statement: the leases of terminal moves are released
    (a fence that is gone was taken over: that record is not written), those of other
    moves checked and locked, each success whose lease is still held supersedes its
    partition's current record, and the records are written (``sets``, from the rows
    ``r`` of ``rows``, all of the tenant ``$1``: a flush writes one tenant's). What the
    leases and the superseding need (fences, ids, the keys of the successes, the hash
    a released lease names: ``done_hash``, an expression over ``r`` and the record as
    stored, ``t``) is read from the rows and their records, not sent again. The
    superseding finds the current record as it was before this statement (its
    snapshot), so the order of these writes is free. In the last WHERE, the second
    half of the CASE makes a retried batch (whose COMMIT may have landed before the
    connection dropped) a no-op, not a false conflict.

    Parameters (``_complete``): $1 tenant, $2 now, then ``rows``' own from $3 (each
    row's record found by its id, in ``r``; ``fence`` is the lease the row holds, if
    any)."""
    terminal = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL, key=lambda s: s.value))
    successes = """(
        SELECT id, key_asset AS asset_name, key_partition AS partition, fence FROM r
        WHERE status = 'success' AND expected IS DISTINCT FROM 'success'
    ) AS r"""
    superseding = _supersede(successes, "$2", "(r.fence IS NULL OR r.fence IN (SELECT fence FROM held))")
    return f"""
WITH r AS MATERIALIZED (
    -- Each row with where its record is, found by primary key, row by row. Joined
    -- to the records by id, the rows were a function scan that a generic plan could
    -- run again for every record it changed (a batch of 272 unnested 74,000 rows,
    -- 62 ms of its 75); by this address the update fetches each record directly.
    SELECT r.*, t.ctid AS target, t.asset_name AS key_asset, t.partition AS key_partition,
           {done_hash} AS done_hash, r.fence IS NOT NULL AND r.status IN ({terminal}) AS releases
    FROM {rows} CROSS JOIN LATERAL (
        SELECT m.ctid, m.asset_name, m.partition, m.dependency_hash FROM {TABLE} AS m
        WHERE m.id = r.id AND {_OF_TENANT} LIMIT 1
    ) AS t
), locked AS (
    {_LOCK_LEASES.format(fences="ARRAY(SELECT fence FROM r WHERE releases)", mode="UPDATE")}
), released AS (
    UPDATE flowstone_leases AS l SET expires_at = '-infinity', owner = '',
        done_id = CASE WHEN x.status = 'success' THEN x.id END,
        done_hash = CASE WHEN x.status = 'success' THEN x.done_hash END
    FROM r AS x
    WHERE x.releases AND l.tenant_id = $1 AND l.fence IN (SELECT fence FROM locked) AND l.fence = x.fence
      AND l.owner <> ''
    RETURNING l.fence
), kept AS (
    {_LOCK_LEASES.format(fences="ARRAY(SELECT fence FROM r WHERE r.fence IS NOT NULL AND NOT releases)",
                         mode="SHARE")}
), held AS (
    SELECT fence FROM released UNION ALL SELECT fence FROM kept
), superseded AS (
    {superseding}
)
UPDATE {TABLE} AS m SET {sets}
FROM r
WHERE m.ctid = r.target AND m.id = r.id AND {_OF_TENANT}
  AND CASE WHEN m.status = r.expected OR (m.status = r.status AND m.updated_at = r.updated_at) THEN true END
  AND (r.fence IS NULL OR r.fence IN (SELECT fence FROM held))
RETURNING m.id
"""


_COMPLETE_BATCH = _complete_batch(
    """status = r.status, started_at = r.started_at, completed_at = r.completed_at, duration_ms = r.duration_ms,
    upstream_assets = ARRAY(SELECT jsonb_array_elements_text(r.upstream_assets)),
    upstream_partitions = r.upstream_partitions, dependency_hash = r.dependency_hash, metadata = r.metadata,
    error_message = r.error_message, executor_node = r.executor_node, updated_at = r.updated_at,
    error_traceback = r.error_traceback""",
    f"jsonb_to_recordset($3::text::jsonb) AS r({_ROW_TYPES}, fence bigint)",
    "r.dependency_hash",
)
"""Completions that move more than a job's end does: each record's JSON row (``_row``)."""
_END_COLUMNS = (
    ("id", "uuid"), ("status", "text"), ("expected", "text"), ("completed_at", "timestamptz"),
    ("duration_ms", "double precision"), ("metadata", "text"), ("error_message", "text"),
    ("updated_at", "timestamptz"), ("error_traceback", "text"), ("fence", "bigint"),
)
"""An end's values (``_end_values``), in this order; the metadata as JSON text."""
_END_BATCH = _complete_batch(
    """status = r.status, completed_at = r.completed_at, duration_ms = r.duration_ms, metadata = r.metadata::jsonb,
    error_message = r.error_message, updated_at = r.updated_at, error_traceback = r.error_traceback""",
    _unnest(_END_COLUMNS, first=3),
    "t.dependency_hash",
)
"""How jobs end: only the columns an end changes (``ENDING``), each one typed array;
the other columns stay as ``begin`` wrote them (ADR 0031)."""
_LEASE_OF_R = """(
    SELECT l.asset_name, l.partitioned, l.partition, l.owner, l.fence, l.expires_at, l.record_id, l.done_id,
           l.done_hash
    FROM flowstone_leases l
    WHERE l.tenant_id = $1 AND l.asset_name = r.asset_name AND l.partitioned = r.partitioned
      AND l.partition = r.lease_key
    LIMIT 1  -- one per partition: keeps it a lookup by primary key
)"""
"""The lease of ``r``'s partition, by primary key (a join scanned every lease row of
the tenant, the dead ones of released leases included)."""
_BEGIN_COLUMNS = (
    ("id", "uuid"), ("asset_name", "text"), ("partition", "text"), ("run_id", "uuid"), ("status", "text"),
    ("started_at", "timestamptz"), ("completed_at", "timestamptz"), ("duration_ms", "double precision"),
    ("upstream_assets", "text"), ("upstream_partitions", "text"), ("dependency_hash", "text"), ("metadata", "text"),
    ("error_message", "text"), ("executor_node", "text"), ("inserted_at", "timestamptz"),
    ("updated_at", "timestamptz"), ("error_traceback", "text"), ("owner", "text"), ("seconds", "double precision"),
    ("seen", "uuid"), ("reuse_hash", "text"),
)
"""A begin's values (``_beginning``), each column sent as one array (a record's
upstream assets, partitions and metadata as JSON text)."""
# Take each lease that is free or expired and insert the records of those granted;
# the record an expired lease was taken from is closed as an orphan. One statement.
_BEGIN = f"""
WITH asked AS (
    -- A lease's key: whether the record has a partition, and the partition or ''.
    SELECT *, partition IS NOT NULL AS partitioned, coalesce(partition, '') AS lease_key
    FROM {_unnest(_BEGIN_COLUMNS, first=2)}
), leases AS (
    -- Each asked partition's lease, if it has one, looked up once for the two
    -- questions below (held by someone live; expired and to be taken over).
    SELECT r.id AS asked_id, l.* FROM asked r CROSS JOIN LATERAL {_LEASE_OF_R} AS l
), done AS (
    -- Finished by another process since the caller looked, as the caller would have.
    SELECT r.id AS asked_id, c.id AS current_id
    FROM asked r CROSS JOIN LATERAL {_CURRENT_OF_R} AS c
    WHERE r.reuse_hash IS NOT NULL AND c.status = 'success' AND c.dependency_hash = r.reuse_hash
      AND c.id IS DISTINCT FROM r.seen
), r AS (
    -- Not done, and not held by a live lease as of now: a held lease is reported
    -- without locking its row (locking the rows of another process's leases made
    -- its releases wait on us, and ours on it).
    SELECT * FROM asked a WHERE id NOT IN (SELECT asked_id FROM done) AND id NOT IN (
        SELECT asked_id FROM leases WHERE owner <> '' AND expires_at > clock_timestamp()
    )
), expired AS (
    SELECT l.asset_name, l.partitioned, l.partition, l.owner, l.fence, l.expires_at, l.record_id, l.done_id,
           l.done_hash
    FROM r JOIN leases l ON l.asked_id = r.id
    WHERE l.expires_at <= clock_timestamp() AND l.owner <> ''  -- expired, not released
), granted AS (
    INSERT INTO flowstone_leases AS l
        (tenant_id, asset_name, partitioned, partition, owner, fence, record_id, expires_at)
    SELECT $1, r.asset_name, r.partitioned, r.lease_key, r.owner,
           nextval('flowstone_lease_fences'), r.id, clock_timestamp() + make_interval(secs => r.seconds)
    FROM r
    ON CONFLICT (asset_name, partition, partitioned, tenant_id) DO UPDATE
        SET owner = EXCLUDED.owner, fence = EXCLUDED.fence, record_id = EXCLUDED.record_id,
            expires_at = EXCLUDED.expires_at, done_id = NULL, done_hash = NULL
        -- Evaluated on the newest row, after waiting for a holder that was finishing:
        -- its release says whether it just did what this caller would do.
        WHERE l.expires_at <= clock_timestamp() AND NOT coalesce(
            (SELECT r.reuse_hash = l.done_hash AND l.done_id IS DISTINCT FROM r.seen
             FROM r WHERE r.id = EXCLUDED.record_id), false)
    RETURNING l.record_id, l.fence, l.asset_name, l.partitioned, l.partition
), inserted AS (
    INSERT INTO {TABLE} ({_COLUMNS})
    SELECT r.id, $1, r.asset_name, r.partition, r.run_id, r.status, r.started_at, r.completed_at,
           r.duration_ms,
           CASE WHEN r.upstream_assets = '[]' THEN '{{}}'::text[]  -- most begins: no subquery a row
                ELSE ARRAY(SELECT jsonb_array_elements_text(r.upstream_assets::jsonb)) END,
           r.upstream_partitions::jsonb, r.dependency_hash, r.metadata::jsonb, r.error_message, r.executor_node,
           r.inserted_at, r.updated_at, r.error_traceback
    FROM r JOIN granted g ON g.record_id = r.id
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
-- Whether each granted record was inserted: not when its id is in use (someone
-- else's, or ours from a retried batch whose first COMMIT landed).
SELECT g.record_id, g.fence, e.record_id, e.owner, NULL::uuid, i.id IS NOT NULL
FROM granted g LEFT JOIN expired e USING (asset_name, partitioned, partition)
LEFT JOIN inserted i ON i.id = g.record_id
UNION ALL
SELECT asked_id, NULL, NULL, NULL, current_id, false FROM done
"""
_RELEASE_REFUSED = """
UPDATE flowstone_leases SET expires_at = '-infinity', owner = ''
WHERE tenant_id = $1 AND fence = ANY($2::bigint[])
"""
"""Gives back the leases granted to begins refused in the same write (their ids in use)."""
_CLOSE_TAKEN_OVER = f"""
UPDATE {TABLE} AS m SET status = CASE m.status WHEN 'running' THEN 'failed' ELSE 'cancelled' END,
    completed_at = $3, updated_at = $3,
    error_message = 'orphaned: ' || r.owner || ' stopped renewing its lease without finishing it'
FROM unnest($2::uuid[], $4::text[]) AS r(id, owner)
WHERE m.id = r.id AND m.id = ANY($2::uuid[]) AND {_OF_TENANT}
  AND CASE WHEN m.status IN ('pending', 'running', 'waiting_approval') THEN true END
"""
"""Closes the records of leases that expired and were taken over just now (rare)."""
_HOLDERS = f"""
SELECT l.* FROM unnest($2::text[], $3::boolean[], $4::text[]) AS r(asset_name, partitioned, lease_key)
CROSS JOIN LATERAL {_LEASE_OF_R} AS l
"""
_RENEW = f"""
WITH locked AS ({_LOCK_LEASES.format(fences="$4", mode="UPDATE")})
UPDATE flowstone_leases SET expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE tenant_id = $1 AND owner = $2 AND fence IN (SELECT fence FROM locked)
RETURNING fence
"""
_LEASE_LIVE = """
SELECT fence = $5 AND expires_at > clock_timestamp() FROM flowstone_leases
WHERE tenant_id = $1 AND asset_name = $2 AND partitioned = $3 AND partition = $4
"""
_CLOSE_ORPHANS = f"""
WITH dropped AS (
    UPDATE flowstone_leases SET expires_at = '-infinity', owner = '', done_id = NULL, done_hash = NULL
    WHERE tenant_id = $1 AND owner = $2
)
UPDATE {TABLE} SET status = CASE status WHEN 'running' THEN 'failed' ELSE 'cancelled' END,
    completed_at = $4, updated_at = $4, error_message = $3
WHERE tenant_id = $1 AND status IN ('pending', 'running', 'waiting_approval')
  AND starts_with(executor_node, $2 || '/')
RETURNING id
"""

_SAVE_BACKFILL = """
INSERT INTO flowstone_backfills (id, tenant_id, asset_name, state, spec, status, owner, heartbeat_at, updated_at)
VALUES ($1, $2, $3, $4, $5::text::jsonb, $6::text::jsonb, $7, now(), now())
ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, status = EXCLUDED.status,
    spec = EXCLUDED.spec, heartbeat_at = now(), updated_at = now(), cancel_requested = false
WHERE flowstone_backfills.tenant_id = EXCLUDED.tenant_id
  AND flowstone_backfills.owner IS NOT DISTINCT FROM EXCLUDED.owner
  AND NOT (flowstone_backfills.cancel_requested AND EXCLUDED.state = 'running')
RETURNING true
"""
"""A backfill saved whole, spec and status: true unless another owner drives it,
or a cancel was asked and this save says it is still running."""
_SAVE_STATUS = """
WITH saved AS (
    UPDATE flowstone_backfills SET state = $3, status = $4::text::jsonb, heartbeat_at = now(), updated_at = now(),
        cancel_requested = false
    WHERE id = $1 AND tenant_id = $2 AND owner IS NOT DISTINCT FROM $5 AND NOT (cancel_requested AND $3 = 'running')
    RETURNING true
)
SELECT coalesce((SELECT true FROM saved),
                (SELECT false FROM flowstone_backfills WHERE id = $1 AND tenant_id = $2))
"""
"""A checkpoint of a backfill whose spec this store wrote: its status alone, on the
same terms as ``_SAVE_BACKFILL``. True if saved, false if refused, NULL if the row is
gone (then it is saved whole again)."""

WAIT_POLL = (0.01, 0.5)
"""First and longest pause between looks at a lease someone else holds."""


@attrs.define(eq=False)
class _Write:
    """One queued record write and, once flushed, its outcome."""

    kind: str  # "insert", "begin" (lease and insert), "complete", or "end" (a completion of ``ENDING`` fields)
    record: Materialization  # the state to write
    expected: Status | None
    # "insert" and "complete": the record as one JSON object (``_row``); "begin" and
    # "end": its values in the order of the statement's columns (sent as arrays).
    row: Any
    lease: Lease | None = None  # "complete" and "end": the lease it writes under
    fence: int | None = None  # "begin": the fence of the lease granted
    done: bool = False
    error: BaseException | None = None


class _Leaders:
    """The group commits' bookkeeping (writes, and lookups): how many leaders are
    writing or looking up now, and the event the others wait on until one ends."""

    __slots__ = ("_ended", "count")

    def __init__(self) -> None:
        self.count = 0
        self._ended: anyio.Event | None = None

    def begin(self) -> None:
        """One more leader is writing or looking up (``end`` when it is done)."""
        self.count += 1

    async def wait(self) -> None:
        """Until a leader in flight now ends."""
        if self._ended is None:
            self._ended = anyio.Event()
        await self._ended.wait()

    def end(self) -> None:
        """A leader is done: the others wake and look again."""
        self.count -= 1
        event, self._ended = self._ended, None
        if event is not None:
            event.set()


@attrs.define(eq=False)
class _Lookup:
    """One ``latest_successes`` call waiting for a lookup, and its answer."""

    tenant: str | None
    pairs: list[tuple[str, str | None]]
    found: dict[tuple[str, str | None], Materialization] | None = None
    error: Exception | None = None


class PostgresStore(PostgresClient):
    """Records in PostgreSQL. ``PostgresStore(dsn)`` or ``PostgresStore(pool=asyncpg_pool)``.

    Connects lazily on first use; ``await store.migrate()`` creates or upgrades the
    schema; ``await store.close()`` (or ``async with``) releases the pool it made.
    ``allow_bypass_rls=True`` accepts a superuser or BYPASSRLS connection while
    tenants are in use (the database would not isolate them); by default that is
    refused with ``TenancyNotEnforced``.
    """

    backfill_chunk = 128
    """Most partitions a backfill's worker takes at once, and batches (ADR 0032's
    addenda): each flush's statements and commit cost the same for more rows."""

    def __init__(self, dsn: str | None = None, pool: Any = None, **options: Any) -> None:
        """``options``: ``min_size``, ``max_size`` (the pool), ``allow_bypass_rls``."""
        super().__init__(dsn, pool, **options)
        self._queue: list[_Write] = []
        self._flushes = _Leaders()  # flushes in flight now
        self._in_flight: set[int] = set()  # records a flush in flight writes (their ids' integers: C hashes)
        self._lookups: list[_Lookup] = []  # asked, waiting for a lookup to take them
        self._looking = _Leaders()  # lookups in flight now
        self._specs = WrittenSpecs()  # backfill specs written here: later saves write the status alone
        self._pruning = Choice()  # the records a retention pass chose and has not deleted yet

    async def migrate(self) -> list[int]:
        """Create or upgrade the schema (idempotent, safe concurrently); the versions applied now."""
        return await self.db.run_plain(_migrate)

    # ------------------------------------------------------------ writes

    async def create(self, **fields: Any) -> Materialization:
        record = new_record(fields, current_tenant(), _utcnow())
        await self._write(_Write("insert", record, None, _row(record, None)))
        return record

    async def begin(
        self, owner: str, seconds: float, *, unless_done: tuple[Any, str] | None = None, **fields: Any
    ) -> tuple[Materialization, Lease]:
        op = _beginning(new_record(fields, current_tenant(), _utcnow()), owner, seconds, unless_done)
        await self._write(op)
        return _granted(op, owner)

    async def begin_many(
        self, owner: str, seconds: float, starts: Sequence[Start]
    ) -> list[tuple[Materialization, Lease] | Exception]:
        tenant, now = current_tenant(), _utcnow()

        async def write(ops: list[_Write]) -> list[tuple[Materialization, Lease] | Exception]:
            errors = await self._write_many(ops)
            return [error or _granted(op, owner) for op, error in zip(ops, errors, strict=True)]

        return await in_one_write(
            starts, lambda start: _beginning(new_record(start.fields, tenant, now), owner, seconds, start.unless_done),
            write)

    async def complete(
        self, record: Materialization, status: Status, *, lease: Lease | None = None, **fields: Any
    ) -> Materialization:
        op = _completing(record, status, lease, fields, current_tenant(), _utcnow())
        await self._write(op)
        return op.record

    async def complete_many(self, ends: Sequence[End]) -> list[Materialization | Exception]:
        tenant, now = current_tenant(), _utcnow()

        async def write(ops: list[_Write]) -> list[Materialization | Exception]:
            errors = await self._write_many(ops)
            return [error or op.record for op, error in zip(ops, errors, strict=True)]

        return await in_one_write(
            ends, lambda end: _completing(end.record, end.status, end.lease, end.fields, tenant, now), write)

    async def renew_leases(self, owner: str, fences: Collection[int], seconds: float) -> set[int]:
        if not fences:
            return set()
        tenant = current_tenant()
        rows = await self.db.run(tenant, _fetch, _RENEW, tenant or "", owner, seconds, list(fences))
        return {row[0] for row in rows}

    async def wait_lease(self, asset_name: str, partition: str | None, fence: int, timeout: float) -> None:
        tenant = current_tenant()
        pause, longest = WAIT_POLL
        with anyio.move_on_after(timeout):
            while await self.db.run(
                tenant, _fetchval, _LEASE_LIVE, tenant or "", asset_name, partition is not None, partition or "", fence
            ):
                # Polling, bounded: LISTEN/NOTIFY would need a connection per waiter (ADR 0009).
                await anyio.sleep(pause)
                pause = min(pause * 2, longest)

    async def close_orphans(self, owner: str, message: str) -> int:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch, _CLOSE_ORPHANS, tenant or "", owner, storable_text(message), _utcnow()
        )
        return len(rows)

    async def update_status(self, id: uuid.UUID | str, status: Status | str, **fields: Any) -> Materialization:
        record_id, target, changes = parse_id(id), to_status(status), update_fields(fields)
        for name in ("metadata", "upstream_partitions"):
            if name in changes:
                changes[name] = json.loads(to_json(plain(changes[name]), what=name))  # checked, tuples as lists
        tenant = current_tenant()
        row = await self.db.run(tenant, _update_status, record_id, target, changes, _utcnow(), tenant or "")
        return _record(row)

    async def mark_stale(self, asset_name: str, partition: str | None) -> None:
        tenant = current_tenant()
        await self.db.run(tenant, _execute, _MARK_STALE, tenant or "", asset_name, partition, _utcnow())

    async def _write(self, op: _Write) -> None:
        """Queue ``op`` and return once a flush has written it (see the module doc)."""
        self._queue.append(op)
        await self._settle((op,))
        if op.error is not None:
            raise op.error

    async def _write_many(self, ops: Sequence[_Write]) -> list[Exception | None]:
        """Queue ``ops`` at once (they share flushes, and the caller wakes once):
        the error of each that was not written, else None (a flush that was
        cancelled or interrupted raises that)."""
        self._queue.extend(ops)
        await self._settle(ops)
        errors: list[Exception | None] = []
        for op in ops:
            if op.error is not None and not isinstance(op.error, Exception):
                raise op.error
            errors.append(op.error)
        return errors

    async def _settle(self, ops: Sequence[_Write]) -> None:
        """Wait, shielded, until a flush has written or failed each of ``ops``; one
        that takes longer than ``WRITE_TIMEOUT`` fails as unavailable."""
        try:
            with anyio.fail_after(WRITE_TIMEOUT, shield=True):
                for op in ops:
                    while not op.done:
                        if self._flushes.count < FLUSHES and self._takeable():
                            await self._lead_flush()
                        else:
                            await self._flushes.wait()
        except TimeoutError:
            for op in ops:
                if not op.done:
                    if op in self._queue:
                        self._queue.remove(op)
                    op.done, op.error = True, DatabaseUnavailable(
                        f"writing the record took longer than {WRITE_TIMEOUT}s",
                        asset=op.record.asset_name, partition=op.record.partition, tenant=op.record.tenant_id,
                    )

    def _takeable(self) -> bool:
        """Whether a new flush would have something to write: a queued write whose
        record no flush in flight is writing."""
        busy = self._in_flight
        return any(queued.record.id.int not in busy for queued in self._queue)

    async def _lead_flush(self) -> None:
        self._flushes.begin()
        batch: list[_Write] = []
        try:
            # Let the tasks the last flush woke run first: their next writes join
            # this batch instead of waiting for a flush of their own.
            await anyio.lowlevel.checkpoint()
            rest: list[_Write] = []
            ids = set(self._in_flight)
            for queued in self._queue:  # one write per record in flight; a second waits for the next
                key = queued.record.id.int
                (rest if key in ids or len(batch) == FLUSH_ROWS else batch).append(queued)
                ids.add(key)
            self._queue = rest
            for queued in batch:
                self._in_flight.add(queued.record.id.int)
            by_tenant: dict[str | None, list[_Write]] = {}
            for queued in batch:
                by_tenant.setdefault(queued.record.tenant_id, []).append(queued)
            for tenant, ops in by_tenant.items():
                await self._flush(tenant, ops)
        except BaseException as error:
            for queued in batch:
                if not queued.done:
                    queued.done, queued.error = True, error
            raise
        finally:
            for queued in batch:
                self._in_flight.discard(queued.record.id.int)
            self._flushes.end()

    async def _flush(self, tenant: str | None, ops: list[_Write]) -> None:
        try:
            outcome = await self.db.run(tenant, _write_batch, tenant or "", ops, by_key=True)
        except DatabaseUnavailable:
            raise
        except FlowstoneError:
            if len(ops) == 1:
                raise
            # One bad row aborts the whole transaction: write them one by one so
            # each caller hears about its own row only.
            for op in ops:
                try:
                    await self._flush(tenant, [op])
                except FlowstoneError as own_error:
                    op.done, op.error = True, own_error
            return
        for op, found in zip(ops, outcome, strict=True):
            op.done, op.error = True, found

    # ------------------------------------------------------------- reads

    async def get(self, asset_name: str, partition: Any = None) -> Materialization:
        key, tenant = serialize_partition(partition), current_tenant()
        row = await self.db.run(tenant, _fetchrow, *_by_state(_LATEST, _LATEST_WHOLE, tenant, asset_name, key))
        if row is None:
            raise NotFound("no materialization", asset=asset_name, partition=key, tenant=tenant)
        return _record(row)

    async def get_by_id(self, id: uuid.UUID | str) -> Materialization:
        record_id, tenant = parse_id(id), current_tenant()
        row = await self.db.run(
            tenant, _fetchrow, f"{_SELECT} WHERE id = $1 AND tenant_id = $2", record_id, tenant or "")
        if row is None:
            raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant)
        return _record(row)

    async def get_by_run_id(self, run_id: uuid.UUID | str) -> list[Materialization]:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch, f"{_SELECT} WHERE run_id = $1 AND tenant_id = $2 ORDER BY seq",
            parse_id(run_id, "run"), tenant or "",
        )
        return [_record(row) for row in rows]

    async def exists(self, asset_name: str, partition: Any = None) -> bool:
        key, tenant = serialize_partition(partition), current_tenant()
        return await self.db.run(
            tenant, _fetchval, *_by_state(_STATE_EXISTS, _STATE_EXISTS_WHOLE, tenant, asset_name, key))

    async def list_by_status(self, status: Status | str, *, limit: int = 100) -> list[Materialization]:
        tenant, wanted = current_tenant(), to_status(status)
        rows = await self.db.run(
            tenant, _fetch, _OF_RARE_STATUS if wanted.value in RARE_STATUSES else _OF_STATUS, tenant or "",
            wanted.value, check_limit(limit),
        )
        return [_record(row) for row in rows]

    async def list_all(
        self, *, asset_name: str | None = None, limit: int = 1000, before: uuid.UUID | str | None = None
    ) -> list[Materialization]:
        tenant, count = current_tenant(), check_limit(limit)
        below = 2**63 - 1
        if before is not None:
            rid = parse_id(before)
            found = await self.db.run(
                tenant, _fetchval, f"SELECT seq FROM {TABLE} WHERE id = $1 AND tenant_id = $2", rid, tenant or "")
            if found is None:
                raise NotFound(f"no record {rid}", tenant=tenant)
            below = found
        args: tuple[Any, ...]
        if asset_name is None:
            sql = f"{_SELECT} WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            args = (tenant or "", below, count)
        else:
            sql = f"{_SELECT} WHERE tenant_id = $1 AND asset_name = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
            args = (tenant or "", asset_name, below, count)
        return [_record(row) for row in await self.db.run(tenant, _fetch, sql, *args)]

    async def latest_successes(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], Materialization]:
        """The current success of each pair that has one. Lookups asked while another
        is in flight go together in the next (one transaction for a backfill's
        workers, not one each: its three round trips cost more than the query)."""
        lookup = _Lookup(current_tenant(), list(pairs))
        if not lookup.pairs:
            return {}
        self._lookups.append(lookup)
        while lookup.found is None and lookup.error is None:
            if self._looking.count < LOOKUPS:
                await self._lead_lookup()
            else:
                await self._looking.wait()
        if lookup.error is not None:
            raise lookup.error
        assert lookup.found is not None
        return lookup.found

    async def _lead_lookup(self) -> None:
        self._looking.begin()
        taken: list[_Lookup] = []
        try:
            await anyio.lowlevel.checkpoint()  # the workers woken with us ask theirs first
            taken, self._lookups = self._lookups, []
            by_tenant: dict[str | None, list[_Lookup]] = {}
            for lookup in taken:
                by_tenant.setdefault(lookup.tenant, []).append(lookup)
            for tenant, lookups in by_tenant.items():
                wanted = list(dict.fromkeys(pair for lookup in lookups for pair in lookup.pairs))
                keyed = [pair for pair in wanted if pair[1] is not None]
                try:
                    rows = await self.db.run(
                        tenant, _fetch, _LATEST_SUCCESSES, tenant or "",
                        [a for a, _ in keyed], [k for _, k in keyed], [a for a, k in wanted if k is None],
                    )
                except Exception as error:
                    for lookup in lookups:
                        lookup.error = error
                    continue
                found = {(record.asset_name, record.partition): record for record in map(_record, rows)}
                for lookup in lookups:
                    lookup.found = {pair: found[pair] for pair in lookup.pairs if pair in found}
        finally:
            # Cancelled midway: what was taken and not answered goes back for the next leader.
            self._lookups[:0] = [lookup for lookup in taken if lookup.found is None and lookup.error is None]
            self._looking.end()

    async def partitions_of(self, asset_name: str) -> dict[str | None, Materialization]:
        tenant = current_tenant()
        rows = await self.db.run(tenant, _fetch, _CURRENT_OF_ASSET, tenant or "", asset_name)
        return {record.partition: record for record in map(_record, rows)}

    async def successes_after(self, asset_name: str, mark: str | None) -> tuple[list[Materialization], str]:
        after = None if mark is None else _read_mark(mark)
        tenant = current_tenant()
        if after is None:
            now = await self.db.run(tenant, _fetchval, "SELECT pg_current_snapshot()::text")
            return [], f"pg:{now}"
        rows = await self.db.run(tenant, _fetch, _SUCCESSES_AFTER, tenant or "", asset_name, after)
        if not rows[0][-2]:
            raise bad_mark(mark, "is later than this database's now")
        return [_record(row) for row in rows if row[0] is not None], f"pg:{rows[0][-1]}"

    async def partition_states(self, asset_name: str) -> dict[str | None, Status]:
        tenant = current_tenant()
        rows = await self.db.run(tenant, _fetch, _STATES_OF_ASSET, tenant or "", asset_name)
        return {row[0]: Status(row[1]) for row in rows}  # kept by triggers (schema version 12)

    async def prune(
        self, asset_name: str, *, keep_last: int | None = None, before: datetime | None = None,
        spare: Collection[str | None] = (), limit: int = 10_000,
    ) -> int:
        keep_last, limit = check_retention(keep_last, limit)
        if keep_last is None and before is None:
            return 0
        tenant = current_tenant()

        async def choose(most: int) -> list[int]:
            keys = [partition for partition in spare if partition is not None]
            found: list[int] = await self.db.run(tenant, _fetchval, _PRUNE_CHOOSE, tenant or "", asset_name,
                                                 keep_last, before, keys, None in spare, most)
            return found

        async def delete(chosen: list[int]) -> int:
            deleted: int = await self.db.run(tenant, _fetchval, _PRUNE_DELETE, tenant or "", chosen, asset_name)
            return deleted

        key = prune_key(tenant, asset_name, keep_last, before, spare)
        return await self._pruning.prune(key, limit, choose, delete)

    async def prune_finished(self, before: datetime, *, limit: int = 10_000) -> int:
        tenant, limit = current_tenant(), check_batch(limit)
        deleted: int = await self.db.run(tenant, _fetchval, _PRUNE_FINISHED, tenant or "", check_before(before), limit)
        return deleted

    # --------------------------------------------------------- backfills

    async def save_backfill(self, id: uuid.UUID, state: Any, *, owner: str | None = None) -> None:
        tenant = current_tenant()
        status, state_name = status_to_json(state)
        saved = None
        if self._specs.written(state.spec):  # a checkpoint: the status alone
            saved = await self.db.run(tenant, _fetchval, _SAVE_STATUS, id, tenant or "", state_name, status, owner)
        if saved is None:  # a first save here, or the row is gone: spec and status
            saved = await self.db.run(
                tenant, _fetchval, _SAVE_BACKFILL,
                id, tenant or "", state.spec.asset, state_name, spec_to_json(state.spec), status, owner,
            )
            if saved:
                self._specs.wrote(state.spec)
        if not saved and await self.db.run(
            tenant, _fetchval,
            "SELECT cancel_requested AND owner IS NOT DISTINCT FROM $3 FROM flowstone_backfills "
            "WHERE id = $1 AND tenant_id = $2",
            id, tenant or "", owner,
        ):
            raise CancelRequested(f"backfill {str(id)!r}: a cancel was requested", tenant=tenant)
        if not saved:
            raise LeaseLost(
                f"backfill {str(id)!r} is now driven by another process; {owner} may no longer save it",
                tenant=tenant,
            )

    async def decide(self, id: uuid.UUID | str, approve: bool, reason: str | None = None) -> Materialization:
        record_id, tenant = parse_id(id), current_tenant()
        text = None if reason is None else storable_text(reason)
        return await self.db.run(tenant, _decide, record_id, tenant or "", approve, text)

    async def decision(self, id: uuid.UUID) -> tuple[bool, str | None] | None:
        tenant = current_tenant()
        row = await self.db.run(
            tenant, _fetchrow,
            "SELECT approve, reason FROM flowstone_decisions WHERE record_id = $1 AND tenant_id = $2",
            parse_id(id), tenant or "",
        )
        return None if row is None else (row[0], row[1])

    async def claim_role(self, role: str, owner: str, seconds: float) -> RoleHolder:
        tenant = current_tenant()
        return await self.db.run(tenant, _claim_role, tenant or "", role, owner, role_seconds(seconds))

    async def release_role(self, role: str, owner: str) -> None:
        tenant = current_tenant()
        await self.db.run(
            tenant, _execute,
            "UPDATE flowstone_roles SET owner = '', expires_at = clock_timestamp() "
            "WHERE tenant_id = $1 AND role = $2 AND owner = $3",
            tenant or "", role, owner,
        )

    async def role_holder(self, role: str) -> RoleHolder | None:
        tenant = current_tenant()
        row = await self.db.run(
            tenant, _fetchrow,
            "SELECT owner, fence, expires_at, heartbeat_at FROM flowstone_roles "
            "WHERE tenant_id = $1 AND role = $2 AND owner != ''",
            tenant or "", role,
        )
        return None if row is None else RoleHolder(role, row[0], row[1], row[2], heartbeat_at=row[3])

    async def claim_tick(self, schedule: str, at: datetime, owner: str) -> bool:
        tenant = current_tenant()
        claimed = await self.db.run(
            tenant, _fetchval,
            "INSERT INTO flowstone_ticks (tenant_id, schedule, at, owner) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT DO NOTHING RETURNING true",
            tenant or "", schedule, tick_time(at), owner,
        )
        return bool(claimed)

    async def finish_tick(
        self, schedule: str, at: datetime, state: str, *, run_id: uuid.UUID | None = None, error: str | None = None
    ) -> None:
        tenant, when = current_tenant(), tick_time(at)
        found = await self.db.run(
            tenant, _fetchval,
            "UPDATE flowstone_ticks SET state = $4, run_id = $5, error = $6, finished_at = now() "
            "WHERE tenant_id = $1 AND schedule = $2 AND at = $3 RETURNING true",
            tenant or "", schedule, when, finished_state(state), run_id,
            None if error is None else storable_text(error),
        )
        if not found:
            raise NotFound(f"schedule {schedule!r} has no tick at {when.isoformat()}", tenant=tenant)

    async def last_ticks(self) -> dict[str, Tick]:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch,
            "SELECT DISTINCT ON (schedule) schedule, at, owner, state, run_id, error, claimed_at, finished_at "
            "FROM flowstone_ticks WHERE tenant_id = $1 ORDER BY schedule, at DESC",
            tenant or "",
        )
        return {row[0]: Tick(*row) for row in rows}

    async def unfinished_ticks(self, *, limit: int = 1000) -> list[Tick]:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch,
            "SELECT schedule, at, owner, state, run_id, error, claimed_at, finished_at FROM flowstone_ticks "
            "WHERE tenant_id = $1 AND state = 'running' ORDER BY at, schedule LIMIT $2",
            tenant or "", check_limit(limit),
        )
        return [Tick(*row) for row in rows]

    async def load_cursor(self, name: str) -> Cursor | None:
        tenant, (name, _, _) = current_tenant(), cursor_fields(name, None, None)
        row = await self.db.run(
            tenant, _fetchrow,
            "SELECT name, value, error, updated_at FROM flowstone_cursors WHERE tenant_id = $1 AND name = $2",
            tenant or "", name,
        )
        return None if row is None else Cursor(*row)

    async def save_cursor(self, name: str, value: str | None, *, error: str | None = None) -> None:
        tenant, fields = current_tenant(), cursor_fields(name, value, error)
        await self.db.run(
            tenant, _execute,
            "INSERT INTO flowstone_cursors (tenant_id, name, value, error) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (name, tenant_id) DO UPDATE SET value = excluded.value, error = excluded.error, "
            "updated_at = now()",
            tenant or "", *fields,
        )

    async def list_cursors(self) -> list[Cursor]:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch,
            "SELECT name, value, error, updated_at FROM flowstone_cursors WHERE tenant_id = $1 ORDER BY name",
            tenant or "",
        )
        return [Cursor(*row) for row in rows]

    async def request_cancel(self, id: uuid.UUID) -> Any:
        tenant, bid = current_tenant(), parse_id(id, "backfill")
        row = await self.db.run(
            tenant, _fetchrow,
            """UPDATE flowstone_backfills SET cancel_requested = (state = 'running')
               WHERE id = $1 AND tenant_id = $2 RETURNING spec::text, status::text""",
            bid, tenant or "",
        )
        if row is None:
            raise BackfillNotFound(bid, tenant=tenant)
        return saved_from_json(row[0], row[1])

    async def list_backfills(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch,
            "SELECT spec::text, status::text FROM flowstone_backfills WHERE tenant_id = $1 "
            "ORDER BY updated_at DESC, id LIMIT $2 OFFSET $3",
            tenant or "", check_limit(limit), check_limit(offset, "offset"),
        )
        return [saved_from_json(row[0], row[1]) for row in rows]

    async def list_backfill_statuses(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        tenant = current_tenant()
        rows = await self.db.run(
            tenant, _fetch,  # the spec, and its value stored apart (TOAST), is not even read
            "SELECT status::text, id, asset_name FROM flowstone_backfills WHERE tenant_id = $1 "
            "ORDER BY updated_at DESC, id LIMIT $2 OFFSET $3",
            tenant or "", check_limit(limit), check_limit(offset, "offset"),
        )
        return [status_from_json(row[0], row[1], row[2]) for row in rows]

    async def load_backfill(self, id: uuid.UUID) -> Any:
        row = await self._backfill_row(id, "spec::text, status::text")
        return None if row is None else saved_from_json(row[0], row[1])

    async def load_backfill_status(self, id: uuid.UUID) -> Any:
        row = await self._backfill_row(id, "status::text, asset_name")
        return None if row is None else status_from_json(row[0], id, row[1])

    async def _backfill_row(self, id: uuid.UUID, columns: str) -> Any:
        """``columns`` (fixed text of this module) of the caller's tenant's backfill ``id``, or None."""
        tenant = current_tenant()
        return await self.db.run(
            tenant, _fetchrow, f"SELECT {columns} FROM flowstone_backfills WHERE id = $1 AND tenant_id = $2",
            id, tenant or "",
        )

    async def claim_backfill(self, id: uuid.UUID, owner: str, *, stale_after: float) -> BackfillClaim:
        tenant = current_tenant()
        return await self.db.run(tenant, _claim_backfill, id, tenant or "", owner, stale_after)


# ---------------------------------------------------------------- asyncio side
# These run on the asyncio loop (through the bridge), inside the tenant's transaction.


async def _fetch(connection: Any, sql: str, *args: Any) -> list[Any]:
    return await connection.fetch(sql, *args)


async def _fetchrow(connection: Any, sql: str, *args: Any) -> Any:
    return await connection.fetchrow(sql, *args)


async def _fetchval(connection: Any, sql: str, *args: Any) -> Any:
    return await connection.fetchval(sql, *args)


async def _execute(connection: Any, sql: str, *args: Any) -> None:
    await connection.execute(sql, *args)


async def _claim_role(connection: Any, tenant: str, role: str, owner: str, seconds: float) -> RoleHolder:
    """One holder at a time: the row is locked while it is looked at and changed."""
    await connection.execute(
        "INSERT INTO flowstone_roles (tenant_id, role, owner, fence, expires_at) "
        "VALUES ($1, $2, '', 0, '-infinity') ON CONFLICT DO NOTHING",
        tenant, role,
    )
    held = await connection.fetchrow(
        "SELECT owner, fence, expires_at <= clock_timestamp() FROM flowstone_roles "
        "WHERE role = $1 AND tenant_id = $2 FOR UPDATE",
        role, tenant,
    )
    taken = None
    if held[0] == owner:
        fence = held[1]
    elif held[2]:  # free or expired: taken, under a new fence
        fence, taken = held[1] + 1, held[0] or None
    else:
        row = await connection.fetchrow(
            "SELECT owner, fence, expires_at, heartbeat_at FROM flowstone_roles WHERE role = $1 AND tenant_id = $2",
            role, tenant)
        return RoleHolder(role, row[0], row[1], row[2], heartbeat_at=row[3])
    row = await connection.fetchrow(
        "UPDATE flowstone_roles SET owner = $3, fence = $4, heartbeat_at = clock_timestamp(), "
        "expires_at = clock_timestamp() + make_interval(secs => $5) "
        "WHERE role = $1 AND tenant_id = $2 RETURNING expires_at, heartbeat_at",
        role, tenant, owner, fence, seconds,
    )
    return RoleHolder(role, owner, fence, row[0], taken, heartbeat_at=row[1])


async def _decide(connection: Any, record_id: uuid.UUID, tenant: str, approve: bool, reason: str | None) -> Any:
    row = await connection.fetchrow(f"{_SELECT} WHERE id = $1 AND tenant_id = $2 FOR UPDATE", record_id, tenant)
    if row is None:
        raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant or None)
    record = _record(row)
    decided = await connection.fetchval(
        "SELECT true FROM flowstone_decisions WHERE record_id = $1 AND tenant_id = $2", record_id, tenant)
    check_decidable(record, approve, bool(decided))
    await connection.execute(
        "INSERT INTO flowstone_decisions (tenant_id, record_id, approve, reason) VALUES ($1, $2, $3, $4)",
        tenant, record_id, approve, reason,
    )
    return record


async def _claim_backfill(connection: Any, id: uuid.UUID, tenant: str, owner: str, stale_after: float) -> BackfillClaim:
    row = await connection.fetchrow(
        """SELECT spec::text, status::text, state, owner, heartbeat_at,
                  coalesce(clock_timestamp() - heartbeat_at > make_interval(secs => $3), true)
           FROM flowstone_backfills WHERE id = $1 AND tenant_id = $2 FOR UPDATE""",
        id, tenant, stale_after,
    )
    if row is None:
        raise BackfillNotFound(id, tenant=tenant or None)
    previous, seen = None, None
    if row[2] == "running" and row[3] is not None and row[3] != owner:
        if not row[5]:
            raise BackfillOwned(id, row[3], row[4], tenant=tenant or None)
        previous, seen = row[3], row[4]
    await connection.execute(
        "UPDATE flowstone_backfills SET owner = $3, heartbeat_at = now() WHERE id = $1 AND tenant_id = $2",
        id, tenant, owner,
    )
    return BackfillClaim(saved_from_json(row[0], row[1]), previous, seen)


def _beginning(record: Materialization, owner: str, seconds: float, unless_done: tuple[Any, str] | None) -> _Write:
    """The write of ``begin``: the record's values and what the lease needs, in the
    order of ``_BEGIN_COLUMNS``."""
    _check_storable(record)
    return _Write("begin", record, None, (
        record.id, record.asset_name, record.partition, record.run_id, STATUS_TEXT[record.status], record.started_at,
        record.completed_at, record.duration_ms,
        json.dumps(record.upstream_assets, ensure_ascii=False) if record.upstream_assets else "[]",
        json.dumps({k: list(v) for k, v in record.upstream_partitions.items()}, ensure_ascii=False)
        if record.upstream_partitions else "{}",
        record.dependency_hash, _metadata(record), record.error_message, record.executor_node,
        record.inserted_at, record.updated_at, record.error_traceback,
        owner, seconds,
        unless_done[0] if unless_done and unless_done[0] else None, unless_done[1] if unless_done else None,
    ))


def _granted(op: _Write, owner: str) -> tuple[Materialization, Lease]:
    """What ``begin`` returns once ``op`` (``_beginning``) is written."""
    assert op.fence is not None
    record = op.record
    return record, Lease(record.tenant_id, record.asset_name, record.partition, owner, op.fence)


def _completing(
    record: Materialization, status: Status, lease: Lease | None, fields: Mapping[str, Any], tenant: str | None,
    now: datetime,
) -> _Write:
    """The write of ``complete``, whose ``record`` is the new state (checked first)."""
    new = completed(record, status, fields, tenant, now)
    fence = lease.fence if lease is not None else None
    if fields.keys() <= ENDING:
        return _Write("end", new, record.status, _end_values(new, record.status, fence), lease)
    row = _row(new, record.status)
    if fence is not None:
        row = f'{row[:-1]},"fence":{fence}}}'
    return _Write("complete", new, record.status, row, lease)


async def _write_batch(connection: Any, tenant: str, ops: list[_Write]) -> list[BaseException | None]:
    """At most one statement per kind of write for the whole batch; each op's error (or None)."""
    inserts = [op for op in ops if op.kind == "insert"]
    begins = [op for op in ops if op.kind == "begin"]
    completes = [op for op in ops if op.kind == "complete"]
    ends = [op for op in ops if op.kind == "end"]
    # Records are known by their ids' integers here: hashing an int is C, where a
    # UUID's hash and equality (a Python method each) came to ten calls a record.
    written: set[int] = set()
    refused: dict[int, BaseException] = {}  # final answers
    now = _utcnow()
    if inserts:
        current = [op for op in inserts if op.record.status in CURRENT]
        if current:  # rare: create(status="success") by hand; the runtime uses begin + complete
            ids, assets, partitions, fences = _key_arrays(current)
            await connection.execute(_SUPERSEDE_NEW, tenant, ids, now, assets, partitions, fences)
        rows = await connection.fetch(_INSERT, "[" + ",".join(op.row for op in inserts) + "]")
        written.update(row[0].int for row in rows)
    if begins:
        await _begin(connection, tenant, begins, now, written, refused)
    if completes:
        rows = "[" + ",".join(op.row for op in completes) + "]"
        written.update(await _complete(connection, tenant, now, _COMPLETE_BATCH, [rows]))
    if ends:
        written.update(await _complete(connection, tenant, now, _END_BATCH, _columns(ends)))
    missing = [op.record.id for op in ops if op.record.id.int not in written and op.record.id.int not in refused]
    current_rows: dict[int, tuple[str, datetime]] = {}
    if missing:
        current_rows = {
            row[0].int: (row[1], row[2])
            for row in await connection.fetch(
                f"SELECT id, status, updated_at FROM {TABLE} AS m WHERE id = ANY($2) AND {_OF_TENANT}", tenant, missing
            )
        }
    outcome: list[BaseException | None] = []
    for op in ops:
        record = op.record
        rid = record.id.int
        if rid in written:
            outcome.append(None)
            continue
        found = current_rows.get(rid)
        if rid in refused:
            outcome.append(refused[rid])
        elif op.kind in ("insert", "begin"):
            # Ours already (a retried batch whose first COMMIT landed), or someone else's id.
            outcome.append(
                None if found is not None and found[1] == record.inserted_at
                else id_in_use(record)
            )
        elif found is not None and found == (record.status.value, record.updated_at):
            outcome.append(None)  # a retried batch whose first COMMIT landed (and released the lease)
        elif op.lease is not None and found is not None:
            outcome.append(lost(op.lease))  # its fence was gone: taken over (its record closed by the taker)
        elif found is None:
            outcome.append(NotFound(f"no materialization with id {str(record.id)!r}", tenant=record.tenant_id))
        else:
            try:
                check_transition(Status(found[0]), record.status, record)
                outcome.append(_lost_race(record, op.expected))
            except FlowstoneError as error:
                outcome.append(error)
    return outcome


_SEEN, _REUSE_HASH = (next(i for i, (name, _) in enumerate(_BEGIN_COLUMNS) if name == wanted)
                       for wanted in ("seen", "reuse_hash"))


def _wanted(row: tuple[Any, ...], done_hash: str | None, done_id: uuid.UUID) -> bool:
    """Whether a begin op (its values) takes the success ``done_id`` with ``done_hash``."""
    reuse_hash, seen = row[_REUSE_HASH], row[_SEEN]
    return reuse_hash is not None and reuse_hash == done_hash and (seen is None or str(seen) != str(done_id))


def _key_arrays(ops: list[_Write]) -> tuple[list[Any], ...]:
    """The records' ids, assets, partitions and fences, for ``_KEYS``."""
    return (
        [op.record.id for op in ops], [op.record.asset_name for op in ops], [op.record.partition for op in ops],
        [op.lease.fence if op.lease is not None else None for op in ops],
    )


def _columns(ops: list[_Write]) -> list[list[Any]]:
    """The values of ``ops`` (tuples in one order), column by column, for ``_unnest``:
    a column whose rows all hold one value, but the first, as that value alone. In a
    backfill's batch most columns are such (the asset, the status, the times of a
    batch, the owner): each is encoded once instead of once a row, and the server
    reads one element instead of a row's worth."""
    columns = [list(column) for column in zip(*(op.row for op in ops), strict=True)]
    for at in range(1, len(columns)):
        column = columns[at]
        first = column[0]
        if column[-1] == first and column.count(first) == len(column):
            columns[at] = [first]
    return columns


async def _begin(
    connection: Any, tenant: str, ops: list[_Write], now: datetime,
    written: set[int], refused: dict[int, BaseException],
) -> None:
    """Grant what is free, insert those records; say who holds the rest."""
    # Rows are locked in key order, as everywhere (see _LOCK_LEASES).
    ordered = sorted(
        ops, key=lambda op: (op.record.asset_name, op.record.partition is not None, op.record.partition or ""))
    rows = await connection.fetch(_BEGIN, tenant, *_columns(ordered))
    granted = {row[0].int: row[1] for row in rows if row[1] is not None and row[5]}
    clashed = {row[0].int: row[1] for row in rows if row[1] is not None and not row[5]}
    if clashed:  # rare: ids in use, ours (a retried batch) or another record's
        await _sort_clashes(connection, tenant, ops, clashed, granted, refused)
    finished = {row[0].int: row[4] for row in rows if row[4] is not None}
    if finished:  # rare: another process finished these since their callers looked
        current = {
            row[0]: _record(row)
            for row in await connection.fetch(
                f"{_SELECT} AS m WHERE id = ANY($2::uuid[]) AND {_OF_TENANT}", tenant, list(finished.values())
            )
        }
        for op in ops:
            if (rid := op.record.id.int) in finished:
                refused[rid] = FinishedElsewhere(current[finished[rid]])
    orphans = [(row[2], row[3]) for row in rows if row[2] is not None]
    if orphans:  # their holders stopped renewing: close what they left open
        await connection.execute(_CLOSE_TAKEN_OVER, tenant, [o[0] for o in orphans], now, [o[1] for o in orphans])
    held = [op for op in ops if (rid := op.record.id.int) not in granted and rid not in finished and rid not in refused]
    holders: dict[tuple[str, str | None], Any] = {}
    if held:
        rows = await connection.fetch(
            _HOLDERS, tenant, [op.record.asset_name for op in held],
            [op.record.partition is not None for op in held], [op.record.partition or "" for op in held],
        )
        holders = {(row[0], row[2] if row[1] else None): row for row in rows}
        # A holder that finished while this statement waited for it: its release
        # names the success, which these callers take (they asked unless_done).
        done_ids = {
            op.record.id.int: holders[key][7] for op in held
            if (key := (op.record.asset_name, op.record.partition)) in holders
            and holders[key][3] == "" and holders[key][7] is not None
            and _wanted(op.row, holders[key][8], holders[key][7])
        }
        if done_ids:
            current = {
                row[0]: _record(row)
                for row in await connection.fetch(
                    f"{_SELECT} AS m WHERE id = ANY($2::uuid[]) AND {_OF_TENANT}", tenant, list(done_ids.values())
                )
            }
            for op in held:
                if (rid := op.record.id.int) in done_ids and done_ids[rid] in current:
                    finished[rid] = done_ids[rid]
                    refused[rid] = FinishedElsewhere(current[done_ids[rid]])
    for op in ops:
        record = op.record
        rid = record.id.int
        if rid in finished or rid in refused:
            continue
        fence = granted.get(rid)
        holder = holders.get((record.asset_name, record.partition))
        if fence is None and holder is not None and holder[6] == record.id:
            fence = holder[4]  # ours: a retried batch whose first COMMIT landed
        if fence is not None:
            op.fence = fence
            written.add(rid)
            continue
        refused[rid] = LeaseHeld(
            record.asset_name, record.partition, tenant=record.tenant_id,
            owner=holder[3] if holder else None, fence=holder[4] if holder else None,
            expires_at=holder[5] if holder else None,
        )


async def _sort_clashes(
    connection: Any, tenant: str, ops: list[_Write], clashed: dict[int, int], granted: dict[int, int],
    refused: dict[int, BaseException],
) -> None:
    """Begins whose lease was granted but whose record was not inserted, its id in use:
    ours when the stored record is this one (a retried batch whose first COMMIT landed),
    then granted; else refused, their leases given back in the same write."""
    asked = [op.record for op in ops if op.record.id.int in clashed]
    stored = {
        row[0].int: row[1]
        for row in await connection.fetch(
            f"SELECT id, inserted_at FROM {TABLE} AS m WHERE id = ANY($2) AND {_OF_TENANT}",
            tenant, [record.id for record in asked])
    }
    given_back = []
    for record in asked:
        rid = record.id.int
        if stored.get(rid, _NOTHING) == record.inserted_at:
            granted[rid] = clashed[rid]
            continue
        given_back.append(clashed[rid])
        refused[rid] = id_in_use(record)
    if given_back:
        await connection.execute(_RELEASE_REFUSED, tenant, given_back)


_NOTHING: Any = object()


async def _complete(connection: Any, tenant: str, now: datetime, statement: str, own: list[Any]) -> set[int]:
    """Write a batch of completions with ``statement`` (``_COMPLETE_BATCH`` or
    ``_END_BATCH``), ``own`` being the parameters of its rows (the JSON rows, or the
    columns, each row's fence among them); the ids written, as integers."""
    rows = await connection.fetch(statement, tenant, now, *own)
    return {row[0].int for row in rows}


def _lost_race(record: Materialization, expected: Status | None) -> BaseException:
    return InvalidTransition(
        expected or record.status, record.status, asset=record.asset_name, partition=record.partition,
        tenant=record.tenant_id, detail="the record changed since it was read (another writer moved it first)",
    )


_UPDATABLE_SQL = {
    "started_at": "started_at", "completed_at": "completed_at", "duration_ms": "duration_ms",
    "upstream_assets": "upstream_assets", "upstream_partitions": "upstream_partitions",
    "dependency_hash": "dependency_hash", "metadata": "metadata", "error_message": "error_message",
    "error_traceback": "error_traceback",
    "executor_node": "executor_node",
}
"""Column of each updatable field: names reach SQL from this fixed table only."""


async def _update_status(
    connection: Any, record_id: uuid.UUID, target: Status, changes: dict[str, Any], now: datetime, tenant: str
) -> Any:
    allowed_from = [s.value for s, nexts in TRANSITIONS.items() if target in nexts]
    sets = ["status = $4", "updated_at = $5"]
    args: list[Any] = [record_id, tenant, allowed_from, target.value, now]
    for name, value in changes.items():
        if name in ("metadata", "upstream_partitions"):  # as text: a caller's pool may have no jsonb codec
            args.append(json.dumps(value, ensure_ascii=False))
            sets.append(f"{_UPDATABLE_SQL[name]} = ${len(args)}::text::jsonb")
            continue
        args.append(list(value) if name == "upstream_assets" else value)
        sets.append(f"{_UPDATABLE_SQL[name]} = ${len(args)}")
    if target is Status.SUCCESS:  # one current success: the previous one is superseded first
        await connection.execute(_SUPERSEDE_FOR, tenant, record_id, allowed_from, now)
    row = await connection.fetchrow(
        f"UPDATE {TABLE} SET {', '.join(sets)} WHERE id = $1 AND tenant_id = $2 AND status = ANY($3::text[]) "
        f"RETURNING {_COLUMNS}",
        *args,
    )
    if row is not None:
        return row
    current = await connection.fetchrow(f"{_SELECT} WHERE id = $1 AND tenant_id = $2", record_id, tenant)
    if current is None:
        raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant or None)
    check_transition(Status(current["status"]), target, _record(current))
    raise AssertionError("unreachable: the transition is allowed but the update matched nothing")


# ----------------------------------------------------------------- mapping


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _check_storable(record: Materialization) -> None:
    """Refuse, before anything is sent, a record whose text PostgreSQL cannot store."""
    problem = unstorable_text(record)
    if problem is not None:
        raise SerializationError(
            f"a record field holds {problem}, which PostgreSQL text cannot store",
            asset=record.asset_name, partition=record.partition,
        )


def _row(record: Materialization, expected: Status | None) -> str:
    """The record as one JSON object for ``jsonb_to_recordset``."""
    _check_storable(record)
    return _with_metadata(record, {
        "id": str(record.id),
        "tenant_id": record.tenant_id or "",
        "asset_name": record.asset_name,
        "partition": record.partition,
        "run_id": str(record.run_id),
        "status": record.status.value,
        "expected": expected.value if expected is not None else None,
        "started_at": _iso(record.started_at),
        "completed_at": _iso(record.completed_at),
        "duration_ms": record.duration_ms,
        "upstream_assets": list(record.upstream_assets),
        "upstream_partitions": {k: list(v) for k, v in record.upstream_partitions.items()},
        "dependency_hash": record.dependency_hash,
        "error_message": record.error_message,
        "executor_node": record.executor_node,
        "inserted_at": _iso(record.inserted_at),
        "updated_at": _iso(record.updated_at),
        "error_traceback": record.error_traceback,
    })


def _end_values(record: Materialization, expected: Status, fence: int | None) -> tuple[Any, ...]:
    """A job's end for ``_END_BATCH``: the columns it changes, in the order of
    ``_END_COLUMNS``. Its texts are storable already (``completed`` replaced what
    PostgreSQL cannot hold in an error; ``to_json`` refuses it in metadata)."""
    return (
        record.id, STATUS_TEXT[record.status], STATUS_TEXT[expected], record.completed_at, record.duration_ms,
        _metadata(record), record.error_message, record.updated_at, record.error_traceback, fence,
    )


def _metadata(record: Materialization) -> str:
    """The record's metadata as JSON text, through the strict check, which refuses
    what JSONB cannot hold."""
    return mapping_to_json(record.metadata, asset=record.asset_name, partition=record.partition, what="metadata")


def _with_metadata(record: Materialization, fields: dict[str, Any]) -> str:
    """``fields`` and the record's metadata as one JSON object."""
    head = json.dumps(fields, ensure_ascii=False)
    return f'{head[:-1]},"metadata":{_metadata(record)}}}'


def _json(value: Any) -> Any:
    """A jsonb column's value: decoded by our pools' codec, or text from a caller's pool."""
    return json.loads(value) if isinstance(value, str) else value


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _record(row: Any) -> Materialization:
    """The record of a row (``_COLUMNS``), built positionally (``build``, the fields in
    their order): a backfill reads one back for each partition it begins."""
    return build((
        row[0], row[2], row[3], row[4], STATUS_OF.get(row[5]) or Status(row[5]), row[6], row[7], row[8],
        tuple(row[9]), {name: tuple(keys) for name, keys in _json(row[10]).items()}, row[11], _json(row[12]),
        row[13], row[14], row[1] or None, row[15], row[16], row[17],
    ))


_SNAPSHOT = re.compile(r"(\d{1,20}):(\d{1,20}):((?:\d{1,20})(?:,\d{1,20})*)?")


def _read_mark(mark: Any) -> str:
    """A PostgreSQL mark's snapshot (``successes_after``): ``xmin:xmax:xip,...``."""
    body = read_mark(mark, "pg")
    if _SNAPSHOT.fullmatch(body) is None:
        raise bad_mark(mark)
    return body
