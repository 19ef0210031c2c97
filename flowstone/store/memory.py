"""``fs.store.MemoryStore``: records held by the memory-store actor."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ..partitions import serialize_partition
from ..plumbing.clock import utcnow
from ..tenancy import current_tenant
from . import memory_actor as m
from .leases import (
    BackfillClaim,
    Cursor,
    End,
    FinishedElsewhere,
    Lease,
    RoleHolder,
    Start,
    Tick,
    cursor_fields,
    finished_state,
    lost,
    role_seconds,
    tick_time,
)
from .memory_client import MemoryActorClient
from .records import (
    SUCCESS,
    TERMINAL,
    Materialization,
    Status,
    bad_mark,
    check_batch,
    check_before,
    check_limit,
    check_retention,
    completed,
    id_in_use,
    new_record,
    parse_id,
    read_mark,
    to_status,
    update_fields,
)

__all__ = ["MemoryStore"]


class MemoryStore(MemoryActorClient):
    """The reference store: fast, in memory, lost when the process ends.

    ``create`` is a cast: it returns the record without waiting for the actor,
    and the mailbox's order makes it visible to every later call (when no other
    cast is queued, the store writes it at once, where the mailbox would). Leases live in
    the same data and are granted synchronously (one event loop thread: each call
    is atomic). ``now`` is the clock of leases and heartbeats (tests pass their own).
    """

    def __init__(self, *, data: m.MemoryData | None = None, now: Callable[[], datetime] | None = None) -> None:
        super().__init__(data=data if data is not None or now is None else m.MemoryData(now=now))

    async def create(self, **fields: Any) -> Materialization:
        record = new_record(fields, current_tenant(), utcnow())
        if "id" in fields:  # the caller's id may clash: wait for the answer
            return await self.handle.call(m.Create, record=record)
        await self._cast(m.Create(record=record, fresh=True))
        return record

    async def begin(
        self, owner: str, seconds: float, *, unless_done: tuple[Any, str] | None = None, **fields: Any
    ) -> tuple[Materialization, Lease]:
        record, lease, orphan = self._beginning(owner, seconds, unless_done, fields, utcnow())
        create = m.make_create(None, record, orphan, "id" not in fields)
        handle = self._cast_now(create)
        if handle is not None:
            await handle.cast(create)
        return record, lease

    def _beginning(
        self, owner: str, seconds: float, unless_done: tuple[Any, str] | None, fields: Mapping[str, Any],
        now: datetime,
    ) -> tuple[Materialization, Lease, tuple[uuid.UUID, str] | None]:
        """``begin``'s record, its lease (granted here: one event loop thread, so
        atomic) and the record of the expired lease it replaced, to close (``Create``)."""
        tenant = current_tenant()
        record = new_record(fields, tenant, now)
        if "id" in fields and record.id.int in self._data.records:  # whoever's it is, as ``create`` refuses it
            raise id_in_use(record)
        leases = self._data.leases
        done = leases.finished((tenant, record.asset_name, record.partition), unless_done)
        if done is not None:
            raise FinishedElsewhere(done)
        lease, replaced = leases.acquire(tenant, record.asset_name, record.partition, owner, seconds, record.id)
        orphan = (replaced.record_id, replaced.owner) if replaced is not None and replaced.record_id else None
        return record, lease, orphan

    async def begin_many(
        self, owner: str, seconds: float, starts: Sequence[Start]
    ) -> list[tuple[Materialization, Lease] | Exception]:
        """Each ``begin`` in turn, the leases granted here, the records' writes one cast
        (a new record with an id made here as itself, else as ``Create``: see ``Many``); the records
        are inserted at one time, as in one write."""
        outcomes: list[tuple[Materialization, Lease] | Exception] = []
        writes: list[Materialization | m.Create] = []
        now = utcnow()
        for start in starts:
            try:
                record, lease, orphan = self._beginning(owner, seconds, start.unless_done, start.fields, now)
            except Exception as error:
                outcomes.append(error)
            else:
                outcomes.append((record, lease))
                fresh = "id" not in start.fields
                plain = orphan is None and fresh
                writes.append(record if plain else m.Create(record=record, orphan=orphan, fresh=fresh))
        if writes:
            await self._cast(m.Many(writes=tuple(writes)))
        return outcomes

    async def complete_many(self, ends: Sequence[End]) -> list[Materialization | Exception]:
        """Each ``complete`` in turn, the writes one cast; the leases are released
        once it is queued (as ``complete`` does)."""
        outcomes: list[Materialization | Exception] = []
        writes: list[m.Replace] = []
        ended: list[tuple[End, Materialization]] = []
        released: set[int] = set()
        tenant, now = current_tenant(), utcnow()
        for end in ends:
            try:
                if end.lease is not None and end.lease.fence in released:  # a job given twice: the first released it
                    raise lost(end.lease)
                new, write = self._ending(end.record, end.status, end.lease, end.fields, tenant, now)
            except Exception as error:
                outcomes.append(error)
                continue
            outcomes.append(new)
            writes.append(write)
            ended.append((end, new))
            if end.lease is not None and end.status in TERMINAL:
                released.add(end.lease.fence)
        if writes:
            await self._cast(m.Many(writes=tuple(writes)))
        for end, new in ended:
            self._release(end.lease, end.status, new)
        return outcomes

    async def renew_leases(self, owner: str, fences: Collection[int], seconds: float) -> set[int]:
        return self._data.leases.renew(current_tenant(), owner, fences, seconds)

    async def wait_lease(self, asset_name: str, partition: str | None, fence: int, timeout: float) -> None:
        await self._data.leases.wait(current_tenant(), asset_name, partition, fence, timeout)

    async def close_orphans(self, owner: str, message: str) -> int:
        return await self.handle.call(m.CloseOrphans, tenant=current_tenant(), owner=owner, message=message)

    async def get(self, asset_name: str, partition: Any = None) -> Materialization:
        return await self.handle.call(
            m.Latest, tenant=current_tenant(), asset=asset_name, partition=serialize_partition(partition)
        )

    async def get_by_id(self, id: uuid.UUID | str) -> Materialization:
        return await self.handle.call(m.ById, tenant=current_tenant(), id=parse_id(id))

    async def get_by_run_id(self, run_id: uuid.UUID | str) -> list[Materialization]:
        return await self.handle.call(m.ByRun, tenant=current_tenant(), run_id=parse_id(run_id, "run"))

    async def update_status(self, id: uuid.UUID | str, status: Status | str, **fields: Any) -> Materialization:
        return await self.handle.call(
            m.Update, tenant=current_tenant(), id=parse_id(id), status=to_status(status), fields=update_fields(fields)
        )

    async def complete(
        self, record: Materialization, status: Status, *, lease: Lease | None = None, **fields: Any
    ) -> Materialization:
        """The runtime's own transition of a record it holds the lease for: checked
        here, written behind (a cast); later calls see it, in mailbox order."""
        new, write = self._ending(record, status, lease, fields, current_tenant(), utcnow())
        handle = self._cast_now(write)
        if handle is not None:
            await handle.cast(write)
        self._release(lease, status, new)
        return new

    def _ending(
        self, record: Materialization, status: Status, lease: Lease | None, fields: Mapping[str, Any],
        tenant: str | None, now: datetime,
    ) -> tuple[Materialization, m.Replace]:
        """``complete``'s new record, checked (its lease still held), and the write
        that stores it."""
        new = completed(record, status, fields, tenant, now)
        if lease is not None:
            self._data.leases.check(lease)
        return new, m.make_replace(None, new, record.status, lease)

    def _release(self, lease: Lease | None, status: Status, new: Materialization) -> None:
        """After the write is queued, a terminal move releases its lease: whoever
        takes the lease next queues after it, so sees the record (and its success) first."""
        if lease is not None and status in TERMINAL:
            self._data.leases.release(lease, new if status is SUCCESS else None)

    async def exists(self, asset_name: str, partition: Any = None) -> bool:
        return await self.handle.call(
            m.Exists, tenant=current_tenant(), asset=asset_name, partition=serialize_partition(partition)
        )

    async def list_by_status(self, status: Status | str, *, limit: int = 100) -> list[Materialization]:
        return await self.handle.call(
            m.ByStatus, tenant=current_tenant(), status=to_status(status), limit=check_limit(limit))

    async def list_all(
        self, *, asset_name: str | None = None, limit: int = 1000, before: uuid.UUID | str | None = None
    ) -> list[Materialization]:
        return await self.handle.call(m.All, tenant=current_tenant(), asset=asset_name, limit=check_limit(limit),
                                      before=None if before is None else parse_id(before))

    async def latest_successes(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], Materialization]:
        return await self.handle.call(m.LatestSuccesses, tenant=current_tenant(), pairs=tuple(pairs))

    async def partitions_of(self, asset_name: str) -> dict[str | None, Materialization]:
        return await self.handle.call(m.AllPartitions, tenant=current_tenant(), asset=asset_name)

    async def successes_after(self, asset_name: str, mark: str | None) -> tuple[list[Materialization], str]:
        after = None if mark is None else _read_mark(mark)
        return await self.handle.call(m.SuccessesAfter, tenant=current_tenant(), asset=asset_name, after=after,
                                      start=mark is None)

    async def partition_states(self, asset_name: str) -> dict[str | None, Status]:
        return await self.handle.call(m.PartitionStates, tenant=current_tenant(), asset=asset_name)

    async def prune(
        self, asset_name: str, *, keep_last: int | None = None, before: datetime | None = None,
        spare: Collection[str | None] = (), limit: int = 10_000,
    ) -> int:
        keep_last, limit = check_retention(keep_last, limit)
        return await self.handle.call(m.Prune, tenant=current_tenant(), asset=asset_name, keep_last=keep_last,
                                      before=before, spare=frozenset(spare), limit=limit)

    async def prune_finished(self, before: datetime, *, limit: int = 10_000) -> int:
        return await self.handle.call(m.PruneFinished, tenant=current_tenant(), before=check_before(before),
                                      limit=check_batch(limit))

    async def mark_stale(self, asset_name: str, partition: str | None) -> None:
        await self._cast(m.MarkStale(tenant=current_tenant(), asset=asset_name, partition=partition))

    async def save_backfill(self, id: uuid.UUID, state: Any, *, owner: str | None = None) -> None:
        await self.handle.call(m.SaveBackfill, tenant=current_tenant(), id=id, state=state, owner=owner)

    async def claim_backfill(self, id: uuid.UUID, owner: str, *, stale_after: float) -> BackfillClaim:
        return await self.handle.call(
            m.ClaimBackfill, tenant=current_tenant(), id=id, owner=owner, stale_after=stale_after)

    async def decide(self, id: uuid.UUID | str, approve: bool, reason: str | None = None) -> Materialization:
        return await self.handle.call(m.Decide, tenant=current_tenant(), id=parse_id(id), approve=approve,
                                      reason=reason)

    async def decision(self, id: uuid.UUID) -> tuple[bool, str | None] | None:
        return await self.handle.call(m.DecisionOf, tenant=current_tenant(), id=parse_id(id))

    async def claim_role(self, role: str, owner: str, seconds: float) -> RoleHolder:
        return await self.handle.call(m.ClaimRole, tenant=current_tenant(), role=role, owner=owner,
                                      seconds=role_seconds(seconds))

    async def release_role(self, role: str, owner: str) -> None:
        await self.handle.call(m.ReleaseRole, tenant=current_tenant(), role=role, owner=owner)

    async def role_holder(self, role: str) -> RoleHolder | None:
        return await self.handle.call(m.HolderOf, tenant=current_tenant(), role=role)

    async def claim_tick(self, schedule: str, at: datetime, owner: str) -> bool:
        return await self.handle.call(m.ClaimTick, tenant=current_tenant(), schedule=schedule, at=tick_time(at),
                                      owner=owner)

    async def finish_tick(
        self, schedule: str, at: datetime, state: str, *, run_id: uuid.UUID | None = None, error: str | None = None
    ) -> None:
        await self.handle.call(m.FinishTick, tenant=current_tenant(), schedule=schedule, at=tick_time(at),
                               state=finished_state(state), run_id=run_id, error=error)

    async def last_ticks(self) -> dict[str, Tick]:
        return await self.handle.call(m.LastTicks, tenant=current_tenant())

    async def unfinished_ticks(self, *, limit: int = 1000) -> list[Tick]:
        return await self.handle.call(m.UnfinishedTicks, tenant=current_tenant(), limit=check_limit(limit))

    async def load_cursor(self, name: str) -> Cursor | None:
        return await self.handle.call(m.LoadCursor, tenant=current_tenant(), name=cursor_fields(name, None, None)[0])

    async def save_cursor(self, name: str, value: str | None, *, error: str | None = None) -> None:
        name, value, error = cursor_fields(name, value, error)
        await self.handle.call(m.SaveCursor, tenant=current_tenant(), cursor=Cursor(name, value, error, utcnow()))

    async def list_cursors(self) -> list[Cursor]:
        return await self.handle.call(m.ListCursors, tenant=current_tenant())

    async def request_cancel(self, id: uuid.UUID) -> Any:
        return await self.handle.call(m.RequestCancel, tenant=current_tenant(), id=parse_id(id, "backfill"))

    async def list_backfills(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        return await self.handle.call(m.ListBackfills, tenant=current_tenant(), limit=check_limit(limit),
                                      offset=check_limit(offset, "offset"))

    async def list_backfill_statuses(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        return [saved.status for saved in await self.list_backfills(limit=limit, offset=offset)]

    async def load_backfill(self, id: uuid.UUID) -> Any:
        return await self.handle.call(m.LoadBackfill, tenant=current_tenant(), id=id)

    async def load_backfill_status(self, id: uuid.UUID) -> Any:
        saved = await self.load_backfill(id)
        return None if saved is None else saved.status


def _read_mark(mark: Any) -> tuple[int, datetime | None] | None:
    """A memory store's mark (``successes_after``): the id and time of the newest
    success when it was given out, or None when there was none."""
    body = read_mark(mark, "memory")
    if not body:
        return None
    key, _, stamp = body.partition("@")
    try:
        when = datetime.fromisoformat(stamp) if stamp else None
        if when is not None and when.tzinfo is None:
            raise ValueError(stamp)
        return int(key, 16), when
    except ValueError:
        raise bad_mark(mark) from None
