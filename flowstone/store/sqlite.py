"""``fs.store.SqliteStore``: materialization records in one SQLite file.

The embedded default of the command line, the daemon and the web view: nothing
to install or run, and several processes may use one file at once (WAL: readers
never wait for the writer; writers take turns on SQLite's lock, waiting up to the
busy timeout). Each store object has one connection on a thread of its own
(``sqlite_thread``), which group-commits the writes queued while it worked.

Tenancy: SQLite has no row-level security, so every statement here names the
caller's tenant (``tenant_id``, '' for none) and every index leads with it. The
logic of leases and backfill owners is the PostgreSQL store's, written as
Python over a write transaction: SQLite runs one writer at a time, so what
PostgreSQL does with row locks, the write lock does here.

Durability: WAL with ``synchronous="NORMAL"`` by default, SQLite's advice for
WAL: a commit is safe from any crash of the application, and the log is fsynced
at each checkpoint (every ``CHECKPOINT_EVERY`` commits, on a thread); a power cut
may lose the last commits before it, never consistency. ``synchronous="FULL"``
fsyncs every commit (on a thread) before the caller hears of it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import attrs

from ..definitions import FieldError
from ..errors import (
    BackfillNotFound,
    BackfillOwned,
    DatabaseError,
    DatabaseUnavailable,
    DefinitionError,
    InvalidTransition,
    LeaseLost,
    NotFound,
    SerializationError,
)
from ..partitions import serialize_partition
from ..plumbing.jsonvalues import mapping_to_json, storable_text
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
    Materialization,
    Status,
    bad_mark,
    check_batch,
    check_before,
    check_decidable,
    check_limit,
    check_retention,
    check_transition,
    completed,
    evolve,
    id_in_use,
    new_record,
    parse_id,
    read_mark,
    to_status,
    unstorable_text,
    update_fields,
)
from .sqlite_batches import Connections, Failed
from .sqlite_schema import COUNT, NUMBER, RECORD_COLUMNS, RELEASED, WRITTEN
from .sqlite_schema import migrate as _migrate
from .sqlite_together import Beginning, Ending, begin_together, end_together

__all__ = ["DEFAULT_URL", "SqliteStore", "sqlite_path"]

DEFAULT_URL = "sqlite:///.flowstone/flowstone.db"

BUSY_TIMEOUT = 30.0
"""Seconds a writer waits for another process's write lock before giving up."""

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "davfs",
    "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.davfs", "fuse.glusterfs",
})
"""Where SQLite's file locks are not to be trusted (its own documentation warns of
corruption): such a location is refused."""

WAIT_POLL = (0.005, 0.25)
"""First and longest pause between looks at a lease another process holds."""

_TABLE = "flowstone_materializations"
_SELECT = f"SELECT {RECORD_COLUMNS} FROM {_TABLE}"
_SELECT_FROM = _SELECT  # followed by an index hint
_MAX_SEQ = 2**63 - 1
_INSERT = f"INSERT INTO {_TABLE} ({RECORD_COLUMNS}) VALUES ({', '.join('?' * 18)})"
_INSERT_SUCCESS = f"INSERT INTO {_TABLE} ({RECORD_COLUMNS}, written) VALUES ({', '.join('?' * 18)}, {NUMBER})"
_REWRITE = f"""UPDATE {_TABLE} SET status = ?, started_at = ?, completed_at = ?, duration_ms = ?,
    upstream_assets = ?, upstream_partitions = ?, dependency_hash = ?, metadata = ?, error_message = ?,
    error_traceback = ?, executor_node = ?, updated_at = ?, {WRITTEN}
    WHERE id = ? AND tenant_id = ? AND status = ?"""
_END = f"""UPDATE {_TABLE} SET status = ?, completed_at = ?, duration_ms = ?, metadata = ?, error_message = ?,
    error_traceback = ?, updated_at = ?, {WRITTEN}
    WHERE id = ? AND tenant_id = ? AND status = ?"""
"""A job's end (``ENDING``): the other columns stay as ``begin`` wrote them, and SQLite
updates a third of them (a backfill: 1.56 -> 1.36 million instructions per partition)."""
_CURRENT = "status IN ('success', 'stale')"
_SUPERSEDE = f"""UPDATE {_TABLE} SET status = 'superseded', updated_at = ?
    WHERE tenant_id = ? AND asset_name = ? AND partition IS ? AND {_CURRENT} AND id <> ?"""
_CLOSE = f"""UPDATE {_TABLE} SET status = CASE status WHEN 'running' THEN 'failed' ELSE 'cancelled' END,
    completed_at = ?, updated_at = ?, error_message = ?"""
_ACTIVE = "status IN ('pending', 'running', 'waiting_approval')"
_UNFINISHED_OR_FAILED = "status NOT IN ('success', 'superseded')"
"""The condition of the partial status index (sqlite_schema)."""
_LEASE_KEY = "tenant_id = ? AND asset_name = ? AND partitioned = ? AND partition = ?"


def sqlite_path(url: str | os.PathLike[str]) -> str:
    """The file of a ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` URL,
    or of a plain path. The store is a file shared by processes: ``:memory:`` is
    refused (use ``MemoryStore``)."""
    text = os.fspath(url)
    if text.startswith("sqlite://"):
        rest = text[len("sqlite://"):]
        if not rest.startswith("/"):
            raise DefinitionError([FieldError("store", f"a SQLite URL is sqlite:///path, got {text!r}")])
        text = rest[1:]
    if not text or text == ":memory:" or text.startswith("file:"):
        raise DefinitionError([FieldError(
            "store", f"the SQLite store needs a file path (sqlite:///path/to/flowstone.db), got {os.fspath(url)!r}; "
            "for a store in memory use fs.store.MemoryStore()")])
    return text


_PRUNE_BACKFILLS = """
DELETE FROM flowstone_backfills WHERE id IN (
    SELECT id FROM flowstone_backfills
    WHERE tenant_id = :tenant AND state != 'running' AND updated_at < :before
    ORDER BY updated_at LIMIT :limit)
"""

_PRUNE_TICKS = """
DELETE FROM flowstone_ticks WHERE (tenant_id, schedule, at) IN (
    SELECT t.tenant_id, t.schedule, t.at FROM flowstone_ticks AS t
    WHERE t.tenant_id = :tenant AND t.state != 'running' AND t.at < :before
      AND t.at < (SELECT max(n.at) FROM flowstone_ticks AS n
                  WHERE n.tenant_id = t.tenant_id AND n.schedule = t.schedule)
    ORDER BY t.at LIMIT :limit)
"""
"""Finished backfills and ticks older than ``before``; each schedule's newest tick stays."""

_PRUNE_CHOOSE = """
SELECT h.seq FROM (
    SELECT seq, partition, status, inserted_at,
           row_number() OVER (PARTITION BY partition ORDER BY seq DESC) AS rank
    FROM flowstone_materializations
    WHERE tenant_id = :tenant AND asset_name = :asset AND status IN ('superseded', 'failed', 'cancelled')
) h
WHERE (h.rank > :keep_last OR h.inserted_at < :before)
  AND NOT (h.status = 'superseded'
           AND (h.partition IN (SELECT value FROM json_each(:spare)) OR (h.partition IS NULL AND :spare_whole)))
  AND h.seq NOT IN (  -- not the latest record of its partition (so never the newest row: seq keeps growing)
      SELECT s.seq FROM flowstone_partition_states s WHERE s.tenant_id = :tenant AND s.asset_name = :asset)
ORDER BY h.seq LIMIT :limit
"""
"""The sequence numbers of the history records beyond a retention, oldest first
(``prune``: a choice, see ``flowstone.store.pruning``); NULL limits are no limit."""

_PRUNE_DELETE = """
DELETE FROM flowstone_materializations
WHERE seq IN (SELECT value FROM json_each(:chosen)) AND tenant_id = :tenant AND asset_name = :asset
  AND status IN ('superseded', 'failed', 'cancelled')
"""
"""Chosen history records, by sequence number, if they are still what was chosen."""


class SqliteStore:
    """Records in one SQLite file: ``SqliteStore(".flowstone/flowstone.db")`` (or a
    ``sqlite:///`` URL). The file and its folder are made on first use and the
    schema migrated then; ``await store.close()`` (or ``async with``) ends the
    store's connection thread. Raises ``DatabaseUnavailable`` on first use when the
    location is read-only, and ``DatabaseError`` when it is on a network filesystem.
    """

    backfill_chunk = 64
    """Most partitions a backfill's worker takes at once, and batches (ADR 0032's
    addendum): a batch's statements cost the same for more rows."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_URL, *, synchronous: str = "NORMAL") -> None:
        self.path = sqlite_path(path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise DefinitionError([FieldError("synchronous", f"must be FULL, NORMAL or EXTRA, got {synchronous!r}")])
        self.synchronous = synchronous.upper()
        self._db = Connections(
            self.path, self._prepare, fsync_each=self.synchronous != "NORMAL", check=lambda: check_location(self.path)
        )
        self._applied: list[int] = []
        self._specs = WrittenSpecs()  # backfill specs written here: later saves write the status alone
        self._pruning = Choice()  # the records a retention pass chose and has not deleted yet

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # ------------------------------------------------------------ lifecycle

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """On a thread, before first use (the location checked): configure, migrate."""
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":  # a new file: switched once, by whoever opens it first
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise DatabaseError(f"SQLite could not use write-ahead logging for {self.path} (mode {mode})")
        connection.execute(f"PRAGMA synchronous = {self.synchronous}")
        # A batch's savepoint (and each statement that may abort halfway) copies every
        # page it is first to change into a sub-journal, a temporary file by default:
        # 37 write calls per backfilled partition, a quarter of the time. In memory it
        # is a copy; its size is bounded by the pages one batch changes.
        connection.execute("PRAGMA temp_store = MEMORY")
        connection.execute("BEGIN IMMEDIATE")
        try:
            self._applied = _migrate(connection)
            connection.execute("COMMIT")
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")

    async def migrate(self) -> list[int]:
        """Create or upgrade the schema (idempotent, safe from several processes at
        once); the versions applied now. The store also does this on first use."""
        now = await self._db.write(_migrate)  # opening the store may have applied some already
        applied, self._applied = [*self._applied, *now], []
        return applied

    async def close(self) -> None:
        self._db.close()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- writes

    async def create(self, **fields: Any) -> Materialization:
        tenant = current_tenant()
        record = new_record(fields, tenant, _utcnow())
        values = _values(record)
        await self._db.write(lambda c: _insert(c, record, values))
        return record

    async def begin(
        self, owner: str, seconds: float, *, unless_done: tuple[Any, str] | None = None, **fields: Any
    ) -> tuple[Materialization, Lease]:
        tenant = current_tenant()
        record = new_record(fields, tenant, _utcnow())
        values = _values(record)
        fence = await self._db.write(lambda c: _begin(c, record, values, owner, seconds, unless_done))
        return record, Lease(tenant, record.asset_name, record.partition, owner, fence)

    async def complete(
        self, record: Materialization, status: Status, *, lease: Lease | None = None, **fields: Any
    ) -> Materialization:
        new = completed(record, status, fields, current_tenant(), _utcnow())
        statement, row = _rewriting(new, record.status, fields)
        await self._db.write(lambda c: _rewrite(c, new, statement, row, record.status, lease))
        return new

    async def begin_many(
        self, owner: str, seconds: float, starts: Sequence[Start]
    ) -> list[tuple[Materialization, Lease] | Exception]:
        tenant, now = current_tenant(), _utcnow()

        def prepare(start: Start) -> Beginning:
            record = new_record(start.fields, tenant, now)
            return Beginning(record, _values(record), start.unless_done)

        async def write(jobs: list[Beginning]) -> list[tuple[Materialization, Lease] | Exception]:
            def alone(index: int, c: sqlite3.Connection) -> int:
                job = jobs[index]
                return _begin(c, job.record, job.values, owner, seconds, job.unless_done)

            fences = await self._db.write(
                lambda c: begin_together(c, tenant or "", jobs, owner, time.time() + seconds, alone))
            return [fence.error if isinstance(fence, Failed) else
                    (job.record, Lease(tenant, job.record.asset_name, job.record.partition, owner, fence))
                    for job, fence in zip(jobs, fences, strict=True)]

        return await in_one_write(starts, prepare, write)

    async def complete_many(self, ends: Sequence[End]) -> list[Materialization | Exception]:
        tenant, now = current_tenant(), _utcnow()

        def prepare(end: End) -> Ending:
            new = completed(end.record, end.status, end.fields, tenant, now)
            statement, row = _rewriting(new, end.record.status, end.fields)
            return Ending(new, end.record.status, end.lease, row, only_ending=statement is _END)

        async def write(jobs: list[Ending]) -> list[Materialization | Exception]:
            def alone(index: int, c: sqlite3.Connection) -> None:
                job = jobs[index]
                _rewrite(c, job.new, _END if job.only_ending else _REWRITE, job.row, job.expected, job.lease)

            written = await self._db.write(lambda c: end_together(c, tenant or "", jobs, alone))
            return [failed.error if isinstance(failed, Failed) else job.new
                    for job, failed in zip(jobs, written, strict=True)]

        return await in_one_write(ends, prepare, write)

    async def update_status(self, id: uuid.UUID | str, status: Status | str, **fields: Any) -> Materialization:
        record_id, target, changes = parse_id(id), to_status(status), update_fields(fields)
        tenant = _tenant()
        return await self._db.write(lambda c: _update_status(c, tenant, record_id, target, changes))

    async def renew_leases(self, owner: str, fences: Collection[int], seconds: float) -> set[int]:
        if not fences:
            return set()
        tenant, wanted = _tenant(), list(fences)

        def renew(c: sqlite3.Connection) -> set[int]:
            marks = ", ".join("?" * len(wanted))
            rows = c.execute(
                f"UPDATE flowstone_leases SET expires_at = ? WHERE tenant_id = ? AND owner = ? AND fence IN ({marks}) "
                "RETURNING fence",
                (time.time() + seconds, tenant, owner, *wanted),
            ).fetchall()
            return {row[0] for row in rows}

        return await self._db.write(renew)

    async def wait_lease(self, asset_name: str, partition: str | None, fence: int, timeout: float) -> None:
        key = (_tenant(), asset_name, partition is not None, partition or "")

        def live(c: sqlite3.Connection) -> bool:
            row = c.execute(f"SELECT fence, expires_at FROM flowstone_leases WHERE {_LEASE_KEY}", key).fetchone()
            return row is not None and row[0] == fence and row[1] > time.time()

        pause, longest = WAIT_POLL
        with anyio.move_on_after(timeout):
            while await self._db.read(live):
                # Polling, bounded: another process holds it, and SQLite cannot notify.
                await anyio.sleep(pause)
                pause = min(pause * 2, longest)

    async def close_orphans(self, owner: str, message: str) -> int:
        tenant, text, now = _tenant(), storable_text(message), _iso(_utcnow())

        def close(c: sqlite3.Connection) -> int:
            c.execute(
                "UPDATE flowstone_leases SET owner = '', expires_at = ?, done_id = NULL, done_hash = NULL "
                "WHERE tenant_id = ? AND owner = ?",
                (RELEASED, tenant, owner),
            )
            prefix = f"{owner}/"
            return c.execute(
                f"{_CLOSE} WHERE tenant_id = ? AND {_ACTIVE} AND {_UNFINISHED_OR_FAILED} "
                "AND substr(executor_node, 1, ?) = ?",
                (now, now, text, tenant, len(prefix), prefix),
            ).rowcount

        return await self._db.write(close)

    async def mark_stale(self, asset_name: str, partition: str | None) -> None:
        tenant = _tenant()
        await self._db.write(lambda c: _mark_stale(c, tenant, asset_name, partition))

    # ----------------------------------------------------------------- reads

    async def get(self, asset_name: str, partition: Any = None) -> Materialization:
        key, tenant = serialize_partition(partition), _tenant()
        row = await self._db.read(lambda c: c.execute(
            f"{_SELECT} WHERE tenant_id = ? AND asset_name = ? AND partition IS ? ORDER BY seq DESC LIMIT 1",
            (tenant, asset_name, key),
        ).fetchone())
        if row is None:
            raise NotFound("no materialization", asset=asset_name, partition=key, tenant=tenant or None)
        return _record(row)

    async def get_by_id(self, id: uuid.UUID | str) -> Materialization:
        record_id, tenant = parse_id(id), _tenant()
        row = await self._db.read(lambda c: _by_id(c, tenant, record_id))
        if row is None:
            raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant or None)
        return _record(row)

    async def get_by_run_id(self, run_id: uuid.UUID | str) -> list[Materialization]:
        run, tenant = str(parse_id(run_id, "run")), _tenant()
        return await self._read_records(f"{_SELECT} WHERE tenant_id = ? AND run_id = ? ORDER BY seq", (tenant, run))

    async def exists(self, asset_name: str, partition: Any = None) -> bool:
        key, tenant = serialize_partition(partition), _tenant()
        row = await self._db.read(lambda c: c.execute(
            f"SELECT 1 FROM {_TABLE} WHERE tenant_id = ? AND asset_name = ? AND partition IS ? LIMIT 1",
            (tenant, asset_name, key),
        ).fetchone())
        return row is not None

    async def list_by_status(self, status: Status | str, *, limit: int = 100) -> list[Materialization]:
        wanted, count = to_status(status), check_limit(limit)
        # Successes and superseded records are most of the table: walk it newest
        # first. The other statuses have the partial index, which the planner takes
        # only when the statement names the status (one of eight fixed words).
        if wanted in (Status.SUCCESS, Status.SUPERSEDED):
            way, term = "NOT INDEXED", ""
        else:  # the index's own condition, repeated: SQLite uses a partial index only then
            way, term = "INDEXED BY flowstone_materializations_status", f"AND {_UNFINISHED_OR_FAILED}"
        return await self._read_records(
            f"{_SELECT_FROM} {way} WHERE tenant_id = ? AND status = '{wanted.value}' {term} ORDER BY seq DESC LIMIT ?",
            (_tenant(), count),
        )

    async def list_all(
        self, *, asset_name: str | None = None, limit: int = 1000, before: uuid.UUID | str | None = None
    ) -> list[Materialization]:
        count, tenant = check_limit(limit), _tenant()
        below = _MAX_SEQ
        if before is not None:
            rid = str(parse_id(before))
            found = await self._db.read(lambda c: c.execute(
                f"SELECT seq FROM {_TABLE} WHERE id = ? AND tenant_id = ?", (rid, tenant)).fetchone())
            if found is None:
                raise NotFound(f"no record {rid}", tenant=tenant or None)
            below = found[0]
        if asset_name is None:  # newest first, walking the table (no sort of every record)
            return await self._read_records(
                f"{_SELECT_FROM} NOT INDEXED WHERE tenant_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (tenant, below, count))
        return await self._read_records(
            f"{_SELECT} WHERE tenant_id = ? AND asset_name = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (tenant, asset_name, below, count),
        )

    async def latest_successes(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], Materialization]:
        wanted, tenant = list(pairs), _tenant()
        if not wanted:
            return {}

        def find(c: sqlite3.Connection) -> list[Any]:
            rows = []
            for asset, key in wanted:
                row = c.execute(
                    f"{_SELECT} WHERE tenant_id = ? AND asset_name = ? AND partition IS ? AND {_CURRENT}",
                    (tenant, asset, key),
                ).fetchone()
                if row is not None:
                    rows.append(row)
            return rows

        return {(r.asset_name, r.partition): r for r in map(_record, await self._db.read(find))}

    async def partitions_of(self, asset_name: str) -> dict[str | None, Materialization]:
        records = await self._read_records(
            f"{_SELECT} WHERE tenant_id = ? AND asset_name = ? AND {_CURRENT}", (_tenant(), asset_name))
        return {record.partition: record for record in records}

    async def successes_after(self, asset_name: str, mark: str | None) -> tuple[list[Materialization], str]:
        after, tenant = None if mark is None else _read_mark(mark), _tenant()

        def look(c: sqlite3.Connection) -> tuple[list[Any], int]:
            # In one read transaction: the successes, and the count they are read up to.
            now = c.execute("SELECT n FROM flowstone_changes").fetchone()[0]
            rows = [] if after is None else c.execute(  # through the index of successes by number (13)
                f"{_SELECT} WHERE tenant_id = ? AND asset_name = ? AND status = 'success' AND written > ? "
                "ORDER BY written, seq", (tenant, asset_name, after)).fetchall()
            return rows, now

        rows, now = await self._db.read_many(look)
        if after is not None and after > now:  # of another file, or of this one before it was made again
            raise bad_mark(mark, "is later than this database's now")
        return [_record(row) for row in rows], f"sqlite:{now}"

    async def partition_states(self, asset_name: str) -> dict[str | None, Status]:
        tenant = _tenant()
        rows = await self._db.read_many(lambda c: c.execute(  # kept by triggers (schema version 9)
            "SELECT partition, status FROM flowstone_partition_states WHERE tenant_id = ? AND asset_name = ?",
            (tenant, asset_name),
        ).fetchall())
        return {None if key == "\0" else key: STATUS_OF[status] for key, status in rows}

    async def prune(
        self, asset_name: str, *, keep_last: int | None = None, before: datetime | None = None,
        spare: Collection[str | None] = (), limit: int = 10_000,
    ) -> int:
        keep_last, limit = check_retention(keep_last, limit)
        if keep_last is None and before is None:
            return 0
        tenant = _tenant()

        async def choose(most: int) -> list[int]:
            arguments = {
                "tenant": tenant, "asset": asset_name, "keep_last": keep_last, "before": _iso(before),
                "spare": json.dumps([partition for partition in spare if partition is not None]),
                "spare_whole": None in spare, "limit": most,
            }
            found: list[int] = await self._db.read_many(
                lambda c: [row[0] for row in c.execute(_PRUNE_CHOOSE, arguments)])
            return found

        async def delete(chosen: list[int]) -> int:
            gone = {"chosen": json.dumps(chosen), "tenant": tenant, "asset": asset_name}
            deleted: int = await self._db.write(lambda c: c.execute(_PRUNE_DELETE, gone).rowcount)
            return deleted

        key = prune_key(tenant, asset_name, keep_last, before, spare)
        return await self._pruning.prune(key, limit, choose, delete)

    async def prune_finished(self, before: datetime, *, limit: int = 10_000) -> int:
        tenant, when = _tenant(), _iso(check_before(before).astimezone(timezone.utc))
        most = check_batch(limit)

        def prune(c: sqlite3.Connection) -> int:
            arguments = {"tenant": tenant, "before": when, "limit": most}
            backfills: int = c.execute(_PRUNE_BACKFILLS, arguments).rowcount
            ticks: int = c.execute(_PRUNE_TICKS, {**arguments, "limit": most - backfills}).rowcount
            return backfills + ticks

        deleted: int = await self._db.write(prune)
        return deleted

    async def _read_records(self, sql: str, args: tuple[Any, ...]) -> list[Materialization]:
        rows = await self._db.read_many(lambda c: c.execute(sql, args).fetchall())
        return [_record(row) for row in rows]

    # ------------------------------------------------------------- backfills

    async def save_backfill(self, id: uuid.UUID, state: Any, *, owner: str | None = None) -> None:
        tenant = _tenant()
        status, state_name = status_to_json(state)
        # A checkpoint of a backfill whose spec this store wrote saves the status alone.
        spec = None if self._specs.written(state.spec) else spec_to_json(state.spec)

        def save(c: sqlite3.Connection) -> None:
            row = c.execute(
                "SELECT tenant_id, owner, cancel_requested FROM flowstone_backfills WHERE id = ?", (str(id),)
            ).fetchone()
            if row is not None and (row[0] != tenant or row[1] != owner):
                raise LeaseLost(
                    f"backfill {str(id)!r} is now driven by another process; {owner} may no longer save it",
                    tenant=tenant or None,
                )
            if row is not None and row[2] and state_name == "running":
                raise CancelRequested(f"backfill {str(id)!r}: a cancel was requested", tenant=tenant or None)
            if row is not None and spec is None:
                c.execute(
                    "UPDATE flowstone_backfills SET state = ?, status = ?, heartbeat_at = ?, updated_at = ?, "
                    "cancel_requested = 0 WHERE id = ?",
                    (state_name, status, time.time(), _iso(_utcnow()), str(id)),
                )
                return
            c.execute(
                """INSERT INTO flowstone_backfills
                       (id, tenant_id, asset_name, state, status, owner, heartbeat_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET state = excluded.state, status = excluded.status,
                       heartbeat_at = excluded.heartbeat_at, updated_at = excluded.updated_at, cancel_requested = 0""",
                (str(id), tenant, state.spec.asset, state_name, status, owner, time.time(), _iso(_utcnow())),
            )
            c.execute(
                "INSERT INTO flowstone_backfill_specs (id, spec) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET spec = excluded.spec",
                (str(id), spec if spec is not None else spec_to_json(state.spec)),
            )

        await self._db.write(save)
        self._specs.wrote(state.spec)

    async def decide(self, id: uuid.UUID | str, approve: bool, reason: str | None = None) -> Materialization:
        record_id, tenant = parse_id(id), _tenant()
        text = None if reason is None else storable_text(reason)

        def decide(c: sqlite3.Connection) -> Materialization:
            row = _by_id(c, tenant, record_id)
            if row is None:
                raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant or None)
            record = _record(row)
            decided = c.execute("SELECT 1 FROM flowstone_decisions WHERE tenant_id = ? AND record_id = ?",
                                (tenant, str(record_id))).fetchone()
            check_decidable(record, approve, decided is not None)
            c.execute("INSERT INTO flowstone_decisions VALUES (?, ?, ?, ?, ?)",
                      (tenant, str(record_id), approve, text, _iso(_utcnow())))
            return record

        return await self._db.write(decide)

    async def decision(self, id: uuid.UUID) -> tuple[bool, str | None] | None:
        record_id, tenant = str(parse_id(id)), _tenant()
        row = await self._db.read(lambda c: c.execute(
            "SELECT approve, reason FROM flowstone_decisions WHERE tenant_id = ? AND record_id = ?",
            (tenant, record_id)).fetchone())
        return None if row is None else (bool(row[0]), row[1])

    async def claim_role(self, role: str, owner: str, seconds: float) -> RoleHolder:
        tenant, span = _tenant(), role_seconds(seconds)

        def claim(c: sqlite3.Connection) -> RoleHolder:
            now = time.time()
            held = c.execute("SELECT owner, fence, expires_at, heartbeat_at FROM flowstone_roles "
                             "WHERE tenant_id = ? AND role = ?", (tenant, role)).fetchone()
            if held is not None and held[0] != owner and held[2] > now:  # someone else's, still held
                return _holder(role, *held)
            fence = 1 if held is None else held[1] + (held[0] != owner)
            taken = held[0] or None if held is not None and held[0] != owner else None
            c.execute(
                "INSERT INTO flowstone_roles VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, role) DO UPDATE SET "
                "owner = excluded.owner, fence = excluded.fence, expires_at = excluded.expires_at, "
                "heartbeat_at = excluded.heartbeat_at",
                (tenant, role, owner, fence, now + span, now),
            )
            return attrs.evolve(_holder(role, owner, fence, now + span, now), taken_from=taken)

        return await self._db.write(claim)

    async def release_role(self, role: str, owner: str) -> None:
        tenant = _tenant()
        await self._db.write(lambda c: c.execute(
            "UPDATE flowstone_roles SET owner = '', expires_at = ? WHERE tenant_id = ? AND role = ? AND owner = ?",
            (time.time(), tenant, role, owner)))

    async def role_holder(self, role: str) -> RoleHolder | None:
        tenant = _tenant()
        row = await self._db.read(lambda c: c.execute(
            "SELECT owner, fence, expires_at, heartbeat_at FROM flowstone_roles "
            "WHERE tenant_id = ? AND role = ? AND owner != ''", (tenant, role)).fetchone())
        return None if row is None else _holder(role, *row)

    async def claim_tick(self, schedule: str, at: datetime, owner: str) -> bool:
        tenant, when = _tenant(), _iso(tick_time(at))
        row = await self._db.write(lambda c: c.execute(
            "INSERT INTO flowstone_ticks (tenant_id, schedule, at, owner, claimed_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            (tenant, schedule, when, owner, _iso(_utcnow())),
        ).fetchone())
        return row is not None

    async def finish_tick(
        self, schedule: str, at: datetime, state: str, *, run_id: uuid.UUID | None = None, error: str | None = None
    ) -> None:
        tenant, when, ending = _tenant(), tick_time(at), finished_state(state)
        text = None if error is None else storable_text(error)
        row = await self._db.write(lambda c: c.execute(
            "UPDATE flowstone_ticks SET state = ?, run_id = ?, error = ?, finished_at = ? "
            "WHERE tenant_id = ? AND schedule = ? AND at = ? RETURNING 1",
            (ending, None if run_id is None else str(run_id), text, _iso(_utcnow()), tenant, schedule, _iso(when)),
        ).fetchone())
        if row is None:
            raise NotFound(f"schedule {schedule!r} has no tick at {when.isoformat()}", tenant=tenant or None)

    async def last_ticks(self) -> dict[str, Tick]:
        tenant = _tenant()
        rows = await self._db.read(lambda c: c.execute(
            "SELECT schedule, max(at), owner, state, run_id, error, claimed_at, finished_at FROM flowstone_ticks "
            "WHERE tenant_id = ? GROUP BY schedule", (tenant,),
        ).fetchall())
        return {
            row[0]: Tick(row[0], datetime.fromisoformat(row[1]), row[2], row[3],
                         None if row[4] is None else uuid.UUID(row[4]), row[5], _time(row[6]), _time(row[7]))
            for row in rows
        }

    async def unfinished_ticks(self, *, limit: int = 1000) -> list[Tick]:
        tenant, most = _tenant(), check_limit(limit)
        rows = await self._db.read(lambda c: c.execute(
            "SELECT schedule, at, owner, state, run_id, error, claimed_at, finished_at FROM flowstone_ticks "
            "WHERE tenant_id = ? AND state = 'running' ORDER BY at, schedule LIMIT ?", (tenant, most),
        ).fetchall())
        return [Tick(row[0], datetime.fromisoformat(row[1]), row[2], row[3], None, row[5], _time(row[6]), None)
                for row in rows]

    async def load_cursor(self, name: str) -> Cursor | None:
        tenant, (name, _, _) = _tenant(), cursor_fields(name, None, None)
        row = await self._db.read(lambda c: c.execute(
            "SELECT name, value, error, updated_at FROM flowstone_cursors WHERE tenant_id = ? AND name = ?",
            (tenant, name)).fetchone())
        return None if row is None else Cursor(row[0], row[1], row[2], _time(row[3]))

    async def save_cursor(self, name: str, value: str | None, *, error: str | None = None) -> None:
        tenant, fields = _tenant(), cursor_fields(name, value, error)
        await self._db.write(lambda c: c.execute(
            "INSERT INTO flowstone_cursors VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant_id, name) DO UPDATE SET "
            "value = excluded.value, error = excluded.error, updated_at = excluded.updated_at",
            (tenant, *fields, _iso(_utcnow()))))

    async def list_cursors(self) -> list[Cursor]:
        tenant = _tenant()
        rows = await self._db.read(lambda c: c.execute(
            "SELECT name, value, error, updated_at FROM flowstone_cursors WHERE tenant_id = ? ORDER BY name",
            (tenant,)).fetchall())
        return [Cursor(row[0], row[1], row[2], _time(row[3])) for row in rows]

    async def request_cancel(self, id: uuid.UUID) -> Any:
        tenant, bid = _tenant(), str(parse_id(id, "backfill"))

        def cancel(c: sqlite3.Connection) -> Any:
            row = c.execute(
                """UPDATE flowstone_backfills SET cancel_requested = (state = 'running')
                   WHERE id = ? AND tenant_id = ? RETURNING status""", (bid, tenant),
            ).fetchone()
            return None if row is None else (_spec_of(c, bid), row[0])

        row = await self._db.write(cancel)
        if row is None:
            raise BackfillNotFound(uuid.UUID(bid), tenant=tenant or None)
        return saved_from_json(row[0], row[1])

    async def list_backfills(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        tenant, count, skip = _tenant(), check_limit(limit), check_limit(offset, "offset")
        rows = await self._db.read_many(lambda c: c.execute(
            "SELECT s.spec, b.status FROM flowstone_backfills AS b JOIN flowstone_backfill_specs AS s USING (id) "
            "WHERE b.tenant_id = ? ORDER BY b.updated_at DESC, b.id LIMIT ? OFFSET ?", (tenant, count, skip),
        ).fetchall())
        return [saved_from_json(spec, status) for spec, status in rows]

    async def list_backfill_statuses(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        tenant, count, skip = _tenant(), check_limit(limit), check_limit(offset, "offset")
        rows = await self._db.read_many(lambda c: c.execute(
            "SELECT status, id, asset_name FROM flowstone_backfills WHERE tenant_id = ? ORDER BY updated_at DESC, id "
            "LIMIT ? OFFSET ?", (tenant, count, skip),
        ).fetchall())
        return [status_from_json(status, uuid.UUID(id), asset) for status, id, asset in rows]

    async def load_backfill(self, id: uuid.UUID) -> Any:
        tenant = _tenant()
        row = await self._db.read(lambda c: c.execute(
            "SELECT s.spec, b.status FROM flowstone_backfills AS b JOIN flowstone_backfill_specs AS s USING (id) "
            "WHERE b.id = ? AND b.tenant_id = ?", (str(id), tenant)
        ).fetchone())
        return None if row is None else saved_from_json(row[0], row[1])

    async def load_backfill_status(self, id: uuid.UUID) -> Any:
        tenant = _tenant()
        row = await self._db.read(lambda c: c.execute(
            "SELECT status, asset_name FROM flowstone_backfills WHERE id = ? AND tenant_id = ?", (str(id), tenant)
        ).fetchone())
        return None if row is None else status_from_json(row[0], id, row[1])

    async def claim_backfill(self, id: uuid.UUID, owner: str, *, stale_after: float) -> BackfillClaim:
        tenant = _tenant()

        def claim(c: sqlite3.Connection) -> BackfillClaim:
            row = c.execute(
                "SELECT s.spec, b.status, b.state, b.owner, b.heartbeat_at "
                "FROM flowstone_backfills AS b JOIN flowstone_backfill_specs AS s USING (id) "
                "WHERE b.id = ? AND b.tenant_id = ?",
                (str(id), tenant),
            ).fetchone()
            if row is None:
                raise BackfillNotFound(id, tenant=tenant or None)
            now = time.time()
            previous, seen = None, None
            if row[2] == "running" and row[3] is not None and row[3] != owner:
                last_seen = datetime.fromtimestamp(row[4], timezone.utc)
                if now - row[4] <= stale_after:
                    raise BackfillOwned(id, row[3], last_seen, tenant=tenant or None)
                previous, seen = row[3], last_seen
            c.execute(
                "UPDATE flowstone_backfills SET owner = ?, heartbeat_at = ? WHERE id = ? AND tenant_id = ?",
                (owner, now, str(id), tenant),
            )
            return BackfillClaim(saved_from_json(row[0], row[1]), previous, seen)

        return await self._db.write(claim)


def _spec_of(c: sqlite3.Connection, backfill: str) -> str:
    """The spec's JSON text of a backfill whose row is there (its spec is too)."""
    row = c.execute("SELECT spec FROM flowstone_backfill_specs WHERE id = ?", (backfill,)).fetchone()
    return str(row[0])


# ------------------------------------------------------------------ location


def check_location(path: str) -> None:
    """Make the file's folder if needed; refuse a read-only or network location."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise DatabaseUnavailable(f"cannot make the folder of the SQLite store {path!r}: {error.strerror}") from None
    kind = filesystem_type(folder)
    if kind in NETWORK_FILESYSTEMS:
        raise DatabaseError(
            f"the SQLite store {path!r} is on a network filesystem ({kind}), where SQLite's locks are unreliable "
            "and the file can be corrupted; put it on a local disk, or use PostgreSQL (--store postgresql://...)"
        )
    read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY) or not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)
    )
    if read_only:
        raise DatabaseUnavailable(
            f"the SQLite store {path!r} is in a read-only location; choose a writable path "
            "(--store sqlite:///path/to/flowstone.db)"
        )


def filesystem_type(folder: str, mounts: str | None = None) -> str | None:
    """The filesystem type of the mount holding ``folder`` (Linux ``/proc/self/mounts``
    format, read from the system unless given), or None where that is not known."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    real = os.path.realpath(folder)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


# ------------------------------------------------------- on the store's thread


def _tenant() -> str:
    return current_tenant() or ""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _holder(role: str, owner: str, fence: int, expires_at: float, heartbeat_at: float | None) -> RoleHolder:
    return RoleHolder(role, owner, fence, datetime.fromtimestamp(expires_at, timezone.utc),
                      heartbeat_at=None if heartbeat_at is None else datetime.fromtimestamp(heartbeat_at, timezone.utc))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _values(record: Materialization) -> tuple[Any, ...]:
    """The record's row, in ``RECORD_COLUMNS`` order; SerializationError for what cannot be stored."""
    problem = unstorable_text(record)
    if problem is not None:
        raise SerializationError(
            f"a record field holds {problem}, which the store cannot keep",
            asset=record.asset_name, partition=record.partition,
        )
    return (
        str(record.id), record.tenant_id or "", record.asset_name, record.partition, str(record.run_id),
        STATUS_TEXT[record.status], _iso(record.started_at), _iso(record.completed_at), record.duration_ms,
        json.dumps(list(record.upstream_assets), ensure_ascii=False) if record.upstream_assets else "[]",
        json.dumps({name: list(keys) for name, keys in record.upstream_partitions.items()}, ensure_ascii=False)
        if record.upstream_partitions else "{}",
        record.dependency_hash,
        _metadata_json(record),
        record.error_message, record.error_traceback, record.executor_node,
        _iso(record.inserted_at), _iso(record.updated_at),
    )


def _metadata_json(record: Materialization) -> str:
    if not record.metadata:
        return "{}"
    return mapping_to_json(record.metadata, asset=record.asset_name, partition=record.partition, what="metadata")


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _record(row: Any) -> Materialization:
    return Materialization(
        id=uuid.UUID(row[0]),
        tenant_id=row[1] or None,
        asset_name=row[2],
        partition=row[3],
        run_id=uuid.UUID(row[4]),
        status=Status(row[5]),
        started_at=_time(row[6]),
        completed_at=_time(row[7]),
        duration_ms=row[8],
        upstream_assets=tuple(json.loads(row[9])),
        upstream_partitions={name: tuple(keys) for name, keys in json.loads(row[10]).items()},
        dependency_hash=row[11],
        metadata=json.loads(row[12]),
        error_message=row[13],
        error_traceback=row[14],
        executor_node=row[15],
        inserted_at=_time(row[16]),
        updated_at=_time(row[17]),
    )


def _by_id(c: sqlite3.Connection, tenant: str, record_id: uuid.UUID) -> Any:
    return c.execute(f"{_SELECT} WHERE id = ? AND tenant_id = ?", (str(record_id), tenant)).fetchone()


def _insert(c: sqlite3.Connection, record: Materialization, values: tuple[Any, ...]) -> None:
    if record.status in CURRENT:
        c.execute(_SUPERSEDE, (values[17], values[1], record.asset_name, record.partition, values[0]))
    success = record.status is Status.SUCCESS
    if success:
        c.execute(COUNT)
    try:
        c.execute(_INSERT_SUCCESS if success else _INSERT, values)
    except sqlite3.IntegrityError:
        # Whoever's it is, it is not overwritten (another tenant's id looks taken too).
        raise id_in_use(record) from None


_FIRST_LEASE = """INSERT INTO flowstone_leases (tenant_id, asset_name, partitioned, partition, owner, fence, record_id,
        expires_at, done_id, done_hash)
    SELECT ?, ?, ?, ?, ?, coalesce(max(fence), 0) + 1, ?, ?, NULL, NULL FROM flowstone_leases WHERE true
    ON CONFLICT (tenant_id, asset_name, partitioned, partition) DO NOTHING
    RETURNING fence"""
"""A partition's first lease, granted in one statement (a backfill's new partitions);
no row when the partition had a lease before, which ``_begin`` then reads and checks."""


def _begin(
    c: sqlite3.Connection, record: Materialization, values: tuple[Any, ...], owner: str, seconds: float,
    unless_done: tuple[Any, str] | None,
) -> int:
    """Take the lease of the record's partition and insert the record (see the protocol)."""
    tenant = values[1]
    key = (tenant, record.asset_name, record.partition is not None, record.partition or "")
    now = time.time()
    first = c.execute(_FIRST_LEASE, (*key, owner, values[0], now + seconds)).fetchone()
    if first is not None:  # nobody ever held it: nothing to check, nothing to close
        _insert(c, record, values)
        return int(first[0])
    held = c.execute(
        "SELECT owner, fence, expires_at, record_id, done_id, done_hash FROM flowstone_leases "
        f"WHERE {_LEASE_KEY}", key
    ).fetchone()
    if unless_done is not None and held is not None and held[0] == "" and held[4] is not None:
        # A released lease names the success it ended with: the one the caller is
        # about to compute again when the hash is the caller's and it is not the one
        # the caller saw (another process finished it since the caller looked).
        seen = None if unless_done[0] is None else str(unless_done[0])
        if held[5] == unless_done[1] and held[4] != seen:
            done = c.execute(f"{_SELECT} WHERE id = ? AND tenant_id = ? AND status = 'success'",
                             (held[4], tenant)).fetchone()
            if done is not None:
                raise FinishedElsewhere(_record(done))
    if held is not None and held[0] != "":
        if held[2] > now:
            raise LeaseHeld(
                record.asset_name, record.partition, owner=held[0], fence=held[1],
                expires_at=datetime.fromtimestamp(held[2], timezone.utc), tenant=record.tenant_id,
            )
        if held[3] is not None:  # its holder stopped renewing: close what it left open
            stamp = values[17]
            c.execute(
                f"{_CLOSE} WHERE id = ? AND tenant_id = ? AND {_ACTIVE}",
                (stamp, stamp, f"orphaned: {held[0]} stopped renewing its lease without finishing it", held[3],
                 tenant),
            )
    fence = c.execute(
        """INSERT INTO flowstone_leases (tenant_id, asset_name, partitioned, partition, owner, fence, record_id,
               expires_at, done_id, done_hash)
           SELECT ?, ?, ?, ?, ?, coalesce(max(fence), 0) + 1, ?, ?, NULL, NULL FROM flowstone_leases WHERE true
           ON CONFLICT (tenant_id, asset_name, partitioned, partition) DO UPDATE SET owner = excluded.owner,
               fence = excluded.fence, record_id = excluded.record_id, expires_at = excluded.expires_at,
               done_id = NULL, done_hash = NULL
           RETURNING fence""",
        (*key, owner, values[0], now + seconds),
    ).fetchone()[0]
    _insert(c, record, values)
    return int(fence)


def _rewriting(new: Materialization, expected: Status, fields: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """``_rewrite``'s statement and row for ``complete(**fields)``: how a job ends
    writes only what an end changes (``ENDING``), anything else every column."""
    if fields.keys() <= ENDING:
        return _END, _end_row(new, expected)
    return _REWRITE, _rewrite_row(_values(new), expected)


def _rewrite_row(values: tuple[Any, ...], expected: Status) -> tuple[Any, ...]:
    """``_REWRITE``'s parameters from the record's row (``_values``)."""
    return (*values[5:16], values[17], values[0], values[1], STATUS_TEXT[expected])


def _end_row(new: Materialization, expected: Status) -> tuple[Any, ...]:
    """``_END``'s parameters: the columns a job's end changes. Its texts are storable
    already (``completed`` replaced what a database cannot hold; ``to_json`` refuses it)."""
    return (
        STATUS_TEXT[new.status], _iso(new.completed_at), new.duration_ms, _metadata_json(new), new.error_message,
        new.error_traceback, _iso(new.updated_at), str(new.id), new.tenant_id or "", STATUS_TEXT[expected],
    )


def _rewrite(
    c: sqlite3.Connection, new: Materialization, statement: str, row: tuple[Any, ...], expected: Status,
    lease: Lease | None,
) -> None:
    """The runtime's move of a record it holds the lease for: compare-and-set on the
    status, under the lease's fence; a terminal move releases the lease. ``statement``
    is ``_REWRITE`` or ``_END``, whose ``row`` both end with the update's time, the
    record's id, its tenant and the expected status."""
    stamp, record_id, tenant = row[-4:-1]
    if lease is not None:
        key = (tenant, lease.asset, lease.partition is not None, lease.partition or "")
        if new.status in TERMINAL:  # checked and released in one statement
            success = new.status is Status.SUCCESS
            released = c.execute(
                f"UPDATE flowstone_leases SET owner = '', expires_at = ?, done_id = ?, done_hash = ? "
                f"WHERE {_LEASE_KEY} AND fence = ? AND owner <> '' RETURNING fence",
                (RELEASED, record_id if success else None, new.dependency_hash if success else None,
                 *key, lease.fence),
            ).fetchone()
            if released is None:
                raise lost(lease)
        else:
            held = c.execute(f"SELECT fence, owner FROM flowstone_leases WHERE {_LEASE_KEY}", key).fetchone()
            if held is None or held[0] != lease.fence or held[1] == "":
                raise lost(lease)
    if new.status is Status.SUCCESS:
        c.execute(COUNT)
    try:
        updated = c.execute(statement, row)
    except sqlite3.IntegrityError:
        # The partition has a current success already (the unique index says so):
        # supersede it and write again. Looked for only then: a statement saved on
        # every first success of a partition.
        c.execute(_SUPERSEDE, (stamp, tenant, new.asset_name, new.partition, record_id))
        updated = c.execute(statement, row)
    if updated.rowcount == 0:
        found = c.execute(f"SELECT status FROM {_TABLE} WHERE id = ? AND tenant_id = ?", (record_id, tenant)).fetchone()
        if found is None:
            raise NotFound(f"no materialization with id {str(new.id)!r}", tenant=tenant or None)
        check_transition(Status(found[0]), new.status, new)
        raise InvalidTransition(
            expected, new.status, asset=new.asset_name, partition=new.partition, tenant=new.tenant_id,
            detail="the record changed since it was read (another writer moved it first)",
        )


def _update_status(
    c: sqlite3.Connection, tenant: str, record_id: uuid.UUID, target: Status, changes: dict[str, Any]
) -> Materialization:
    row = _by_id(c, tenant, record_id)
    if row is None:
        raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant or None)
    old = _record(row)
    check_transition(old.status, target, old)
    new = evolve(old, status=target, updated_at=_utcnow(), **changes)
    _rewrite(c, new, _REWRITE, _rewrite_row(_values(new), old.status), old.status, None)
    return new


def _mark_stale(c: sqlite3.Connection, tenant: str, asset_name: str, partition: str | None) -> None:
    """Every success that read ``asset_name@partition``, directly or through others, becomes stale."""
    now = _iso(_utcnow())
    queue = [(asset_name, partition)]
    seen = set(queue)
    while queue:
        asset, key = queue.pop()
        rows = c.execute(  # its readers, found through the reads table (schema version 10)
            f"""UPDATE {_TABLE} SET status = 'stale', updated_at = ?
                WHERE seq IN (SELECT reader FROM flowstone_reads
                              WHERE tenant_id = ? AND asset_name = ? AND partition = coalesce(?, char(0)))
                  AND status = 'success'
                RETURNING asset_name, partition""",
            (now, tenant, asset, key),
        ).fetchall()
        for found in rows:
            if (found[0], found[1]) not in seen:
                seen.add((found[0], found[1]))
                queue.append((found[0], found[1]))


def _read_mark(mark: Any) -> int:
    """A SQLite mark (``successes_after``): how many successes the file had made."""
    body = read_mark(mark, "sqlite")
    if not body.isascii() or not body.isdigit() or len(body) > 20:
        raise bad_mark(mark)
    return int(body)
