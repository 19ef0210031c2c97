"""The contract every materialization store keeps.

The first seven methods are the public protocol. The rest are what the runtime
needs to plan and record runs in few round trips; every store FlowStone ships
implements them, and the shared contract suite (tests/contracts) checks them all.

A store may also say how many partitions a backfill's worker should take at once
and write in one batch, as ``backfill_chunk`` (an int attribute): SQLite asks for
64 and PostgreSQL for 128, whose writes have fixed costs that more rows share;
without it a backfill takes 16, which suits an in-process store.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from .leases import BackfillClaim, Cursor, End, Lease, RoleHolder, Start, Tick
from .records import Materialization, Status

__all__ = ["MaterializationStore"]


@runtime_checkable
class MaterializationStore(Protocol):
    """Records of materializations, scoped to ``current_tenant()`` on every call."""

    async def create(self, **fields: Any) -> Materialization:
        """A new record in the caller's tenant. Raises ``InvalidIdentifier`` or
        ``InvalidPartition`` for a bad name or key, ``StorageError`` when the
        store cannot write (``DatabaseUnavailable`` when it cannot be reached)."""
        ...

    async def get(self, asset_name: str, partition: Any) -> Materialization:
        """The latest record (any status) for the asset and partition; raises NotFound."""
        ...

    async def get_by_run_id(self, run_id: uuid.UUID | str) -> list[Materialization]:
        """Every record of a run in the caller's tenant, in creation order (an empty
        list for an unknown run). Raises ``NotFound`` for a string that is not a UUID."""
        ...

    async def update_status(self, id: uuid.UUID | str, status: Status | str, **fields: Any) -> Materialization:
        """Move a record along the status machine; raises InvalidTransition otherwise."""
        ...

    async def exists(self, asset_name: str, partition: Any) -> bool: ...

    async def list_by_status(self, status: Status | str, *, limit: int = 100) -> list[Materialization]: ...

    async def list_all(
        self, *, asset_name: str | None = None, limit: int = 1000, before: uuid.UUID | str | None = None
    ) -> list[Materialization]:
        """Records, newest first (of ``asset_name`` when given); with ``before``, the ones
        older than that record (a page after the one that ended with it). ``NotFound``
        when ``before`` is not a record of the caller's tenant."""
        ...

    # ---- what the runtime needs beyond the public protocol

    async def get_by_id(self, id: uuid.UUID | str) -> Materialization:
        """The record with that id in the caller's tenant. Raises ``NotFound``, also
        for another tenant's id and for a string that is not a UUID."""
        ...

    async def latest_successes(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], Materialization]:
        """Latest ``success``/``stale`` record of each (asset, partition key) pair found."""
        ...

    async def partitions_of(self, asset_name: str) -> dict[str | None, Materialization]:
        """Latest ``success``/``stale`` record of every partition of an asset, by key."""
        ...

    async def successes_after(self, asset_name: str, mark: str | None) -> tuple[list[Materialization], str]:
        """The current successes of an asset that became successes in writes this
        store had not shown when it gave out ``mark``, oldest first, and the mark to
        ask with next: what an eager follower of the asset has not seen yet, found
        without reading every partition (the daemon asks every few seconds). A write
        still in flight when the mark was given out may be answered twice, never
        missed, however late it lands or whichever process's clock stamped it.
        ``None``: no records, only the mark of now. A mark is opaque text, kept by the
        caller (in a cursor); one from another kind of store is a DefinitionError."""
        ...

    async def partition_states(self, asset_name: str) -> dict[str | None, Status]:
        """The status of the latest record of every partition of an asset that has
        one, by key: what ``flowstone status`` summarizes (one query, no records built)."""
        ...

    async def complete(
        self, record: Materialization, status: Status, *, lease: Lease | None = None, **fields: Any
    ) -> Materialization:
        """The runtime's own move of a record it holds the lease for (``record`` is
        its current state, in the caller's tenant, else NotFound). Checked against
        the status machine before anything is sent; the store may write it behind,
        but later calls must see it. With ``lease``: refused with ``LeaseLost`` when
        that lease is no longer current; a terminal status releases it. A success
        supersedes the partition's previous current record in the same write."""
        ...

    # ---- single flight across processes (ADR 0009)

    async def begin(
        self, owner: str, seconds: float, *, unless_done: tuple[Any, str] | None = None, **fields: Any
    ) -> tuple[Materialization, Lease]:
        """Take the lease of the record's (tenant, asset, partition) for ``seconds`` and
        create the record (``create(**fields)``) in the same write. Raises ``LeaseHeld``
        while another owner's lease is unexpired; an expired lease is taken over and
        its holder's record, if still open, closed as an orphan. ``unless_done = (id
        seen, dependency hash)``: when the partition's current success has that hash
        and is not the one seen (another process finished it since the caller
        looked), nothing is written and ``FinishedElsewhere`` carries that success.
        An ``id`` already in use is refused as ``create`` refuses it (``DefinitionError``),
        and no lease is kept."""
        ...

    async def begin_many(
        self, owner: str, seconds: float, starts: Sequence[Start]
    ) -> list[tuple[Materialization, Lease] | Exception]:
        """``begin`` for each of ``starts``, in as few writes as the store can (a
        backfill's batch of fast partitions, ADR 0032): one outcome per start, in
        order: the record and lease, or what that start raised (``LeaseHeld``,
        ``FinishedElsewhere``, ...), which changes nothing for the others."""
        ...

    async def complete_many(self, ends: Sequence[End]) -> list[Materialization | Exception]:
        """``complete`` for each of ``ends``, in as few writes as the store can: one
        outcome per end, in order: the new record, or what that end raised
        (``LeaseLost``, ...), which changes nothing for the others."""
        ...

    async def renew_leases(self, owner: str, fences: Collection[int], seconds: float) -> set[int]:
        """Extend ``owner``'s leases (by fence, in the caller's tenant) to ``seconds`` from
        now; the fences still held (the others were taken over or released)."""
        ...

    async def wait_lease(self, asset_name: str, partition: str | None, fence: int, timeout: float) -> None:
        """Return once lease ``fence`` of that partition is released or expired, or
        after ``timeout`` seconds; the caller then looks again."""
        ...

    async def close_orphans(self, owner: str, message: str) -> int:
        """Close every unfinished record ``owner`` (a dead process) left in the caller's
        tenant (running -> failed, pending / waiting_approval -> cancelled, with
        ``message``) and drop its leases; how many records."""
        ...

    async def prune(
        self, asset_name: str, *, keep_last: int | None = None, before: datetime | None = None,
        spare: Collection[str | None] = (), limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` of the asset's history records (superseded, failed,
        cancelled) in the caller's tenant, oldest first: those beyond the ``keep_last``
        newest history records of their partition, or inserted before ``before`` (None:
        no limit of that kind; both None: nothing). Never the latest record of a
        partition, a current or unfinished one, nor a superseded record of a partition
        in ``spare`` (what a stale record may have been built from). How many."""
        ...

    async def prune_finished(self, before: datetime, *, limit: int = 10_000) -> int:
        """Delete up to ``limit`` of the caller's tenant's finished backfills last saved
        before ``before`` (aware) and schedule ticks due before it, except each
        schedule's newest tick (the scheduler goes on from it); a running backfill or
        tick stays. How many rows."""
        ...

    async def mark_stale(self, asset_name: str, partition: str | None) -> None:
        """Make every success built on ``asset@partition`` (transitively) ``stale``;
        may be written behind."""
        ...

    async def save_backfill(self, id: uuid.UUID, state: Any, *, owner: str | None = None) -> None:
        """Keep a backfill's ``Saved`` (spec and status) so it can be reported and resumed,
        and stamp ``owner``'s heartbeat. Raises ``LeaseLost`` when another owner has
        claimed the backfill since, and ``CancelRequested`` (saving nothing) when a
        cancel was asked for and the state saved is still ``running``; saving a final
        state clears the request. A store that serializes may hand back partition
        keys in place of values."""
        ...

    async def decide(self, id: uuid.UUID | str, approve: bool, reason: str | None = None) -> Materialization:
        """Keep the decision on a materialization waiting for approval, for the process
        that runs it (it looks while it waits); the record. Raises ``NotFound`` (none in
        the caller's tenant) or ``InvalidTransition`` (not waiting for approval, or
        decided already)."""
        ...

    async def decision(self, id: uuid.UUID) -> tuple[bool, str | None] | None:
        """The decision kept for that record in the caller's tenant, or None."""
        ...

    # ---- one active daemon

    async def claim_role(self, role: str, owner: str, seconds: float) -> RoleHolder:
        """Hold ``role`` for ``seconds`` from now when it is free, expired or already
        ``owner``'s (a renewal); the holder after the attempt, which is someone else's
        while their hold lasts. Standbys call it to take over a holder that went quiet."""
        ...

    async def release_role(self, role: str, owner: str) -> None:
        """Give ``role`` up if ``owner`` holds it (a standby may take it at once)."""
        ...

    async def role_holder(self, role: str) -> RoleHolder | None:
        """Who holds ``role`` or held it last (its hold may have expired: compare
        ``expires_at`` with now), without claiming it; None when nobody does (never
        held, or released)."""
        ...

    # ---- schedules (the daemon)

    async def claim_tick(self, schedule: str, at: datetime, owner: str) -> bool:
        """Record tick ``at`` (aware) of ``schedule`` as ``owner``'s to run; False when it
        was recorded already (by anyone, ever): a tick is run at most once."""
        ...

    async def finish_tick(
        self, schedule: str, at: datetime, state: str, *, run_id: uuid.UUID | None = None, error: str | None = None
    ) -> None:
        """How a claimed tick ended: ``succeeded``, ``failed``, ``skipped`` or ``cancelled``. Raises
        ``NotFound`` for a tick never claimed, ``DefinitionError`` for another state."""
        ...

    async def last_ticks(self) -> dict[str, Tick]:
        """The newest recorded tick of each schedule, by schedule name."""
        ...

    async def unfinished_ticks(self, *, limit: int = 1000) -> list[Tick]:
        """Ticks claimed and not finished (``running``), oldest first: a daemon that
        becomes active runs again those its predecessor left when it died."""
        ...

    # ---- sensors and automation (the daemon)

    async def load_cursor(self, name: str) -> Cursor | None:
        """The cursor saved under ``name`` in the caller's tenant, or None."""
        ...

    async def save_cursor(self, name: str, value: str | None, *, error: str | None = None) -> None:
        """Keep ``value`` under ``name`` with the outcome of the evaluation that made it
        (``error`` None: it worked). Raises ``DefinitionError`` for a name or value
        that is not text the store can keep."""
        ...

    async def list_cursors(self) -> list[Cursor]:
        """Every cursor of the caller's tenant, by name."""
        ...

    async def request_cancel(self, id: uuid.UUID) -> Any:
        """Ask the owner of a running backfill to stop it (its next save raises
        ``CancelRequested``); the backfill's ``Saved`` as it is now. A backfill that has
        finished is left as it is. Raises ``BackfillNotFound`` (none in the caller's tenant)."""
        ...

    async def claim_backfill(self, id: uuid.UUID, owner: str, *, stale_after: float) -> BackfillClaim:
        """Make ``owner`` the backfill's owner, to resume it. Raises ``BackfillNotFound``
        (no such backfill in the caller's tenant) or ``BackfillOwned`` (still running
        under another owner whose heartbeat is at most ``stale_after`` seconds old)."""
        ...

    async def list_backfills(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        """The ``Saved`` of the caller's tenant's backfills, most recently saved first,
        leaving out the first ``offset`` (a page after those)."""
        ...

    async def list_backfill_statuses(self, *, limit: int = 100, offset: int = 0) -> list[Any]:
        """The ``BackfillStatus`` of the caller's tenant's backfills, in the order of
        ``list_backfills``, without reading their specs (a spec lists every partition
        it was given: a listing that parsed them cost a second per million)."""
        ...

    async def load_backfill(self, id: uuid.UUID) -> Any:
        """The last ``Saved`` of that backfill in the caller's tenant, or None."""
        ...

    async def load_backfill_status(self, id: uuid.UUID) -> Any:
        """The last ``BackfillStatus`` of that backfill in the caller's tenant, or None,
        without reading its spec (what a progress view polls, twice a second)."""
        ...
