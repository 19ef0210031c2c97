"""The embedded store's ``begin_many`` and ``complete_many`` as set-based statements.

A backfill's batch begins and ends many partitions of one asset at once. Written
a job at a time, each costs four statements (take the lease, insert the record;
release the lease, end the record), and a statement's fixed cost (finding it in
the cache, binding, starting its program and its triggers') is much of what
SQLite spends. Here the common case takes one statement per step for the whole
group: partitions whose lease is free (never held, or released without a success
that would make the caller's work redundant), ending with only what an end changes
(ADR 0031), under the lease they began with.

Anything else is left to the one-job path (``alone``), which knows every case (a
lease held or left behind by a dead holder, a success another process finished, a
record that moved meanwhile) and says which job failed why. The set-based step is
tried in a savepoint; if it does not touch exactly the rows expected, it is rolled
back and its jobs go the one-job way: the outcome is the same, only slower.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .leases import Lease
from .records import CURRENT, TERMINAL, Materialization, Status
from .sqlite_batches import Failed, in_savepoint
from .sqlite_schema import COUNT, RECORD_COLUMNS, RELEASED, WRITTEN

__all__ = ["Beginning", "Ending", "begin_together", "end_together"]

MAX_ROWS = 50
"""Rows per statement: 50 records of 18 columns stay under the 999 parameters of
the oldest SQLite builds."""

@attrs.frozen
class Beginning:
    """One job of ``begin_many``: its new record, the record's row (in
    ``RECORD_COLUMNS`` order) and the caller's ``unless_done``."""

    record: Materialization
    values: tuple[Any, ...]
    unless_done: tuple[Any, str] | None


@attrs.frozen
class Ending:
    """One job of ``complete_many``: the record as it ends, the status it had, its
    lease, and the parameters of the store's one-record statement; ``only_ending``
    when that is the end statement (an end changing only ``ENDING`` fields), whose
    parameters are the status, completion time, duration, metadata, error message
    and traceback, update time, id, tenant and expected status."""

    new: Materialization
    expected: Status
    lease: Lease | None
    row: tuple[Any, ...]
    only_ending: bool


class _Moved(Exception):
    """A set-based step touched other rows than expected: roll it back, go one by one."""


def begin_together(
    c: sqlite3.Connection, tenant: str, jobs: Sequence[Beginning], owner: str, expires_at: float,
    alone: Callable[[int, sqlite3.Connection], int],
) -> list[int | Failed]:
    """Each job's fence (or ``Failed``): the free leases taken and their records
    inserted in a few statements, the other jobs through ``alone(index, c)``."""
    together = _free(c, tenant, jobs) if len(jobs) > 1 else []
    fences: Any = {}
    if len(together) > 1:
        fences = in_savepoint(c, functools.partial(
            _take_and_insert, tenant=tenant, jobs=[jobs[i] for i in together], owner=owner, expires_at=expires_at))
        fences = {} if isinstance(fences, Failed) else dict(zip(together, fences, strict=True))
    return [fences[i] if i in fences else in_savepoint(c, functools.partial(alone, i))
            for i in range(len(jobs))]


def end_together(
    c: sqlite3.Connection, tenant: str, jobs: Sequence[Ending], alone: Callable[[int, sqlite3.Connection], None],
) -> list[Failed | None]:
    """Each job's outcome (None, or ``Failed``): the common ends written in a few
    statements, the other jobs through ``alone(index, c)``."""
    together = _simple_ends(jobs)
    done = False
    if len(together) > 1:
        done = not isinstance(
            in_savepoint(c, functools.partial(_release_and_end, tenant=tenant, jobs=[jobs[i] for i in together])),
            Failed)
    chosen = set(together) if done else set()
    return [None if i in chosen else in_savepoint(c, functools.partial(alone, i))
            for i in range(len(jobs))]


# ------------------------------------------------------------------ beginnings


def _free(c: sqlite3.Connection, tenant: str, jobs: Sequence[Beginning]) -> list[int]:
    """The jobs (indexes) whose partition's lease is free for the taking: nobody
    ever held it, or it was released and names no success of the caller's inputs
    that the caller has not seen (``unless_done``). A key twice is never free."""
    keys: dict[tuple[str, bool, str], list[int]] = {}
    for index, job in enumerate(jobs):
        record = job.record
        if record.status in CURRENT:
            continue
        keys.setdefault((record.asset_name, record.partition is not None, record.partition or ""), []).append(index)
    found: dict[tuple[str, bool, str], tuple[Any, ...]] = {}
    groups: dict[tuple[str, bool], list[str]] = {}
    for asset, partitioned, partition in keys:
        groups.setdefault((asset, partitioned), []).append(partition)
    for (asset, partitioned), partitions in groups.items():
        for start in range(0, len(partitions), MAX_ROWS):
            chunk = partitions[start:start + MAX_ROWS]
            for partition, *row in c.execute(_sql(_LEASES, 1, len(chunk)), (tenant, asset, partitioned, *chunk)):
                found[asset, partitioned, partition] = tuple(row)
    free = []
    for key, indexes in keys.items():
        if len(indexes) != 1:
            continue
        held = found.get(key)
        if held is None or (held[0] == "" and not _finished_elsewhere(held, jobs[indexes[0]].unless_done)):
            free.append(indexes[0])
    return sorted(free)


def _finished_elsewhere(held: tuple[Any, ...], unless_done: tuple[Any, str] | None) -> bool:
    """Whether a released lease names a success of the caller's inputs that the
    caller did not see: the one-job path looks at that success."""
    _owner, done_id, done_hash = held
    if unless_done is None or done_id is None:
        return False
    seen = None if unless_done[0] is None else str(unless_done[0])
    return bool(done_hash == unless_done[1] and done_id != seen)


def _take_and_insert(
    c: sqlite3.Connection, tenant: str, jobs: Sequence[Beginning], owner: str, expires_at: float,
) -> list[int]:
    """Take the jobs' leases (the next fences, in order) and insert their records."""
    top = c.execute("SELECT coalesce(max(fence), 0) FROM flowstone_leases").fetchone()[0]
    fences = list(range(top + 1, top + 1 + len(jobs)))
    for start in range(0, len(jobs), MAX_ROWS):
        chunk = jobs[start:start + MAX_ROWS]
        leases: list[Any] = []
        for fence, job in zip(fences[start:], chunk, strict=False):
            record = job.record
            leases += (tenant, record.asset_name, record.partition is not None, record.partition or "", owner, fence,
                       job.values[0], expires_at)
        c.execute(_sql(_TAKE, 8, len(chunk)), leases)
        c.execute(_sql(_INSERT, 18, len(chunk)), [value for job in chunk for value in job.values])
    return fences


# --------------------------------------------------------------------- endings


def _simple_ends(jobs: Sequence[Ending]) -> list[int]:
    """The jobs (indexes) whose end the set-based step can write: a terminal move
    of a partitioned record under its lease, changing only what an end changes,
    each (asset, partition) once."""
    seen: dict[tuple[str, str], int] = {}
    twice = set()
    for index, job in enumerate(jobs):
        new = job.new
        if job.lease is None or not job.only_ending or new.status not in TERMINAL or new.partition is None:
            continue
        key = (new.asset_name, new.partition)
        if key in seen:
            twice.add(key)
        seen[key] = index
    return sorted(index for key, index in seen.items() if key not in twice)


def _release_and_end(c: sqlite3.Connection, tenant: str, jobs: Sequence[Ending]) -> None:
    """Release the jobs' leases (naming their successes), supersede the current
    records their successes replace, and end their records; ``_Moved`` when a
    lease or a record is not as the job left it (the savepoint is rolled back)."""
    for start in range(0, len(jobs), MAX_ROWS):
        chunk = jobs[start:start + MAX_ROWS]
        leases: list[Any] = []
        ends: list[Any] = []
        successes: dict[str, list[str]] = {}
        for job in chunk:
            new, lease = job.new, job.lease
            assert lease is not None and new.partition is not None
            success = new.status is Status.SUCCESS
            record_id = str(new.id)
            leases += (lease.asset, lease.partition or "", lease.fence, record_id if success else None,
                       new.dependency_hash if success else None)
            ends += (*job.row[:8], job.row[9])  # all but the tenant, named once
            if success:
                successes.setdefault(new.asset_name, []).append(new.partition)
        if c.execute(_sql(_RELEASE, 5, len(chunk)), (RELEASED, *leases, tenant)).rowcount != len(chunk):
            raise _Moved("a lease is not the one the job holds")
        stamp = ends[6]
        for asset, partitions in successes.items():
            c.execute(_sql(_SUPERSEDE, 1, len(partitions)), (stamp, tenant, asset, *partitions))
        if successes:
            c.execute(COUNT)
        if c.execute(_sql(_END, 9, len(chunk)), (*ends, tenant)).rowcount != len(chunk):
            raise _Moved("a record moved since the job read it")


# ------------------------------------------------------------------ statements

_LEASES = (
    "SELECT partition, owner, done_id, done_hash FROM flowstone_leases "
    "WHERE tenant_id = ? AND asset_name = ? AND partitioned = ? AND partition IN {rows}"
)
_TAKE = (
    "INSERT INTO flowstone_leases (tenant_id, asset_name, partitioned, partition, owner, fence, record_id, "
    "expires_at) VALUES {rows} "
    "ON CONFLICT (tenant_id, asset_name, partitioned, partition) DO UPDATE SET owner = excluded.owner, "
    "fence = excluded.fence, record_id = excluded.record_id, expires_at = excluded.expires_at, "
    "done_id = NULL, done_hash = NULL"
)
_INSERT = f"INSERT INTO flowstone_materializations ({RECORD_COLUMNS}) VALUES {{rows}}"
_RELEASE = (
    "UPDATE flowstone_leases SET owner = '', expires_at = ?, done_id = v.column4, done_hash = v.column5 "
    "FROM (VALUES {rows}) AS v "
    "WHERE tenant_id = ? AND asset_name = v.column1 AND partitioned = 1 AND partition = v.column2 "
    "AND fence = v.column3 AND owner <> ''"
)
_SUPERSEDE = (
    "UPDATE flowstone_materializations SET status = 'superseded', updated_at = ? "
    "WHERE tenant_id = ? AND asset_name = ? AND partition IN {rows} AND status IN ('success', 'stale')"
)
_END = (
    "UPDATE flowstone_materializations SET status = v.column1, completed_at = v.column2, "
    "duration_ms = v.column3, metadata = v.column4, error_message = v.column5, error_traceback = v.column6, "
    f"updated_at = v.column7, {WRITTEN} FROM (VALUES {{rows}}) AS v "
    "WHERE id = v.column8 AND tenant_id = ? AND status = v.column9"
)


@functools.lru_cache(maxsize=256)
def _sql(template: str, columns: int, rows: int) -> str:
    """``template`` with its ``{rows}``: ``rows`` groups of ``columns`` parameters (a
    multi-row VALUES list; with one column, a list for IN)."""
    if columns == 1:
        return template.format(rows=f"({', '.join('?' * rows)})")
    one = f"({', '.join('?' * columns)})"
    return template.format(rows=", ".join([one] * rows))
