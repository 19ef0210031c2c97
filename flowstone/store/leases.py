"""Leases: who computes a partition now, kept in the store so every process sees it.

A lease names one (tenant, asset, partition), its ``owner`` (a process's runtime),
an expiry the owner renews while it works, and a ``fence``: a number that grows with
every grant and is never given twice. A store grants a lease when nobody holds it or
the holder's lease has expired (the holder is presumed dead), writes the record of
the new materialization in the same step, and from then on accepts record writes
under that lease only while its fence is still the current one: a holder whose lease
expired and was taken over gets ``LeaseLost`` and changes nothing (ADR 0009).

The memory store keeps its leases in a :class:`LeaseTable`; PostgreSQL keeps them in
``flowstone_leases``. Both run the same contract suite.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import anyio
import attrs

from ..errors import FlowstoneError, LeaseLost
from ..plumbing.frozen import tuple_maker

if TYPE_CHECKING:
    from .records import Materialization, Status

__all__ = [
    "TICK_STATES",
    "BackfillClaim",
    "CancelRequested",
    "Cursor",
    "End",
    "FinishedElsewhere",
    "Lease",
    "LeaseHeld",
    "LeaseTable",
    "RoleHolder",
    "Start",
    "Tick",
    "in_one_write",
]


class Lease(NamedTuple):
    """Permission, granted by the store, to compute one partition: hand its ``fence``
    with every record write; renew it before it expires. (A named tuple: one is made
    per materialization, and this is the cheapest immutable record.)"""

    tenant: str | None
    asset: str
    partition: str | None
    owner: str
    fence: int


class Start(NamedTuple):
    """One job's ``begin`` among ``begin_many``'s: the record's fields, and ``unless_done``."""

    fields: Mapping[str, Any]
    unless_done: tuple[Any, str] | None = None


class End(NamedTuple):
    """One job's ``complete`` among ``complete_many``'s, with the same arguments."""

    record: Materialization
    status: Status
    lease: Lease | None
    fields: Mapping[str, Any]


# Made once a materialization each: from every field in order (``tuple_maker``).
new_lease = tuple_maker(Lease)
new_start = tuple_maker(Start)
new_end = tuple_maker(End)


Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Outcome = TypeVar("Outcome")


async def in_one_write(
    items: Sequence[Item], prepare: Callable[[Item], Prepared],
    write: Callable[[list[Prepared]], Awaitable[Sequence[Outcome | Exception]]],
) -> list[Outcome | Exception]:
    """A batch of writes (``begin_many``, ``complete_many``), one outcome per item in
    order: ``prepare(item)`` for each (what it raises, a bad record or a value no
    database holds, is that item's outcome alone), then one ``write`` of everything
    prepared, which answers an outcome per prepared item."""
    prepared: list[Prepared] = []
    refused: dict[int, Exception] = {}
    for index, item in enumerate(items):
        try:
            prepared.append(prepare(item))
        except Exception as error:
            refused[index] = error
    written = iter(await write(prepared))
    return [refused[index] if index in refused else next(written) for index in range(len(items))]


class LeaseHeld(FlowstoneError):
    """Another owner holds the lease: wait for it (``store.wait_lease``), then look
    again; its success is probably what this caller wanted."""

    def __init__(
        self, asset: str, partition: str | None, *, owner: str | None, fence: int | None,
        expires_at: datetime | None, tenant: str | None,
    ) -> None:
        self.owner = owner
        self.fence = fence
        self.expires_at = expires_at
        super().__init__(
            f"being computed by {owner or 'another process'} (lease {fence}, expires {expires_at})",
            asset=asset, partition=partition, tenant=tenant,
        )


class FinishedElsewhere(FlowstoneError):
    """``begin(..., unless_done=...)`` found that the partition got the success the
    caller was about to compute after the caller looked: ``record`` is that success."""

    def __init__(self, record: object) -> None:
        self.record = record
        super().__init__("already computed by another process meanwhile")


class CancelRequested(FlowstoneError):
    """Someone asked (``store.request_cancel``, ``flowstone cancel``) that this running
    backfill stop: its owner finds out when it saves its next checkpoint, and stops."""


@attrs.frozen
class BackfillClaim:
    """What ``claim_backfill`` found: the saved backfill, and the owner it was taken
    from when that owner had left it running (dead: its heartbeat was stale)."""

    saved: object
    previous_owner: str | None
    last_seen: datetime | None


TICK_STATES = ("running", "succeeded", "failed", "skipped", "cancelled")


@attrs.frozen
class Tick:
    """One tick of a schedule, recorded once (per tenant, schedule name and tick time):
    who claimed it, and how it ended (``state``: running, succeeded, failed, skipped,
    cancelled: the daemon stopped before it did)."""

    schedule: str
    at: datetime
    owner: str
    state: str = "running"
    run_id: uuid.UUID | None = None
    error: str | None = None
    claimed_at: datetime | None = None
    finished_at: datetime | None = None


@attrs.frozen
class Cursor:
    """What a sensor (or the daemon's automation) keeps between two evaluations: its
    ``value`` (text of its own), the error of its last evaluation (None when it
    worked), and when it was saved."""

    name: str
    value: str | None
    error: str | None = None
    updated_at: datetime | None = None


MAX_CURSOR = 1_000_000
"""Characters a cursor value may hold."""


def cursor_fields(name: Any, value: Any, error: Any) -> tuple[str, str | None, str | None]:
    """``(name, value, error)`` checked for the store; ``DefinitionError`` for a name or
    value that is not text, too long, or holds what a database cannot keep."""
    from ..definitions import FieldError
    from ..errors import DefinitionError
    from ..plumbing.jsonvalues import storable_text, text_problem

    problems = []
    if not isinstance(name, str) or not name or len(name) > 400 or text_problem(name) or not name.isprintable():
        problems.append(FieldError("name", f"must be printable text of 1 to 400 characters, got {name!r}"))
    if value is not None and not isinstance(value, str):
        problems.append(FieldError("cursor", f"must be a str or None, got {type(value).__name__}: {value!r:.80}"))
    elif value is not None and len(value) > MAX_CURSOR:
        problems.append(FieldError("cursor", f"holds {len(value):,} characters; at most {MAX_CURSOR:,}"))
    elif value is not None and (why := text_problem(value)) is not None:
        problems.append(FieldError("cursor", f"holds {why}, which the store cannot keep"))
    if problems:
        raise DefinitionError(problems)
    return name, value, None if error is None else storable_text(str(error))[:10_000]


@attrs.frozen
class RoleHolder:
    """Who holds a role (``"daemon"``: the one active daemon of a store) after a claim:
    its ``owner``, a ``fence`` that grows with every change of holder, when the hold
    ends unless renewed, the owner it was taken from when it had expired, and when
    the owner last claimed or renewed it (its heartbeat)."""

    role: str
    owner: str
    fence: int
    expires_at: datetime
    taken_from: str | None = None
    heartbeat_at: datetime | None = None


def role_seconds(seconds: Any) -> float:
    """How long a role is held: a positive number of seconds; ``DefinitionError`` otherwise."""
    from ..definitions import FieldError
    from ..errors import DefinitionError

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 86400:
        raise DefinitionError([FieldError("seconds", f"must be a number of seconds > 0, got {seconds!r}")])
    return float(seconds)


def tick_time(at: Any) -> datetime:
    """A tick's time in UTC; ``DefinitionError`` unless an aware datetime."""
    from ..schedules import aware_datetime

    return aware_datetime(at, "tick").astimezone(timezone.utc)


def finished_state(state: Any) -> str:
    """How a tick may end; ``DefinitionError`` otherwise."""
    from ..definitions import FieldError
    from ..errors import DefinitionError

    if state not in TICK_STATES[1:]:
        raise DefinitionError(
            [FieldError("state", f"a tick ends succeeded, failed, skipped or cancelled, not {state!r}")])
    return str(state)


def lost(lease: Lease, detail: str = "it expired and another process took the work over") -> LeaseLost:
    return LeaseLost(
        f"the lease (fence {lease.fence}) of {lease.owner} is gone: {detail}",
        asset=lease.asset, partition=lease.partition, tenant=lease.tenant,
    )


# ----------------------------------------------------------- the memory store's

Key = tuple[str | None, str, str | None]


class _Row:
    __slots__ = ("expires_at", "fence", "owner", "record_id", "released")

    def __init__(self, owner: str, fence: int, record_id: uuid.UUID | None, expires_at: float) -> None:
        self.owner = owner
        self.fence = fence
        self.record_id = record_id
        self.expires_at = expires_at  # seconds since the epoch, on the table's clock
        self.released: anyio.Event | None = None  # made when someone waits


class LeaseTable:
    """The memory store's leases. Every method is synchronous: all callers share one
    event loop thread, so each call is atomic, as a statement is in PostgreSQL.
    ``clock`` gives seconds since the epoch (tests pass their own)."""

    TAKEN_OVER_KEPT = 10_000
    RECENT_KEPT = 1024

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.now = clock
        self.rows: dict[Key, _Row] = {}
        self.by_fence: dict[int, Key] = {}
        self.fences = itertools.count(1)
        self.recent: dict[Key, Any] = {}
        """The last success written under a lease, per partition (the newest few): a
        success still queued for the actor is already known to the next ``begin``."""
        self.taken_over: dict[int, None] = {}
        """Fences whose leases expired and went to someone else (the newest few):
        a write already queued under one of them is refused when it is applied."""

    def acquire(
        self, tenant: str | None, asset: str, partition: str | None, owner: str, seconds: float,
        record_id: uuid.UUID | None,
    ) -> tuple[Lease, _Row | None]:
        """Grant the lease or raise ``LeaseHeld``; with it, the expired row it replaced."""
        key = (tenant, asset, partition)
        now = self.now()
        row = self.rows.get(key)
        if row is not None and row.expires_at > now:
            raise LeaseHeld(
                asset, partition, owner=row.owner, fence=row.fence,
                expires_at=datetime.fromtimestamp(row.expires_at, timezone.utc), tenant=tenant,
            )
        if row is not None:
            self._drop(key, row)
            self.taken_over[row.fence] = None
            if len(self.taken_over) > self.TAKEN_OVER_KEPT:
                del self.taken_over[next(iter(self.taken_over))]
        new = _Row(owner, next(self.fences), record_id, now + seconds)
        self.rows[key] = new
        self.by_fence[new.fence] = key
        return new_lease((tenant, asset, partition, owner, new.fence)), row

    def current(self, lease: Lease) -> bool:
        key = self.by_fence.get(lease.fence)
        return key is not None and key == (lease.tenant, lease.asset, lease.partition)

    def check(self, lease: Lease) -> None:
        if not self.current(lease):
            raise lost(lease)

    def release(self, lease: Lease, success: Any = None) -> None:
        key = self.by_fence.get(lease.fence)
        if key is not None:
            self._drop(key, self.rows[key])
            if success is not None:
                self.recent[key] = success
                if len(self.recent) > self.RECENT_KEPT:
                    del self.recent[next(iter(self.recent))]

    def finished(self, key: Key, unless_done: tuple[Any, str] | None) -> Any:
        """The success of ``key`` written after the caller looked, with the caller's
        dependency hash (``unless_done = (id seen, hash)``), or None."""
        if unless_done is None:
            return None
        recent = self.recent.get(key)
        if recent is not None and recent.dependency_hash == unless_done[1] and recent.id != unless_done[0]:
            return recent
        return None

    def renew(self, tenant: str | None, owner: str, fences: Collection[int], seconds: float) -> set[int]:
        until = self.now() + seconds
        kept = set()
        for fence in fences:
            key = self.by_fence.get(fence)
            if key is None or key[0] != tenant:
                continue
            row = self.rows[key]
            if row.owner == owner:
                row.expires_at = until
                kept.add(fence)
        return kept

    def drop_owner(self, tenant: str | None, owner: str) -> None:
        for key, row in list(self.rows.items()):
            if key[0] == tenant and row.owner == owner:
                self._drop(key, row)

    async def wait(self, tenant: str | None, asset: str, partition: str | None, fence: int, timeout: float) -> None:
        """Return once lease ``fence`` is released or has expired, or after ``timeout`` seconds."""
        row = self.rows.get((tenant, asset, partition))
        if row is None or row.fence != fence:
            return
        remaining = row.expires_at - self.now()
        if remaining <= 0:
            return
        if row.released is None:
            row.released = anyio.Event()
        with anyio.move_on_after(min(timeout, remaining)):
            await row.released.wait()

    def _drop(self, key: Key, row: _Row) -> None:
        del self.rows[key]
        self.by_fence.pop(row.fence, None)
        if row.released is not None:
            row.released.set()
