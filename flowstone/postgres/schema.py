"""FlowStone's PostgreSQL schema, as numbered migrations (ADR 0006).

``migrate(connection)`` takes a transaction-scoped advisory lock, reads the
applied versions from ``flowstone_schema_migrations`` and applies the missing
ones in order, each in the same transaction. Several processes may call it at
once: the lock makes them take turns, and the second finds nothing to do.

Every table that holds tenant data has ``tenant_id text NOT NULL DEFAULT ''``
('' is "no tenant": tenant ids are never empty), row-level security enabled and
forced, and one policy comparing ``tenant_id`` with the transaction's
``flowstone.tenant_id`` setting. With no setting, only rows without a tenant are
visible, never a tenant's.
"""

from __future__ import annotations

from typing import Any

from ..errors import DatabaseError

__all__ = ["LOCK_KEY", "MIGRATIONS", "migrate", "tenant_policy"]

LOCK_KEY = 0x466C6F7753746F6E  # "FlowSton": the advisory lock migrations hold
OLDEST_SERVER = 130000
"""``server_version_num`` of the oldest PostgreSQL the schema runs on (13: ``xid8``)."""
STATUSES = ("pending", "running", "success", "failed", "stale", "waiting_approval", "cancelled")
"""The statuses of migration 1; migration 3 adds ``superseded``."""
TENANT_SETTING = "coalesce(current_setting('flowstone.tenant_id', true), '')"
RECORDS_POLICY = f"(tenant_id = {TENANT_SETTING}) IS TRUE"
"""The records' policy since migration 14 (the leases' since 15): the same rows, and
no index condition."""
TENANT_TEST = f"(tenant_id = (SELECT {TENANT_SETTING})) IS TRUE"
"""``RECORDS_POLICY`` with the setting read once a statement (an init plan), not once
for each row the statement reads or writes (since migration 22)."""
RARE_STATUSES = ("pending", "failed", "stale", "waiting_approval", "cancelled")
"""The statuses ``flowstone_rare_records`` names (migration 26; as it was shipped, so
never changed): a record's other statuses (running, success, superseded) are most
of the table, or pass with each job."""
_RARE = "(" + ", ".join(f"'{status}'" for status in RARE_STATUSES) + ")"
MATERIALIZATION_TABLES = (
    "flowstone_materializations", "flowstone_leases", "flowstone_partition_states", "flowstone_reads")
"""The tables every materialization writes: their policy is ``TENANT_TEST``."""


def tenant_policy(table: str) -> str:
    """Row-level security for one (already quoted) table: enabled, forced, one policy."""
    return f"""
        ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
        CREATE POLICY flowstone_tenant_isolation ON {table}
            USING (tenant_id = {TENANT_SETTING})
            WITH CHECK (tenant_id = {TENANT_SETTING});
    """


_V1 = f"""
CREATE TABLE flowstone_materializations (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL DEFAULT '',
    asset_name text NOT NULL,
    partition text,
    run_id uuid NOT NULL,
    status text NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    started_at timestamptz,
    completed_at timestamptz,
    duration_ms double precision,
    upstream_assets text[] NOT NULL DEFAULT '{{}}',
    upstream_partitions jsonb NOT NULL DEFAULT '{{}}',
    dependency_hash text,
    metadata jsonb NOT NULL DEFAULT '{{}}',
    error_message text,
    executor_node text,
    inserted_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
-- Every query is filtered by tenant (the policy), so indexes lead with it.
CREATE INDEX flowstone_materializations_asset_partition
    ON flowstone_materializations (tenant_id, asset_name, partition, seq DESC);
CREATE INDEX flowstone_materializations_run ON flowstone_materializations (run_id);
CREATE INDEX flowstone_materializations_status ON flowstone_materializations (tenant_id, status, seq DESC);
CREATE INDEX flowstone_materializations_inserted ON flowstone_materializations (inserted_at);
CREATE INDEX flowstone_materializations_tenant_seq ON flowstone_materializations (tenant_id, seq DESC);
CREATE INDEX flowstone_materializations_upstream ON flowstone_materializations USING gin (upstream_assets);
{tenant_policy("flowstone_materializations")}

CREATE TABLE flowstone_backfills (
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL DEFAULT '',
    asset_name text NOT NULL,
    state text NOT NULL,
    spec jsonb NOT NULL,
    status jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX flowstone_backfills_tenant ON flowstone_backfills (tenant_id, updated_at DESC);
{tenant_policy("flowstone_backfills")}
"""

def values_table(table: str) -> str:
    """PostgresIO's table of asset values (``table`` already quoted), with its policy.

    ``partitioned`` tells an unpartitioned value (false, partition '') from the
    value of the partition whose key is the empty string (true, '')."""
    return f"""
        CREATE TABLE {table} (
            tenant_id text NOT NULL DEFAULT '',
            asset_name text NOT NULL,
            partitioned boolean NOT NULL,
            partition text NOT NULL,
            value jsonb NOT NULL,
            size_bytes bigint NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, asset_name, partitioned, partition)
        );
        {tenant_policy(table)}
    """


_V3 = f"""
-- Migrations may run as the tables' owner, to whom FORCE applies: see every tenant.
ALTER TABLE flowstone_materializations NO FORCE ROW LEVEL SECURITY;
ALTER TABLE flowstone_materializations DROP CONSTRAINT flowstone_materializations_status_check;
ALTER TABLE flowstone_materializations ADD CONSTRAINT flowstone_materializations_status_check
    CHECK (status IN ({", ".join(f"'{s}'" for s in (*STATUSES, "superseded"))}));
-- One current record (success or stale) per partition: older ones are superseded.
UPDATE flowstone_materializations AS m SET status = 'superseded', updated_at = now()
WHERE m.status IN ('success', 'stale') AND EXISTS (
    SELECT 1 FROM flowstone_materializations n
    WHERE n.tenant_id = m.tenant_id AND n.asset_name = m.asset_name
      AND n.partition IS NOT DISTINCT FROM m.partition AND n.status IN ('success', 'stale') AND n.seq > m.seq
);
-- Checked at commit (deferred), so one statement may supersede the current record
-- and complete its successor in any order.
ALTER TABLE flowstone_materializations ADD CONSTRAINT flowstone_materializations_current
    EXCLUDE USING btree (tenant_id WITH =, asset_name WITH =, partition WITH =)
    WHERE (status IN ('success', 'stale') AND partition IS NOT NULL) DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE flowstone_materializations ADD CONSTRAINT flowstone_materializations_current_unpartitioned
    EXCLUDE USING btree (tenant_id WITH =, asset_name WITH =)
    WHERE (status IN ('success', 'stale') AND partition IS NULL) DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE flowstone_materializations FORCE ROW LEVEL SECURITY;

-- Who computes a partition now (ADR 0009): owner, expiry, fencing number.
CREATE SEQUENCE flowstone_lease_fences;
-- Only numbers: any role that may write leases may draw them (no extra grant to forget).
GRANT USAGE ON SEQUENCE flowstone_lease_fences TO PUBLIC;
CREATE TABLE flowstone_leases (
    tenant_id text NOT NULL DEFAULT '',
    asset_name text NOT NULL,
    partitioned boolean NOT NULL,
    partition text NOT NULL,
    owner text NOT NULL,
    fence bigint NOT NULL,
    record_id uuid,
    expires_at timestamptz NOT NULL,
    -- A released lease stays as a row (owner '', expired): the success it ended
    -- with tells a process that waited on it that the work is done.
    done_id uuid,
    done_hash text,
    -- The tenant comes last in every index: rows come and go with each
    -- materialization, and an index scan that narrowed only to a tenant (the
    -- policy's condition) would walk through every dead row not vacuumed yet.
    PRIMARY KEY (asset_name, partition, partitioned, tenant_id)
);
CREATE UNIQUE INDEX flowstone_leases_fence ON flowstone_leases (fence);
{tenant_policy("flowstone_leases")}

-- Backfills have an owner with a heartbeat.
ALTER TABLE flowstone_backfills ADD COLUMN owner text, ADD COLUMN heartbeat_at timestamptz;
"""

_INSERTED_READS = """                INSERT INTO flowstone_reads (tenant_id, asset_name, partitioned, partition, reader)
                    SELECT n.tenant_id, r.key, k.value <> 'null'::jsonb, coalesce(k.value #>> '{}', ''), n.id
                    FROM written n, jsonb_each(n.upstream_partitions) r, jsonb_array_elements(r.value) k
                    WHERE n.status = 'success';
                RETURN NULL;
            END IF;
"""
"""The reads of inserted successes, noted by the trigger on records (from migration 16)."""

_NEW_RECORDS = """            -- Rows of states are found through the upsert's arbiter index (or a lookup
            -- by their whole key), whatever the planner believes of the table's size.
            IF TG_OP = 'INSERT' THEN  -- a new record is its partition's newest
                INSERT INTO flowstone_partition_states AS s
                    SELECT DISTINCT ON (tenant_id, asset_name, partition) tenant_id, asset_name, partition, seq, status
                    FROM written WHERE partition IS NOT NULL ORDER BY tenant_id, asset_name, partition, seq DESC
                ON CONFLICT (tenant_id, asset_name, partition) WHERE partition IS NOT NULL DO UPDATE
                SET seq = excluded.seq, status = excluded.status WHERE s.seq < excluded.seq;
                INSERT INTO flowstone_partition_states AS s
                    SELECT DISTINCT ON (tenant_id, asset_name) tenant_id, asset_name, NULL, seq, status
                    FROM written WHERE partition IS NULL ORDER BY tenant_id, asset_name, seq DESC
                ON CONFLICT (tenant_id, asset_name) WHERE partition IS NULL DO UPDATE
                SET seq = excluded.seq, status = excluded.status WHERE s.seq < excluded.seq;
""" + _INSERTED_READS
"""What the trigger on records does for records inserted (migrations 16 and 19): each
partition's state names its newest record, and a success's reads are noted."""

_MOVED_READS = """            -- Only a success has reads: one that is no longer a success loses them, one
            -- that has none yet gains them. They are found reader by reader (OFFSET 0 keeps
            -- each lookup its own: joined, a table whose statistics lag was hashed whole).
            DELETE FROM flowstone_reads WHERE ctid = ANY(ARRAY(
                SELECT e.ctid FROM written w
                CROSS JOIN LATERAL (SELECT r.ctid FROM flowstone_reads r WHERE r.reader = w.id OFFSET 0) AS e
                WHERE w.status <> 'success'));
            INSERT INTO flowstone_reads (tenant_id, asset_name, partitioned, partition, reader)
                SELECT n.tenant_id, r.key, k.value <> 'null'::jsonb, coalesce(k.value #>> '{}', ''), n.id
                FROM written n, jsonb_each(n.upstream_partitions) r, jsonb_array_elements(r.value) k
"""
"""The start of what the trigger on records does with the reads of moved records
(migrations 16 and 19): those of a record that is no longer a success go, those of
a success that has none are added (the rows of reads of ``n``, which each caller
filters on)."""

_KEYED = {"is_keyed": "IS NOT NULL", "same": "= w.partition",
          "arbiter": "(tenant_id, asset_name, partition) WHERE partition IS NOT NULL"}
_WHOLE = {"is_keyed": "IS NULL", "same": "IS NULL", "arbiter": "(tenant_id, asset_name) WHERE partition IS NULL"}


def _states_of_inserted(current: bool) -> str:
    """The partition states of inserted records (migrations 24 and 25), keyed and
    whole: the newest names its partition's state; a success notes its transaction;
    from 25 (``current``), an inserted success or stale record is the partition's
    current one."""
    column, value, keep = (
        (", current_id", ",\n                           CASE WHEN status IN ('success', 'stale') THEN id END",
         ",\n                    current_id = coalesce(excluded.current_id, s.current_id)")
        if current else ("", "", ""))
    template = f"""                INSERT INTO flowstone_partition_states AS s
                        (tenant_id, asset_name, partition, seq, status, success_xid{column})
                    SELECT DISTINCT ON (tenant_id, asset_name, partition) tenant_id, asset_name, partition, seq,
                           status, CASE WHEN status = 'success' THEN pg_current_xact_id() END{value}
                    FROM written WHERE partition {{is_keyed}} ORDER BY tenant_id, asset_name, partition, seq DESC
                ON CONFLICT {{arbiter}} DO UPDATE
                SET seq = excluded.seq, status = excluded.status,
                    success_xid = coalesce(excluded.success_xid, s.success_xid){keep}
                WHERE s.seq < excluded.seq;
"""
    return template.format(**_KEYED) + template.format(**_WHOLE)


def _states_of_moved(current: bool) -> str:
    """The partition states of moved records (migrations 24 and 25), keyed and whole:
    the newest record's move is its partition's state, and any record that became a
    success notes its transaction (an older record made a success by hand too); from
    25 (``current``), it is the partition's current record (the one it superseded, in
    the same statement, was)."""
    column, selected = (
        (",\n                current_id = CASE WHEN x.status = 'success' THEN x.id ELSE s.current_id END", "w.id, ")
        if current else ("", ""))
    template = f"""            UPDATE flowstone_partition_states AS s
            SET status = CASE WHEN s.seq = x.seq THEN x.status ELSE s.status END,
                success_xid = CASE WHEN x.status = 'success' THEN pg_current_xact_id() ELSE s.success_xid END{column}
            FROM (
                SELECT {selected}w.status, w.seq, (
                    SELECT y.ctid FROM flowstone_partition_states y
                    WHERE y.tenant_id = w.tenant_id AND y.asset_name = w.asset_name AND y.partition {{same}}
                      AND (y.seq = w.seq OR w.status = 'success')
                ) AS target
                FROM written w WHERE w.partition {{is_keyed}} OFFSET 0
            ) AS x
            WHERE s.ctid = x.target;
"""
    return template.format(**_KEYED) + template.format(**_WHOLE)


def _records_written(current: bool) -> str:
    """The function of the statement triggers on records (migrations 24 and 25)."""
    moved = _states_of_moved(current) + _MOVED_READS
    return f"""        CREATE OR REPLACE FUNCTION flowstone_records_written() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- Rows of states are found through the upsert's arbiter index (or a lookup
            -- by their whole key), whatever the planner believes of the table's size.
            IF TG_OP = 'INSERT' THEN  -- a new record is its partition's newest
{_states_of_inserted(current)}
{_INSERTED_READS}            -- A moved record changes its partition's state if it is the newest record
            -- there (or became a success). The others' states are not even locked:
            -- superseding an old record must not wait on whoever completes the newest.
{moved}                WHERE n.status = 'success' AND n.upstream_partitions <> '{{}}'::jsonb
                  AND (SELECT e.reader FROM flowstone_reads e WHERE e.reader = n.id LIMIT 1) IS NULL;
            RETURN NULL;
        END $$;"""


def _states_filled(column: str, value: str, test: str) -> str:
    """Two statements filling ``column`` of every partition state with ``value`` from
    its partition's record that passes ``test`` (keyed partitions, then the
    unpartitioned record: as equalities, which a hash join can take)."""
    return "\n".join(f"""        UPDATE flowstone_partition_states AS s SET {column} = {value}
        FROM flowstone_materializations AS m
        WHERE m.tenant_id = s.tenant_id AND m.asset_name = s.asset_name AND {same}
          AND {test};""" for same in ("m.partition = s.partition", "m.partition IS NULL AND s.partition IS NULL"))

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "materializations and backfills, with row-level security", _V1),
    (2, "flowstone_values: PostgresIO's default table, with row-level security", values_table("flowstone_values")),
    (3, "superseded records, one current success per partition, leases, backfill owners", _V3),
    (4, "error_traceback on materializations",
     "ALTER TABLE flowstone_materializations ADD COLUMN error_traceback text;"),
    (5, "a cancel asked of a backfill's owner from another process",
     "ALTER TABLE flowstone_backfills ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;"),
    (6, "approval decisions made in another process than the waiting one", f"""
        CREATE TABLE flowstone_decisions (
            tenant_id text NOT NULL DEFAULT '',
            record_id uuid NOT NULL,
            approve boolean NOT NULL,
            reason text,
            decided_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (record_id, tenant_id)
        );
        {tenant_policy("flowstone_decisions")}
    """),
    (7, "schedule ticks, each recorded once", f"""
        CREATE TABLE flowstone_ticks (
            tenant_id text NOT NULL DEFAULT '',
            schedule text NOT NULL,
            at timestamptz NOT NULL,
            owner text NOT NULL,
            state text NOT NULL DEFAULT 'running',
            run_id uuid,
            error text,
            claimed_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            PRIMARY KEY (schedule, at, tenant_id)
        );
        {tenant_policy("flowstone_ticks")}
    """),
    (8, "roles held by one process at a time (the active daemon)", f"""
        CREATE TABLE flowstone_roles (
            tenant_id text NOT NULL DEFAULT '',
            role text NOT NULL,
            owner text NOT NULL,
            fence bigint NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (role, tenant_id)
        );
        {tenant_policy("flowstone_roles")}
    """),
    (9, "the active daemon's heartbeat; the ticks a daemon left unfinished, found at once", """
        ALTER TABLE flowstone_roles ADD COLUMN heartbeat_at timestamptz;
        CREATE INDEX flowstone_ticks_unfinished ON flowstone_ticks (tenant_id, at) WHERE state = 'running';
    """),
    (10, "cursors that sensors and automation keep between evaluations", f"""
        CREATE TABLE flowstone_cursors (
            tenant_id text NOT NULL DEFAULT '',
            name text NOT NULL,
            value text,
            error text,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (name, tenant_id)
        );
        {tenant_policy("flowstone_cursors")}
    """),
    (11, "an asset's records newest first, a page at a time", """
        CREATE INDEX flowstone_materializations_asset_seq ON flowstone_materializations
            (tenant_id, asset_name, seq DESC);
    """),
    (12, "each partition's latest record's status, kept by triggers (status, the web view)", f"""
        CREATE TABLE flowstone_partition_states (
            tenant_id text NOT NULL DEFAULT '',
            asset_name text NOT NULL,
            partition text,
            seq bigint NOT NULL,
            status text NOT NULL
        );
        CREATE UNIQUE INDEX flowstone_partition_states_key ON flowstone_partition_states
            (tenant_id, asset_name, partition) WHERE partition IS NOT NULL;
        CREATE UNIQUE INDEX flowstone_partition_states_whole ON flowstone_partition_states
            (tenant_id, asset_name) WHERE partition IS NULL;
        -- Filled from every tenant's records (FORCE would hide them from the owner).
        ALTER TABLE flowstone_materializations NO FORCE ROW LEVEL SECURITY;
        INSERT INTO flowstone_partition_states
            SELECT DISTINCT ON (tenant_id, asset_name, partition) tenant_id, asset_name, partition, seq, status
            FROM flowstone_materializations ORDER BY tenant_id, asset_name, partition, seq DESC;
        ALTER TABLE flowstone_materializations FORCE ROW LEVEL SECURITY;
        {tenant_policy("flowstone_partition_states")}
        CREATE FUNCTION flowstone_keep_partition_state() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' THEN  -- only the latest record's move changes its partition's state
                IF NEW.partition IS NULL THEN
                    UPDATE flowstone_partition_states SET status = NEW.status
                    WHERE tenant_id = NEW.tenant_id AND asset_name = NEW.asset_name AND partition IS NULL
                      AND seq = NEW.seq;
                ELSE
                    UPDATE flowstone_partition_states SET status = NEW.status
                    WHERE tenant_id = NEW.tenant_id AND asset_name = NEW.asset_name
                      AND partition = NEW.partition AND seq = NEW.seq;
                END IF;
            ELSIF NEW.partition IS NULL THEN
                INSERT INTO flowstone_partition_states VALUES (NEW.tenant_id, NEW.asset_name, NULL, NEW.seq, NEW.status)
                ON CONFLICT (tenant_id, asset_name) WHERE partition IS NULL DO UPDATE
                SET seq = excluded.seq, status = excluded.status WHERE flowstone_partition_states.seq < excluded.seq;
            ELSE
                INSERT INTO flowstone_partition_states
                    VALUES (NEW.tenant_id, NEW.asset_name, NEW.partition, NEW.seq, NEW.status)
                ON CONFLICT (tenant_id, asset_name, partition) WHERE partition IS NOT NULL DO UPDATE
                SET seq = excluded.seq, status = excluded.status WHERE flowstone_partition_states.seq < excluded.seq;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER flowstone_partition_states_insert AFTER INSERT ON flowstone_materializations
            FOR EACH ROW EXECUTE FUNCTION flowstone_keep_partition_state();
        CREATE TRIGGER flowstone_partition_states_update AFTER UPDATE OF status ON flowstone_materializations
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION flowstone_keep_partition_state();
    """),
    (13, "what each success read, kept by triggers, so a stale cascade costs the same at any table size", f"""
        -- One row per (upstream partition, success that read it). A stale cascade
        -- looks its readers up by equality, which row-level security lets an index
        -- answer (a containment test on the records' JSON it does not: not leakproof).
        CREATE TABLE flowstone_reads (
            tenant_id text NOT NULL DEFAULT '',
            asset_name text NOT NULL,
            partitioned boolean NOT NULL,
            partition text NOT NULL,
            reader uuid NOT NULL
        );
        CREATE INDEX flowstone_reads_read ON flowstone_reads (asset_name, partition, partitioned, tenant_id);
        CREATE INDEX flowstone_reads_reader ON flowstone_reads (reader);
        {tenant_policy("flowstone_reads")}
        CREATE FUNCTION flowstone_keep_reads() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND OLD.status = 'success' THEN
                DELETE FROM flowstone_reads WHERE reader = OLD.id;
            END IF;
            IF NEW.status = 'success' THEN
                INSERT INTO flowstone_reads (tenant_id, asset_name, partitioned, partition, reader)
                SELECT NEW.tenant_id, r.key, k.value <> 'null'::jsonb, coalesce(k.value #>> '{{}}', ''), NEW.id
                FROM jsonb_each(NEW.upstream_partitions) r, jsonb_array_elements(r.value) k;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER flowstone_reads_insert AFTER INSERT ON flowstone_materializations
            FOR EACH ROW WHEN (NEW.status = 'success') EXECUTE FUNCTION flowstone_keep_reads();
        CREATE TRIGGER flowstone_reads_update AFTER UPDATE OF status ON flowstone_materializations
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status AND 'success' IN (OLD.status, NEW.status))
            EXECUTE FUNCTION flowstone_keep_reads();
        -- Filled from every tenant's successes (FORCE would hide them from the owner).
        ALTER TABLE flowstone_materializations NO FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_reads NO FORCE ROW LEVEL SECURITY;
        INSERT INTO flowstone_reads (tenant_id, asset_name, partitioned, partition, reader)
            SELECT m.tenant_id, r.key, k.value <> 'null'::jsonb, coalesce(k.value #>> '{{}}', ''), m.id
            FROM flowstone_materializations m, jsonb_each(m.upstream_partitions) r, jsonb_array_elements(r.value) k
            WHERE m.status = 'success';
        ALTER TABLE flowstone_reads FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_materializations FORCE ROW LEVEL SECURITY;
    """),
    (14, "row-level security on records filters rows found by key; it is no way into an index", f"""
        -- As an equality, the policy was an index condition the planner could pick:
        -- on a growing table whose statistics lag (a first backfill), it read every
        -- record of the tenant through an index leading with tenant_id to complete
        -- a batch of five, 14,852 index entries per statement at 10,000 partitions.
        -- "IS TRUE" keeps the rows it keeps and matches no index: records are found
        -- through the statement's own conditions (a key, or the tenant it names).
        ALTER POLICY flowstone_tenant_isolation ON flowstone_materializations
            USING ({RECORDS_POLICY}) WITH CHECK ({RECORDS_POLICY});
    """),
    (15, "row-level security on leases filters rows found by fence or key; it is no way into an index", f"""
        -- Leases are locked by fence at a batch's completion; with the policy an
        -- equality, the plan made once for that statement read every lease of the
        -- tenant through the primary key (tenant_id first) to lock a few: 14,860
        -- index entries per statement at 10,000 partitions, 11 of its 18 ms.
        ALTER POLICY flowstone_tenant_isolation ON flowstone_leases
            USING ({RECORDS_POLICY}) WITH CHECK ({RECORDS_POLICY});
    """),
    (16, "fewer index entries and one trigger call per statement for each record written", f"""
        -- Nothing has read these since the reads table (13) and retention by rank (ADR 0024).
        -- (IF EXISTS here and below: a database may come to this version again after an
        -- earlier migration was taken back and redone.)
        DROP INDEX IF EXISTS flowstone_materializations_upstream;
        DROP INDEX IF EXISTS flowstone_materializations_inserted;
        -- A success or a superseded record is most of the table and is listed newest
        -- first through the tenant's index; the other statuses keep an index of their own,
        -- which a record then leaves when it succeeds (one index entry fewer per record).
        DROP INDEX IF EXISTS flowstone_materializations_status;
        CREATE INDEX flowstone_materializations_status ON flowstone_materializations (tenant_id, status, seq DESC)
            WHERE status NOT IN ('success', 'superseded');
        -- Triggers per statement, not per row: one upsert of states and one insert of
        -- reads for a batch, not a PL/pgSQL call and its statements for each record.
        DROP TRIGGER IF EXISTS flowstone_partition_states_insert ON flowstone_materializations;
        DROP TRIGGER IF EXISTS flowstone_partition_states_update ON flowstone_materializations;
        DROP TRIGGER IF EXISTS flowstone_reads_insert ON flowstone_materializations;
        DROP TRIGGER IF EXISTS flowstone_reads_update ON flowstone_materializations;
        DROP FUNCTION IF EXISTS flowstone_keep_partition_state();
        DROP FUNCTION IF EXISTS flowstone_keep_reads();
        CREATE FUNCTION flowstone_records_written() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
{_NEW_RECORDS}            -- A moved record changes its partition's state if it is the newest record
            -- there. The others' states are not even locked: superseding an old record
            -- must not wait on whoever completes the newest.
            INSERT INTO flowstone_partition_states AS s
                SELECT w.tenant_id, w.asset_name, w.partition, w.seq, w.status FROM written w
                WHERE w.partition IS NOT NULL AND w.seq = (
                    SELECT x.seq FROM flowstone_partition_states x
                    WHERE x.tenant_id = w.tenant_id AND x.asset_name = w.asset_name AND x.partition = w.partition)
            ON CONFLICT (tenant_id, asset_name, partition) WHERE partition IS NOT NULL DO UPDATE
            SET status = excluded.status WHERE s.seq = excluded.seq;
            INSERT INTO flowstone_partition_states AS s
                SELECT w.tenant_id, w.asset_name, NULL, w.seq, w.status FROM written w
                WHERE w.partition IS NULL AND w.seq = (
                    SELECT x.seq FROM flowstone_partition_states x
                    WHERE x.tenant_id = w.tenant_id AND x.asset_name = w.asset_name AND x.partition IS NULL)
            ON CONFLICT (tenant_id, asset_name) WHERE partition IS NULL DO UPDATE
            SET status = excluded.status WHERE s.seq = excluded.seq;
{_MOVED_READS}                WHERE n.status = 'success'
                  AND (SELECT e.reader FROM flowstone_reads e WHERE e.reader = n.id LIMIT 1) IS NULL;
            RETURN NULL;
        END $$;
        CREATE TRIGGER flowstone_records_inserted AFTER INSERT ON flowstone_materializations
            REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION flowstone_records_written();
        CREATE TRIGGER flowstone_records_updated AFTER UPDATE ON flowstone_materializations
            REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION flowstone_records_written();
        -- As for records and leases (14, 15): the tenant test filters rows found by key.
        ALTER POLICY flowstone_tenant_isolation ON flowstone_partition_states
            USING ({RECORDS_POLICY}) WITH CHECK ({RECORDS_POLICY});
        ALTER POLICY flowstone_tenant_isolation ON flowstone_reads
            USING ({RECORDS_POLICY}) WITH CHECK ({RECORDS_POLICY});
    """),
    (17, "room on each page of leases and partition states for the updates that follow each insert", """
        -- A lease is released, and a partition's state moved, moments after its row is
        -- inserted, changing no indexed column: with room left on the page the update
        -- stays there (a HOT update) and adds no index entries. Full pages sent
        -- three in four releases elsewhere, with an entry in each index.
        ALTER TABLE flowstone_leases SET (fillfactor = 50);
        ALTER TABLE flowstone_partition_states SET (fillfactor = 50);
    """),
    (18, "a partition's latest record found through its state, not an index of every record by partition", """
        -- Each record paid for an entry here at its begin and again at its end. The
        -- latest record of a partition is the one its state names (a lookup by key,
        -- then by sequence); its current success has the constraint's own index.
        DROP INDEX flowstone_materializations_asset_partition;
    """),
    (19, "a moved record's state is updated where it is, and reads are looked for only where there are some", f"""
        -- An upsert of each moved record's state found the row twice (the seq it holds,
        -- then the conflict) and locked it before updating it; the row's address, read
        -- with the seq, is enough: an update that finds the row moved by a newer record
        -- meanwhile skips it, as the upsert's seq test did. Reads were looked for in the
        -- dependencies of every success, most of which have none.
        CREATE OR REPLACE FUNCTION flowstone_records_written() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
{_NEW_RECORDS}            -- A moved record changes its partition's state if it is the newest record
            -- there. The others' states are not even locked: superseding an old record
            -- must not wait on whoever completes the newest.
            UPDATE flowstone_partition_states AS s SET status = x.status
            FROM (
                SELECT w.status, (
                    SELECT y.ctid FROM flowstone_partition_states y
                    WHERE y.tenant_id = w.tenant_id AND y.asset_name = w.asset_name AND y.partition = w.partition
                      AND y.seq = w.seq
                ) AS target
                FROM written w WHERE w.partition IS NOT NULL OFFSET 0
            ) AS x
            WHERE s.ctid = x.target;
            UPDATE flowstone_partition_states AS s SET status = x.status
            FROM (
                SELECT w.status, (
                    SELECT y.ctid FROM flowstone_partition_states y
                    WHERE y.tenant_id = w.tenant_id AND y.asset_name = w.asset_name AND y.partition IS NULL
                      AND y.seq = w.seq
                ) AS target
                FROM written w WHERE w.partition IS NULL OFFSET 0
            ) AS x
            WHERE s.ctid = x.target;
{_MOVED_READS}                WHERE n.status = 'success' AND n.upstream_partitions <> '{{}}'::jsonb
                  AND (SELECT e.reader FROM flowstone_reads e WHERE e.reader = n.id LIMIT 1) IS NULL;
            RETURN NULL;
        END $$;
    """),
    (20, "an asset's successes by when they became successes, for the daemon's eager followers", """
        -- The daemon asks every few seconds what succeeded since its last look; without
        -- this it read the current record of every partition of each followed asset.
        CREATE INDEX IF NOT EXISTS flowstone_materializations_successes
            ON flowstone_materializations (tenant_id, asset_name, updated_at) WHERE status = 'success';
    """),
    (21, "successes found by the transaction that made them so: a follower misses no late write", """
        -- A look asked for what succeeded after its last look less a minute (a writer's
        -- clock may lag, its commit land late), so it read a minute of successes again
        -- each time: 300,000 of them behind a backfill at 5,000 a second. The
        -- transaction id, against the last look's snapshot, says exactly what it could
        -- not see. Rows from before have none: no follower asks for them.
        ALTER TABLE flowstone_materializations ADD COLUMN IF NOT EXISTS written_xid xid8;
        ALTER TABLE flowstone_materializations ALTER COLUMN written_xid SET DEFAULT pg_current_xact_id();
        DROP INDEX IF EXISTS flowstone_materializations_successes;
        CREATE INDEX IF NOT EXISTS flowstone_materializations_written
            ON flowstone_materializations (tenant_id, asset_name, written_xid) WHERE status = 'success';
    """),
    (22, "the tenant test of row-level security reads its setting once a statement, not once a row", """
        -- current_setting() in a policy was called for each row a statement read or
        -- wrote (a record, its lease and its partition's state are each read and
        -- written, at its begin and at its end): 2.4% of the server's instructions
        -- per record written. As a scalar subquery it is an init plan, evaluated once a
        -- statement; each row compares its tenant with that value. The same rows
        -- pass, and IS TRUE still keeps the test out of index conditions (ADR 0029).
""" + "".join(
        f"ALTER POLICY flowstone_tenant_isolation ON {table} USING ({TENANT_TEST}) WITH CHECK ({TENANT_TEST});\n"
        for table in MATERIALIZATION_TABLES)),
    (23, "room on each page of leases for a batch's releases, which are longer than the rows they replace", """
        -- A batch of begins inserts its leases one after another, filling pages to the
        -- fill factor; its releases then update every row of those pages, each new
        -- version longer than the old (the success's id and hash added, the owner
        -- cleared). At half-full pages about a third of the releases found no room and
        -- went to other pages, with an entry in each index (the key and the fence);
        -- at 35% every release of a batch stays on its page (a HOT update).
        ALTER TABLE flowstone_leases SET (fillfactor = 35);
    """),
    (24, "a record's end is a heap-only update: no index of records reads its status", f"""
        -- A record's end changes its status, and four structures read the status: the
        -- index of unfinished and failed records, the two exclusion constraints of
        -- current records and the index of successes by transaction. With any of them
        -- an end, a superseding and a stale mark each wrote a new version elsewhere
        -- with an entry in every index (six for an end). Without them, and with room
        -- on the page, each is a HOT update: no index entry at all.
        ALTER TABLE flowstone_materializations NO FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_partition_states NO FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_materializations SET (fillfactor = 45);
        DROP INDEX IF EXISTS flowstone_materializations_status;
        DROP INDEX IF EXISTS flowstone_materializations_written;
        ALTER TABLE flowstone_materializations
            DROP CONSTRAINT IF EXISTS flowstone_materializations_current,
            DROP CONSTRAINT IF EXISTS flowstone_materializations_current_unpartitioned;
        -- A partition's current record (success or stale): its newest records, newest
        -- first, the status tested on each (one record, or the few newer ones failed).
        CREATE INDEX IF NOT EXISTS flowstone_materializations_partition
            ON flowstone_materializations (tenant_id, asset_name, partition, seq DESC);
        -- What followers ask (successes since a look) now comes from the partition
        -- states: the transaction that last made a success of each partition.
        ALTER TABLE flowstone_partition_states ADD COLUMN IF NOT EXISTS success_xid xid8;
{_states_filled("success_xid", "m.written_xid", "m.status = 'success' AND m.written_xid IS NOT NULL")}
        CREATE INDEX IF NOT EXISTS flowstone_partition_states_successes
            ON flowstone_partition_states (tenant_id, asset_name, success_xid) WHERE success_xid IS NOT NULL;
        ALTER TABLE flowstone_materializations DROP COLUMN IF EXISTS written_xid;
{_records_written(False)}
        ALTER TABLE flowstone_partition_states FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_materializations FORCE ROW LEVEL SECURITY;
    """),
    (25, "a partition's current record named by its state; records by sequence in ascending order", f"""
        -- A partition's current record (success or stale) was found through an index of
        -- each partition's records newest first (24); with the planner's statistics
        -- empty (a young table) it could walk the asset's index instead, every record
        -- of the asset for each lookup. The state now names it, by id: a lookup by key
        -- in the states, then by primary key, with no other index to choose. The index
        -- of partitions' records goes, and with it an entry a record.
        ALTER TABLE flowstone_materializations NO FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_partition_states NO FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_partition_states ADD COLUMN IF NOT EXISTS current_id uuid;
{_states_filled("current_id", "m.id", "m.status IN ('success', 'stale')")}
{_records_written(True)}
        DROP INDEX IF EXISTS flowstone_materializations_partition;
        -- In descending order a new record's entry went first in its tenant's (or
        -- asset's) range, so those pages split in halves and stayed half empty (57
        -- bytes a record an index, against 32 now). In ascending order it goes last,
        -- where the previous insertion went, and a full last page splits leaving itself
        -- full. Reads newest first walk the index backwards.
        DROP INDEX IF EXISTS flowstone_materializations_tenant_seq;
        CREATE INDEX flowstone_materializations_tenant_seq ON flowstone_materializations (tenant_id, seq);
        DROP INDEX IF EXISTS flowstone_materializations_asset_seq;
        CREATE INDEX flowstone_materializations_asset_seq ON flowstone_materializations (tenant_id, asset_name, seq);
        ALTER TABLE flowstone_partition_states FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_materializations FORCE ROW LEVEL SECURITY;
    """),
    (26, "records of the rare statuses listed through a table of their own, kept by triggers", f"""
        -- No index of records reads the status (24), so listing a rare status (failed,
        -- stale, ...) walked the tenant's records newest first until it had enough:
        -- all of them when there were fewer (16-34 ms at 100,000 records; retention
        -- lists the stale ones each time it prunes). The records of those statuses are
        -- named here, by status and sequence. Beginning, ending and superseding, a
        -- record moves between running, success and superseded, which are not here:
        -- their triggers' conditions are false, and the end stays a HOT update.
        CREATE TABLE flowstone_rare_records (
            tenant_id text NOT NULL DEFAULT '',
            status text NOT NULL,
            seq bigint NOT NULL,
            id uuid NOT NULL,
            PRIMARY KEY (tenant_id, status, seq)
        );
        {tenant_policy("flowstone_rare_records")}
        ALTER POLICY flowstone_tenant_isolation ON flowstone_rare_records
            USING ({TENANT_TEST}) WITH CHECK ({TENANT_TEST});
        CREATE FUNCTION flowstone_keep_rare_records() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                DELETE FROM flowstone_rare_records
                WHERE tenant_id = OLD.tenant_id AND status = OLD.status AND seq = OLD.seq;
            END IF;
            IF TG_OP <> 'DELETE' AND NEW.status IN {_RARE} THEN
                INSERT INTO flowstone_rare_records (tenant_id, status, seq, id)
                VALUES (NEW.tenant_id, NEW.status, NEW.seq, NEW.id);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER flowstone_rare_records_inserted AFTER INSERT ON flowstone_materializations
            FOR EACH ROW WHEN (NEW.status IN {_RARE}) EXECUTE FUNCTION flowstone_keep_rare_records();
        CREATE TRIGGER flowstone_rare_records_updated AFTER UPDATE OF status ON flowstone_materializations
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                               AND (OLD.status IN {_RARE} OR NEW.status IN {_RARE}))
            EXECUTE FUNCTION flowstone_keep_rare_records();
        CREATE TRIGGER flowstone_rare_records_deleted AFTER DELETE ON flowstone_materializations
            FOR EACH ROW WHEN (OLD.status IN {_RARE}) EXECUTE FUNCTION flowstone_keep_rare_records();
        -- Filled from every tenant's records (FORCE would hide them from the owner).
        ALTER TABLE flowstone_materializations NO FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_rare_records NO FORCE ROW LEVEL SECURITY;
        INSERT INTO flowstone_rare_records (tenant_id, status, seq, id)
            SELECT tenant_id, status, seq, id FROM flowstone_materializations WHERE status IN {_RARE};
        ALTER TABLE flowstone_rare_records FORCE ROW LEVEL SECURITY;
        ALTER TABLE flowstone_materializations FORCE ROW LEVEL SECURITY;
    """),
)
"""(version, what it does, SQL). Append only: a shipped migration never changes."""


async def migrate(connection: Any) -> list[int]:
    """Apply what is missing, under the advisory lock; the versions applied now."""
    applied_now: list[int] = []
    version = int(await connection.fetchval("SELECT current_setting('server_version_num')"))
    if version < OLDEST_SERVER:
        raise DatabaseError(f"FlowStone's PostgreSQL store needs PostgreSQL 13 or later (xid8, pg_snapshot); this "
                            f"server is {version // 10000}.{version % 10000}")
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS flowstone_schema_migrations (
                   version integer PRIMARY KEY,
                   description text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now()
               )"""
        )
        done = {row["version"] for row in await connection.fetch("SELECT version FROM flowstone_schema_migrations")}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            await connection.execute(sql)
            await connection.execute(
                "INSERT INTO flowstone_schema_migrations (version, description) VALUES ($1, $2)", version, description
            )
            applied_now.append(version)
    return applied_now
