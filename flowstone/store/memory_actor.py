"""The memory-store actor: materialization records and stored values, in memory.

One actor serves both ``fs.store.MemoryStore`` (records) and ``fs.io.MemoryIO``
(values), so one order holds every write: a record that says ``success`` is never
visible before its value is. A write cast while no other cast waits in the
mailbox is handled by the client in its own step (``InPlace``), which is where
the mailbox would have put it.

The data lives in :class:`MemoryData`, which the supervisor hands to each
incarnation: a restart after a crash loses no record or value (handlers check
everything before they change anything, so a crash cannot leave half a write).
Every key starts with the tenant, which the *client* reads from
``current_tenant()`` in the caller's task and puts in the message.
"""

from __future__ import annotations

import itertools
import logging
import marshal
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, TypeVar

import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from ..actors.mailbox import Crash, Handle, Message, serve
from ..errors import (
    ActorCrashed,
    BackfillNotFound,
    BackfillOwned,
    FlowstoneError,
    LeaseLost,
    NotFound,
)
from ..plumbing.clock import utcnow
from ..plumbing.frozen import builder
from ..plumbing.ids import uuid_of
from .leases import BackfillClaim, CancelRequested, Cursor, Lease, LeaseTable, RoleHolder, Tick, lost
from .records import (
    ACTIVE,
    CURRENT,
    EMPTY,
    HISTORY,
    ORPHAN_ENDING,
    POSITION,
    STATUS_OF,
    STATUS_TEXT,
    SUCCESS,
    Materialization,
    Status,
    build,
    check_decidable,
    check_transition,
    evolve,
    id_in_use,
    values_of,
)

__all__ = ["MemoryData", "memory_actor"]

log = logging.getLogger("flowstone.store")

Key = tuple[str | None, str, str | None]
"""(tenant, asset name, partition key)"""


class StoredValue(NamedTuple):
    """A value and when it was stored, as ``GetValue(with_meta=True)`` answers."""

    value: Any
    updated_at: datetime


@attrs.define
class BackfillRow:
    saved: Any
    owner: str | None
    heartbeat_at: datetime
    cancel: bool = False


_ASSET, _PARTITION, _STATUS, _INSERTED = (
    POSITION[name] for name in ("asset_name", "partition", "status", "inserted_at"))


def _pack(record: Materialization) -> bytes | None:
    """A finished record as bytes: its fields in their order (``FIELDS``), through
    ``marshal``, with ids as integers, times as seconds, the status as its value and
    mappings as their items; None when it holds what cannot be packed back exactly:
    a time not in UTC, metadata that is not plain data. (Written out, not looped
    over the fields: a store packs each record it keeps, and the loop and the list it
    filled were half of the cost.)"""
    (id_, asset, partition, run, status, started, completed, duration, upstream_assets, upstream, digest, metadata,
     error, node, tenant, inserted, updated, trace) = values_of(record)
    utc = timezone.utc
    if ((started is not None and started.tzinfo is not utc) or (completed is not None and completed.tzinfo is not utc)
            or (inserted is not None and inserted.tzinfo is not utc)
            or (updated is not None and updated.tzinfo is not utc)):
        return None
    values = (
        id_.int, asset, partition, run.int, STATUS_TEXT[status], None if started is None else started.timestamp(),
        None if completed is None else completed.timestamp(), duration, upstream_assets, tuple(upstream.items()),
        digest, tuple(metadata.items()), error, node, tenant, None if inserted is None else inserted.timestamp(),
        None if updated is None else updated.timestamp(), trace,
    )
    try:
        return marshal.dumps(values)
    except ValueError:  # marshal refuses what is not plain data
        return None


def _unpack(packed: bytes) -> Materialization:
    """The record ``_pack`` made ``packed`` from. A time comes back exact to the
    microsecond (a float holds it for any time of the years 1900-2200, checked over a
    million of them)."""
    (id_, asset, partition, run, status, started, completed, duration, upstream_assets, upstream, digest, metadata,
     error, node, tenant, inserted, updated, trace) = marshal.loads(packed)
    at, utc = datetime.fromtimestamp, timezone.utc
    return build((
        uuid_of(id_), asset, partition, uuid_of(run), STATUS_OF[status], None if started is None else at(started, utc),
        None if completed is None else at(completed, utc), duration, upstream_assets, dict(upstream), digest,
        dict(metadata), error, node, tenant, None if inserted is None else at(inserted, utc),
        None if updated is None else at(updated, utc), trace,
    ))


class Records:
    """The store's records by id (its integer). A finished record is packed in bytes
    (``_pack``), which the garbage collector never walks, once ``RECENT`` newer
    finished records came after it; until then it is kept as it is, with the records
    still moving and those that cannot be packed back exactly. At 100,000 stored
    records, walking each record and its two UUIDs at every full collection had cost a
    quarter of each backfilled partition's time, and more with every record; a short
    run (a chain of assets) packs nothing."""

    RECENT = 1024

    __slots__ = ("_live", "_packed", "_recent")

    def __init__(self) -> None:
        self._live: dict[int, Materialization] = {}
        self._packed: dict[int, bytes] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()
        """The finished records of ``_live``, oldest first: packed in that order. (An
        ``OrderedDict``: a plain dict used as a queue keeps the slots of the keys taken
        from its front until it is resized, and finding its first key walked past them,
        ~0.5 µs a record.)"""

    def __contains__(self, key: int) -> bool:
        return key in self._live or key in self._packed

    def get(self, key: int) -> Materialization | None:
        live = self._live.get(key)
        if live is not None:
            return live
        packed = self._packed.get(key)
        return None if packed is None else _unpack(packed)

    def __getitem__(self, key: int) -> Materialization:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def asset_of(self, key: int) -> str:
        """A stored record's asset, without building the record back when it is packed
        (a listing of one asset's records tests every newer record of the tenant)."""
        live = self._live.get(key)
        if live is not None:
            return live.asset_name
        asset: str = marshal.loads(self._packed[key])[_ASSET]
        return asset

    def brief(self, key: int) -> tuple[str, str | None, Status, datetime | None]:
        """A stored record's asset, partition key, status and insertion time, without
        building the record back when it is packed (retention reads these of every
        history record, and deletes few of them)."""
        live = self._live.get(key)
        if live is not None:
            return live.asset_name, live.partition, live.status, live.inserted_at
        values = marshal.loads(self._packed[key])
        inserted = values[_INSERTED]
        return (values[_ASSET], values[_PARTITION], STATUS_OF[values[_STATUS]],
                None if inserted is None else datetime.fromtimestamp(inserted, timezone.utc))

    def add(self, record: Materialization) -> None:
        """A new record (its id is in neither map: nothing to take out first)."""
        key = record.id.int
        self._live[key] = record
        if record.status not in ACTIVE:
            self._finished(key)

    def put(self, record: Materialization) -> None:
        """A record, new or replacing the one with its id. A record still live is
        replaced without asking the packed records (the larger map by far) for it."""
        key, live = record.id.int, self._live
        if key in live:
            self._recent.pop(key, None)
        else:
            self._packed.pop(key, None)
        live[key] = record
        if record.status not in ACTIVE:
            self._finished(key)

    def _finished(self, key: int) -> None:
        """``key``'s record is finished: the newest of those that wait to be packed."""
        recent = self._recent
        recent[key] = None
        if len(recent) > self.RECENT:
            self._pack_oldest()

    def _pack_oldest(self) -> None:
        key = self._recent.popitem(last=False)[0]
        packed = _pack(self._live[key])
        if packed is not None:  # else it stays as it is: a time not in UTC, metadata not plain
            self._packed[key] = packed
            del self._live[key]

    def __delitem__(self, key: int) -> None:
        self._recent.pop(key, None)
        if self._packed.pop(key, None) is None:
            del self._live[key]


class KeyMap:
    """A map from (tenant, asset, partition key) to values, as dicts nested by tenant
    and asset: with plain values (ids, statuses, numbers, strings) the innermost dicts
    are never tracked by the garbage collector. Keyed by the triple itself, a dict
    holding only plain data was untracked at a full collection and tracked again, as a
    young object, by the next new key (a tuple): every young collection then walked it
    whole."""

    __slots__ = ("_tenants",)

    def __init__(self) -> None:
        self._tenants: dict[str | None, dict[str, dict[str | None, Any]]] = {}

    def of(self, tenant: str | None, asset: str) -> Mapping[str | None, Any]:
        """The partitions of ``asset`` (read only)."""
        return self._found(tenant, asset) or EMPTY

    def _found(self, tenant: str | None, asset: str) -> dict[str | None, Any] | None:
        assets = self._tenants.get(tenant)
        return None if assets is None else assets.get(asset)

    def get(self, key: Key, default: Any = None) -> Any:
        assets = self._tenants.get(key[0])  # _found, inline: a materialization asks this several times
        partitions = None if assets is None else assets.get(key[1])
        return default if partitions is None else partitions.get(key[2], default)

    def __contains__(self, key: Key) -> bool:
        return key[2] in self.of(key[0], key[1])

    def _partitions(self, tenant: str | None, asset: str) -> dict[str | None, Any]:
        assets = self._tenants.get(tenant)
        if assets is None:
            assets = self._tenants[tenant] = {}
        partitions = assets.get(asset)
        if partitions is None:
            partitions = assets[asset] = {}
        return partitions

    def __setitem__(self, key: Key, value: Any) -> None:
        assets = self._tenants.get(key[0])
        partitions = None if assets is None else assets.get(key[1])
        if partitions is None:  # the asset's first key (each of a chain's assets meets this)
            if assets is None:
                assets = self._tenants[key[0]] = {}
            partitions = assets[key[1]] = {}
        partitions[key[2]] = value

    def setdefault(self, key: Key, value: Any) -> Any:
        return self._partitions(key[0], key[1]).setdefault(key[2], value)

    def pop(self, key: Key, default: Any = None) -> Any:
        partitions = self._found(key[0], key[1])
        return default if partitions is None else partitions.pop(key[2], default)


@attrs.define
class MemoryData:
    """Everything the actor keeps, with the indexes its queries need.

    ``now`` is the clock of leases and backfill heartbeats (tests pass their own to
    make time pass without waiting)."""

    # What grows with the records is kept where the garbage collector never looks:
    # records packed in bytes, indexes keyed and valued by plain data (ids as their
    # integers) in dicts that no new tuple enters (ADR 0037).
    records: Records = attrs.field(factory=lambda: Records())
    latest: KeyMap = attrs.field(factory=lambda: KeyMap())
    """Per partition, its newest record's id."""
    latest_status: KeyMap = attrs.field(factory=lambda: KeyMap())
    """Per partition, its newest record's status (its value)."""
    latest_success: KeyMap = attrs.field(factory=lambda: KeyMap())
    by_tenant: dict[str | None, dict[int, None]] = attrs.field(factory=dict)
    by_run: dict[str | None, dict[int, int]] = attrs.field(factory=dict)
    """Per tenant, run id (an int) -> the run's one record id."""
    by_run_many: dict[tuple[str | None, int], list[int]] = attrs.field(factory=dict)
    """The runs with several records (materializations of several assets): their ids."""
    by_status: dict[tuple[str | None, Status], dict[int, None]] = attrs.field(factory=dict)
    readers: KeyMap = attrs.field(factory=lambda: KeyMap())
    """Per upstream partition, the ids of the successes that read it (a dict of them)."""
    values: KeyMap = attrs.field(factory=lambda: KeyMap())
    stored_at: KeyMap = attrs.field(factory=lambda: KeyMap())
    """When each value was stored (apart from the values: a pair would be a new tuple)."""
    backfills: dict[tuple[str | None, uuid.UUID], BackfillRow] = attrs.field(factory=dict)
    decisions: dict[tuple[str | None, uuid.UUID], tuple[bool, str | None]] = attrs.field(factory=dict)
    ticks: dict[tuple[str | None, str, datetime], Tick] = attrs.field(factory=dict)
    roles: dict[tuple[str | None, str], RoleHolder] = attrs.field(factory=dict)
    cursors: dict[tuple[str | None, str], Cursor] = attrs.field(factory=dict)
    now: Callable[[], datetime] = utcnow
    leases: LeaseTable = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        clock = self.now
        self.leases = LeaseTable() if clock is utcnow else LeaseTable(lambda: clock().timestamp())


# ------------------------------------------------------------------- messages


R = TypeVar("R")


@attrs.frozen(kw_only=True)
class _AtKey(Message[R]):
    """A message about one (tenant, asset, partition key)."""

    tenant: str | None
    asset: str
    partition: str | None

@attrs.frozen(kw_only=True)
class Create(Message[Materialization]):
    """A new record. ``orphan``: the record of an expired lease this one's lease
    replaced, closed in the same step. Sent as a call when the caller of ``create``
    chose the id (it may clash), as a cast otherwise."""

    record: Materialization
    orphan: tuple[uuid.UUID, str] | None = None
    fresh: bool = False
    """Whether the record's id was made by ``new_uuid`` for it: then it is in no
    map yet, and is not looked for (at a million records, one look fewer into the
    largest map a record)."""


@attrs.frozen(kw_only=True)
class Update(Message[Materialization]):
    tenant: str | None
    id: uuid.UUID
    status: Status
    fields: dict[str, Any]


@attrs.frozen(kw_only=True)
class Replace(Message[None]):
    """Write-behind of a transition the runtime owns: ``record`` replaces the
    stored one if that one is still in ``expected`` status, and unless ``lease``
    was taken over between the client's check and now."""

    record: Materialization
    expected: Status
    lease: Lease | None = None


@attrs.frozen(kw_only=True)
class Many(Message[None]):
    """Several write-behind ``Create`` and ``Replace`` casts as one message (a
    batch's ``begin_many`` / ``complete_many``): handled in order, as they would
    have been one by one. A new record that closes no orphan and whose id the store
    made comes as itself, for its ``Create(fresh=True)`` (one object fewer a partition)."""

    writes: tuple[Materialization | Create | Replace, ...]


@attrs.frozen(kw_only=True)
class CloseOrphans(Message[int]):
    """Close every unfinished record of ``owner`` (a dead process) and drop its leases."""

    tenant: str | None
    owner: str
    message: str


@attrs.frozen(kw_only=True)
class Prune(Message[int]):
    """Delete history records of an asset beyond a retention (``MaterializationStore.prune``)."""

    tenant: str | None
    asset: str
    keep_last: int | None
    before: datetime | None
    spare: frozenset[str | None]
    limit: int


@attrs.frozen(kw_only=True)
class PruneFinished(Message[int]):
    """Delete finished backfills and schedule ticks (``MaterializationStore.prune_finished``)."""

    tenant: str | None
    before: datetime
    limit: int


@attrs.frozen(kw_only=True)
class Latest(_AtKey[Materialization]):
    pass


@attrs.frozen(kw_only=True)
class Exists(_AtKey[bool]):
    pass


@attrs.frozen(kw_only=True)
class ById(Message[Materialization]):
    tenant: str | None
    id: uuid.UUID


@attrs.frozen(kw_only=True)
class ByRun(Message[list[Materialization]]):
    tenant: str | None
    run_id: uuid.UUID


@attrs.frozen(kw_only=True)
class ByStatus(Message[list[Materialization]]):
    tenant: str | None
    status: Status
    limit: int


@attrs.frozen(kw_only=True)
class All(Message[list[Materialization]]):
    tenant: str | None
    asset: str | None
    limit: int
    before: uuid.UUID | None = None


@attrs.frozen(kw_only=True)
class LatestSuccesses(Message[dict[tuple[str, str | None], Materialization]]):
    """Latest success-or-stale record of each (asset, partition) pair; missing pairs omitted."""

    tenant: str | None
    pairs: tuple[tuple[str, str | None], ...]


@attrs.frozen(kw_only=True)
class AllPartitions(Message[dict[str | None, Materialization]]):
    """Latest success-or-stale record of every partition of one asset, by key."""

    tenant: str | None
    asset: str


@attrs.frozen(kw_only=True)
class SuccessesAfter(Message[tuple[list[Materialization], str]]):
    """The current successes of one asset that became so after ``after`` (the id and
    time of the newest success when a mark was given out; None: from the first),
    oldest first, and the mark of now; none at all when ``start``."""

    tenant: str | None
    asset: str
    after: tuple[int, datetime | None] | None
    start: bool


@attrs.frozen(kw_only=True)
class PartitionStates(Message[dict[str | None, Status]]):
    """The status of the latest record of every partition of one asset, by key."""

    tenant: str | None
    asset: str


@attrs.frozen(kw_only=True)
class MarkStale(Message[list[Materialization]]):
    tenant: str | None
    asset: str
    partition: str | None


@attrs.frozen(kw_only=True)
class PutValue(_AtKey[None]):
    value: Any


# Each materialization sends these three (a backfill's batch, its records' writes in
# one ``Many``): made positionally, without attrs' ``__init__`` (see ``builder``).
make_create = builder(Create)
"""``Create``: reply, record, orphan, fresh."""
make_replace = builder(Replace)
"""``Replace``: reply, record, expected, lease."""
make_put_value = builder(PutValue)
"""``PutValue``: reply, tenant, asset, partition, value."""


@attrs.frozen(kw_only=True)
class GetValue(_AtKey[Any]):
    with_meta: bool = False


@attrs.frozen(kw_only=True)
class DropValue(_AtKey[None]):
    pass


@attrs.frozen(kw_only=True)
class HasValue(_AtKey[bool]):
    pass


@attrs.frozen(kw_only=True)
class SaveBackfill(Message[None]):
    tenant: str | None
    id: uuid.UUID
    state: Any
    owner: str | None


@attrs.frozen(kw_only=True)
class ClaimBackfill(Message[BackfillClaim]):
    tenant: str | None
    id: uuid.UUID
    owner: str
    stale_after: float


@attrs.frozen(kw_only=True)
class Decide(Message[Materialization]):
    tenant: str | None
    id: uuid.UUID
    approve: bool
    reason: str | None


@attrs.frozen(kw_only=True)
class DecisionOf(Message["tuple[bool, str | None] | None"]):
    tenant: str | None
    id: uuid.UUID


@attrs.frozen(kw_only=True)
class ClaimRole(Message[RoleHolder]):
    tenant: str | None
    role: str
    owner: str
    seconds: float


@attrs.frozen(kw_only=True)
class ReleaseRole(Message[None]):
    tenant: str | None
    role: str
    owner: str


@attrs.frozen(kw_only=True)
class HolderOf(Message[RoleHolder | None]):
    tenant: str | None
    role: str


@attrs.frozen(kw_only=True)
class ClaimTick(Message[bool]):
    tenant: str | None
    schedule: str
    at: datetime
    owner: str


@attrs.frozen(kw_only=True)
class FinishTick(Message[None]):
    tenant: str | None
    schedule: str
    at: datetime
    state: str
    run_id: uuid.UUID | None
    error: str | None


@attrs.frozen(kw_only=True)
class LastTicks(Message[dict[str, Tick]]):
    tenant: str | None


@attrs.frozen(kw_only=True)
class LoadCursor(Message[Cursor | None]):
    tenant: str | None
    name: str


@attrs.frozen(kw_only=True)
class SaveCursor(Message[None]):
    tenant: str | None
    cursor: Cursor


@attrs.frozen(kw_only=True)
class ListCursors(Message[list[Cursor]]):
    tenant: str | None


@attrs.frozen(kw_only=True)
class UnfinishedTicks(Message[list[Tick]]):
    tenant: str | None
    limit: int


@attrs.frozen(kw_only=True)
class RequestCancel(Message[Any]):
    tenant: str | None
    id: uuid.UUID


@attrs.frozen(kw_only=True)
class ListBackfills(Message[list[Any]]):
    tenant: str | None
    limit: int
    offset: int = 0


@attrs.frozen(kw_only=True)
class LoadBackfill(Message[Any]):
    tenant: str | None
    id: uuid.UUID


# -------------------------------------------------------------------- handlers


class _Handlers:
    """The actor's behaviour: one method per message type, over one ``MemoryData``."""

    def __init__(self, data: MemoryData) -> None:
        self.data = data
        self._pruning: tuple[Prune, list[int]] | None = None  # see prune
        self._grouped: tuple[str | None, dict[str, list[int]], set[str]] | None = None  # see _histories

    def table(self) -> dict[type[Message], Callable[[Any], Any]]:
        """The handler of each message type. Whoever holds it holds these handlers (its
        bound methods do): kept on the handlers themselves, it made them and their data
        a cycle that outlived a closed runtime until the garbage collector came by."""
        return {
            Create: self.create,
            Update: self.update,
            Replace: self.replace,
            Many: self.many,
            Latest: self.latest,
            Exists: self.exists,
            ById: self.by_id,
            ByRun: self.by_run,
            ByStatus: self.by_status,
            All: self.all,
            LatestSuccesses: self.latest_successes,
            AllPartitions: self.all_partitions,
            SuccessesAfter: self.successes_after,
            PartitionStates: self.partition_states,
            MarkStale: self.mark_stale,
            PutValue: self.put_value,
            GetValue: self.get_value,
            DropValue: self.drop_value,
            HasValue: self.has_value,
            SaveBackfill: self.save_backfill,
            LoadBackfill: self.load_backfill,
            ListBackfills: self.list_backfills,
            RequestCancel: self.request_cancel,
            Decide: self.decide,
            ClaimTick: self.claim_tick,
            ClaimRole: self.claim_role,
            ReleaseRole: self.release_role,
            HolderOf: self.holder_of,
            FinishTick: self.finish_tick,
            LastTicks: self.last_ticks,
            UnfinishedTicks: self.unfinished_ticks,
            LoadCursor: self.load_cursor,
            SaveCursor: self.save_cursor,
            ListCursors: self.list_cursors,
            DecisionOf: self.decision_of,
            ClaimBackfill: self.claim_backfill,
            CloseOrphans: self.close_orphans,
            Prune: self.prune,
            PruneFinished: self.prune_finished,
        }

    # records

    def create(self, m: Create) -> Materialization:
        return self._create(m.record, m.orphan, m.fresh)

    def _create(self, record: Materialization, orphan: tuple[uuid.UUID, str] | None, fresh: bool) -> Materialization:
        data = self.data
        rid = record.id.int
        if not fresh and rid in data.records:
            # Whoever's it is, it is not overwritten (another tenant's id looks taken, as it does in SQL).
            raise id_in_use(record)
        if orphan is not None:
            self._close_orphan(record.tenant_id, *orphan)
        if record.status in CURRENT:
            self._supersede(record)
        tenant, status = record.tenant_id, record.status
        key = (tenant, record.asset_name, record.partition)
        data.records.add(record)  # in no map: fresh, or looked for above
        data.latest[key] = rid
        data.latest_status[key] = STATUS_TEXT[status]
        ids = data.by_tenant.get(tenant)  # not setdefault: it makes an empty dict each time
        if ids is None:
            ids = data.by_tenant[tenant] = {}
        ids[rid] = None
        run = record.run_id.int
        runs = data.by_run.get(tenant)
        if runs is None:
            runs = data.by_run[tenant] = {}
        many = data.by_run_many.get((tenant, run))
        if many is not None:
            many.append(rid)
        else:
            first = runs.setdefault(run, rid)  # one look into the map of every run, not two
            if first != rid:  # a second record of the run: it has a list from now on
                data.by_run_many[(tenant, run)] = [runs.pop(run), rid]
        ids = data.by_status.get((tenant, status))
        if ids is None:
            ids = data.by_status[(tenant, status)] = {}
        ids[rid] = None
        if status in CURRENT:
            self._index_success(record)
        return record

    def many(self, m: Many) -> None:
        """Each write as its own cast would be: one refused (a ``FlowstoneError``,
        logged) does not stop the others."""
        create, replace = self._create, self.replace
        for write in m.writes:
            try:
                if type(write) is Replace:
                    replace(write)
                elif type(write) is Materialization:  # begun with an id made by the store
                    create(write, None, True)
                else:
                    assert type(write) is Create
                    create(write.record, write.orphan, write.fresh)
            except FlowstoneError as error:
                log.warning("memory store: cast %s failed: %s", type(write).__name__, error)

    def _get(self, tenant: str | None, record_id: uuid.UUID) -> Materialization:
        record = self.data.records.get(record_id.int)
        if record is None or record.tenant_id != tenant:
            raise NotFound(f"no materialization with id {str(record_id)!r}", tenant=tenant)
        return record

    def update(self, m: Update) -> Materialization:
        old = self._get(m.tenant, m.id)
        check_transition(old.status, m.status, old)
        return self._replace(old, m.status, m.fields)

    def replace(self, m: Replace) -> None:
        old = self.data.records.get(m.record.id.int)
        if old is None or old.status is not m.expected or old.tenant_id != m.record.tenant_id:
            found = "missing" if old is None or old.tenant_id != m.record.tenant_id else old.status.value
            log.error(
                "lost write-behind of %s %s: expected %s, found %s",
                m.record.asset_name, m.record.id, m.expected.value, found,
            )
            return
        if m.lease is not None and m.lease.fence in self.data.leases.taken_over:
            log.error("refused write of %s %s: %s", m.record.asset_name, m.record.id, lost(m.lease))
            return
        self._store(old, m.record)

    def _replace(self, old: Materialization, status: Status, fields: dict[str, Any]) -> Materialization:
        return self._store(old, evolve(old, status=status, updated_at=utcnow(), **fields))

    def _store(self, old: Materialization, new: Materialization) -> Materialization:
        status = new.status
        data = self.data
        if status is SUCCESS and old.status is not SUCCESS:
            self._supersede(new)
        data.records.put(new)
        rid = new.id.int
        del data.by_status[(old.tenant_id, old.status)][rid]
        ids = data.by_status.get((new.tenant_id, status))  # not setdefault: it makes an empty dict each time
        if ids is None:
            ids = data.by_status[(new.tenant_id, status)] = {}
        ids[rid] = None
        key = (new.tenant_id, new.asset_name, new.partition)
        if data.latest.get(key) == rid:
            data.latest_status[key] = STATUS_TEXT[status]
        if status is SUCCESS:
            self._index_success(new)
        return new

    def _supersede(self, record: Materialization) -> None:
        """The partition's current record, if another, becomes ``superseded``: one current success."""
        data = self.data
        current_id = data.latest_success.get((record.tenant_id, record.asset_name, record.partition))
        if current_id is not None and current_id != record.id.int:
            current = data.records[current_id]
            if current.status in CURRENT:
                self._store(current, evolve(current, status=Status.SUPERSEDED, updated_at=utcnow()))

    def _close_orphan(self, tenant: str | None, record_id: uuid.UUID, owner: str) -> None:
        record = self.data.records.get(record_id.int)
        if record is not None and record.tenant_id == tenant and record.status in ACTIVE:
            self._orphan(record, f"orphaned: {owner} stopped renewing its lease without finishing it")

    def _orphan(self, record: Materialization, message: str) -> Materialization:
        """Close an unfinished record its process left: failed if started, else cancelled."""
        now = utcnow()
        return self._store(record, evolve(
            record, status=ORPHAN_ENDING[record.status], updated_at=now, completed_at=now, error_message=message,
        ))

    def close_orphans(self, m: CloseOrphans) -> int:
        data = self.data
        prefix = f"{m.owner}/"
        mine = [
            data.records[record_id]
            for status in ACTIVE
            for record_id in data.by_status.get((m.tenant, status), {})
            if (data.records[record_id].executor_node or "").startswith(prefix)
        ]
        for record in mine:
            self._orphan(record, m.message)
        data.leases.drop_owner(m.tenant, m.owner)
        return len(mine)

    def prune(self, m: Prune) -> int:
        """The oldest ``limit`` of what the retention deletes. Choosing them reads every
        history record of the asset (``_histories``), so the rest is kept for the next
        call with the same arguments (retention calls until fewer than ``limit`` go):
        a deletion of N records costs one choice, not N / limit of them. What was
        chosen stays deletable meanwhile: a history record never moves again, never
        becomes its partition's latest, and newer history only raises its rank."""
        data = self.data
        if m.keep_last is None and m.before is None:
            return 0
        pending = self._pruning
        self._pruning = None
        if pending is not None and _same_prune(pending[0], m):
            chosen = [record_id for record_id in pending[1] if record_id in data.records]
        else:
            chosen = self._choose(m)
        for record_id in chosen[:m.limit]:
            self._forget(data.records[record_id])
        if len(chosen) > m.limit:
            self._pruning = (m, chosen[m.limit:])
        return min(len(chosen), m.limit)

    def _choose(self, m: Prune) -> list[int]:
        """Every history record of ``m.asset`` beyond ``m``'s retention, oldest first."""
        data = self.data
        met: dict[str | None, int] = {}  # history records met so far per partition, newest first
        chosen = []
        for record_id, (_asset, partition, status, inserted_at) in self._histories(m.tenant, m.asset):
            if status not in HISTORY:
                continue
            rank = met[partition] = met.get(partition, 0) + 1
            if data.latest.get((m.tenant, m.asset, partition)) == record_id:
                continue  # what happened last to a partition stays visible
            if status is Status.SUPERSEDED and partition in m.spare:
                continue
            old = m.before is not None and inserted_at is not None and inserted_at < m.before
            if (m.keep_last is not None and rank > m.keep_last) or old:
                chosen.append(record_id)
        chosen.reverse()  # the oldest first
        return chosen

    def _histories(
        self, tenant: str | None, asset: str,
    ) -> Iterator[tuple[int, tuple[str, str | None, Status, datetime | None]]]:
        """The ids of ``asset``'s history records, newest first, each with what
        ``Records.brief`` reads of it.

        The only order of records is the tenant's ids, so finding one asset's history
        walks every id of the tenant (and reads each history record back); a pass over
        many assets then cost a walk per asset (200 assets of 500 partitions: 185 µs a
        record deleted, against 10 for one asset). One walk groups every asset's
        history; each asset's first choice of a pass takes its group, and a choice for
        an asset that took its group already (the next pass, or the same asset again)
        walks anew. A group taken later than its walk lacks what became history since:
        that waits a pass (a rank only grows with newer history, so nothing is chosen
        that the rule keeps); what was deleted since is left out, and ``_choose``
        checks that each record is still history."""
        data = self.data
        grouped = self._grouped
        if grouped is not None and grouped[0] == tenant and asset not in grouped[2]:
            grouped[2].add(asset)
            for record_id in grouped[1].get(asset, ()):
                if record_id in data.records:
                    yield record_id, data.records.brief(record_id)
            return
        history: set[int] = set()
        for status in HISTORY:
            history.update(data.by_status.get((tenant, status), ()))
        groups: dict[str, list[int]] = {}
        self._grouped = (tenant, groups, {asset})
        # Only history records are read back (a packed record costs microseconds): the
        # tenant's ids are walked newest first for their order, skipped by number.
        for record_id in reversed(data.by_tenant.get(tenant, {})) if history else ():
            if record_id in history:
                brief = data.records.brief(record_id)
                group = groups.get(brief[0])
                if group is None:
                    group = groups[brief[0]] = []
                group.append(record_id)
                if brief[0] == asset:
                    yield record_id, brief

    def _forget(self, record: Materialization) -> None:
        data, tenant, rid = self.data, record.tenant_id, record.id.int
        del data.records[rid]
        data.by_tenant.get(tenant, {}).pop(rid, None)
        data.by_status.get((tenant, record.status), {}).pop(rid, None)
        run = record.run_id.int
        many = data.by_run_many.get((tenant, run))
        if many is not None:
            many.remove(rid)
            if not many:
                del data.by_run_many[(tenant, run)]
        elif data.by_run.get(tenant, {}).get(run) == rid:
            del data.by_run[tenant][run]
        for upstream, keys in record.upstream_partitions.items():
            for key in keys:
                readers = data.readers.get((tenant, upstream, key))
                if readers is not None:
                    readers.pop(rid, None)

    def _index_success(self, record: Materialization) -> None:
        data = self.data
        rid = record.id.int
        data.latest_success[(record.tenant_id, record.asset_name, record.partition)] = rid
        for upstream, keys in record.upstream_partitions.items():
            for key in keys:
                data.readers.setdefault((record.tenant_id, upstream, key), {})[rid] = None

    def latest(self, m: Latest) -> Materialization:
        record_id = self.data.latest.get((m.tenant, m.asset, m.partition))
        if record_id is None:
            raise NotFound("no materialization", asset=m.asset, partition=m.partition, tenant=m.tenant)
        return self.data.records[record_id]

    def exists(self, m: Exists) -> bool:
        return (m.tenant, m.asset, m.partition) in self.data.latest

    def by_id(self, m: ById) -> Materialization:
        return self._get(m.tenant, m.id)

    def by_run(self, m: ByRun) -> list[Materialization]:
        run = m.run_id.int
        ids = self.data.by_run_many.get((m.tenant, run))
        if ids is None:
            one = self.data.by_run.get(m.tenant, {}).get(run)
            ids = [] if one is None else [one]
        return [self.data.records[i] for i in ids]

    def by_status(self, m: ByStatus) -> list[Materialization]:
        ids = self.data.by_status.get((m.tenant, m.status), {})
        return self._newest(ids, m.limit)

    def all(self, m: All) -> list[Materialization]:
        ids = self.data.by_tenant.get(m.tenant, {})
        if m.asset is None and m.before is None:
            return self._newest(ids, m.limit)
        records = self.data.records
        out: list[Materialization] = []
        newest_first: Iterator[int] = reversed(ids)
        if m.before is not None:
            before = m.before.int
            if before not in ids:
                raise NotFound(f"no record {m.before}", tenant=m.tenant)
            newest_first = itertools.dropwhile(lambda record_id: record_id != before, newest_first)
            next(newest_first)  # the record itself
        for record_id in newest_first:
            if len(out) >= m.limit:
                break
            if m.asset is None or records.asset_of(record_id) == m.asset:
                out.append(records[record_id])
        return out

    def _newest(self, ids: dict[int, None], limit: int) -> list[Materialization]:
        out: list[Materialization] = []
        for record_id in reversed(ids):
            if len(out) >= limit:
                break
            out.append(self.data.records[record_id])
        return out

    def latest_successes(self, m: LatestSuccesses) -> dict[tuple[str, str | None], Materialization]:
        found = {}
        for asset, key in m.pairs:
            record_id = self.data.latest_success.get((m.tenant, asset, key))
            if record_id is not None:
                found[(asset, key)] = self.data.records[record_id]
        return found

    def all_partitions(self, m: AllPartitions) -> dict[str | None, Materialization]:
        records = self.data.records
        return {key: records[record_id] for key, record_id in self.data.latest_success.of(m.tenant, m.asset).items()}

    def successes_after(self, m: SuccessesAfter) -> tuple[list[Materialization], str]:
        """Walked newest first through the tenant's successes, in the order they
        became successes here (one actor applies every write), down to the newest one
        when the mark was given out: it costs what came after. Should that record have
        stopped being a success since, the walk stops at the first success written by
        its time instead."""
        records, ids = self.data.records, self.data.by_status.get((m.tenant, Status.SUCCESS), {})
        newest = next(reversed(ids), None)
        if newest is None:
            mark = "memory:"
        else:
            stamp = records[newest].updated_at
            mark = f"memory:{newest:032x}@{'' if stamp is None else stamp.isoformat()}"
        found: list[Materialization] = []
        if m.start:
            return found, mark
        last, when = m.after if m.after is not None else (None, None)
        by_id = last is not None and last in ids
        for record_id in reversed(ids):
            if by_id and record_id == last:
                break
            record = records[record_id]
            if not by_id and last is not None and (when is None or record.updated_at is None
                                                   or record.updated_at <= when):
                break
            if record.asset_name == m.asset:
                found.append(record)
        found.reverse()
        return found, mark

    def partition_states(self, m: PartitionStates) -> dict[str | None, Status]:
        return {key: STATUS_OF[status] for key, status in self.data.latest_status.of(m.tenant, m.asset).items()}

    def mark_stale(self, m: MarkStale) -> list[Materialization]:
        """Every success that read ``asset@partition``, directly or through others, becomes stale."""
        data = self.data
        marked = []
        queue = [(m.asset, m.partition)]
        while queue:
            asset, key = queue.pop()
            for record_id in data.readers.pop((m.tenant, asset, key), {}):
                record = data.records[record_id]
                if record.status is Status.SUCCESS:
                    marked.append(self._replace(record, Status.STALE, {}))
                    queue.append((record.asset_name, record.partition))
        return marked

    # values

    def put_value(self, m: PutValue) -> None:
        key = (m.tenant, m.asset, m.partition)
        self.data.values[key] = m.value
        self.data.stored_at[key] = utcnow()

    def get_value(self, m: GetValue) -> Any:
        key = (m.tenant, m.asset, m.partition)
        if key not in self.data.values:
            raise NotFound("no stored value", asset=m.asset, partition=m.partition, tenant=m.tenant)
        value = self.data.values.get(key)
        return StoredValue(value, self.data.stored_at.get(key)) if m.with_meta else value

    def drop_value(self, m: DropValue) -> None:
        key = (m.tenant, m.asset, m.partition)
        self.data.values.pop(key)
        self.data.stored_at.pop(key)

    def has_value(self, m: HasValue) -> bool:
        return (m.tenant, m.asset, m.partition) in self.data.values

    # backfills

    def save_backfill(self, m: SaveBackfill) -> None:
        key = (m.tenant, m.id)
        row = self.data.backfills.get(key)
        if row is not None and row.owner != m.owner:
            raise LeaseLost(
                f"backfill {str(m.id)!r} is now driven by {row.owner}; {m.owner} may no longer save it",
                tenant=m.tenant,
            )
        running = m.state.status.state == "running"
        if row is not None and row.cancel and running:
            raise CancelRequested(f"backfill {str(m.id)!r}: a cancel was requested", tenant=m.tenant)
        self.data.backfills.pop(key, None)  # to the end: the most recently saved is last
        self.data.backfills[key] = BackfillRow(m.state, m.owner, self.data.now(), cancel=False)

    def prune_finished(self, m: PruneFinished) -> int:
        data = self.data
        backfills = [key for key, row in data.backfills.items()
                     if key[0] == m.tenant and row.heartbeat_at < m.before and row.saved.status.state != "running"]
        backfills = backfills[: m.limit]
        for key in backfills:
            del data.backfills[key]
        newest: dict[str, datetime] = {}  # each schedule's newest tick stays: the scheduler goes on from it
        for tenant, schedule, at in data.ticks:
            if tenant == m.tenant and (schedule not in newest or at > newest[schedule]):
                newest[schedule] = at
        ticks = [(tenant, schedule, at) for (tenant, schedule, at), tick in data.ticks.items()
                 if tenant == m.tenant and at < m.before and at < newest[schedule] and tick.state != "running"]
        ticks = ticks[: m.limit - len(backfills)]
        for tick_key in ticks:
            del data.ticks[tick_key]
        return len(backfills) + len(ticks)

    def decide(self, m: Decide) -> Materialization:
        record = self._get(m.tenant, m.id)
        check_decidable(record, m.approve, (m.tenant, m.id) in self.data.decisions)
        self.data.decisions[(m.tenant, m.id)] = (m.approve, m.reason)
        return record

    def decision_of(self, m: DecisionOf) -> tuple[bool, str | None] | None:
        return self.data.decisions.get((m.tenant, m.id))

    def claim_role(self, m: ClaimRole) -> RoleHolder:
        key, now = (m.tenant, m.role), self.data.now()
        held = self.data.roles.get(key)
        until = now + timedelta(seconds=m.seconds)
        if held is not None and held.owner == m.owner:
            self.data.roles[key] = attrs.evolve(held, expires_at=until, taken_from=None, heartbeat_at=now)
        elif held is None or held.expires_at <= now:
            fence = (held.fence if held is not None else 0) + 1
            taken = held.owner if held is not None and held.owner else None
            self.data.roles[key] = RoleHolder(m.role, m.owner, fence, until, taken, heartbeat_at=now)
        return self.data.roles[key]

    def holder_of(self, m: HolderOf) -> RoleHolder | None:
        held = self.data.roles.get((m.tenant, m.role))
        return attrs.evolve(held, taken_from=None) if held is not None and held.owner else None

    def release_role(self, m: ReleaseRole) -> None:
        key = (m.tenant, m.role)
        held = self.data.roles.get(key)
        if held is not None and held.owner == m.owner:
            self.data.roles[key] = attrs.evolve(held, owner="", expires_at=self.data.now())

    def claim_tick(self, m: ClaimTick) -> bool:
        key = (m.tenant, m.schedule, m.at)
        if key in self.data.ticks:
            return False
        self.data.ticks[key] = Tick(m.schedule, m.at, m.owner, claimed_at=utcnow())
        return True

    def finish_tick(self, m: FinishTick) -> None:
        key = (m.tenant, m.schedule, m.at)
        tick = self.data.ticks.get(key)
        if tick is None:
            raise NotFound(f"schedule {m.schedule!r} has no tick at {m.at.isoformat()}", tenant=m.tenant)
        self.data.ticks[key] = attrs.evolve(tick, state=m.state, run_id=m.run_id, error=m.error, finished_at=utcnow())

    def last_ticks(self, m: LastTicks) -> dict[str, Tick]:
        newest: dict[str, Tick] = {}
        for (tenant, schedule, at), tick in self.data.ticks.items():
            if tenant == m.tenant and (schedule not in newest or at > newest[schedule].at):
                newest[schedule] = tick
        return newest

    def unfinished_ticks(self, m: UnfinishedTicks) -> list[Tick]:
        running = [tick for (tenant, _, _), tick in self.data.ticks.items()
                   if tenant == m.tenant and tick.state == "running"]
        return sorted(running, key=lambda tick: (tick.at, tick.schedule))[:m.limit]

    def load_cursor(self, m: LoadCursor) -> Cursor | None:
        return self.data.cursors.get((m.tenant, m.name))

    def save_cursor(self, m: SaveCursor) -> None:
        self.data.cursors[(m.tenant, m.cursor.name)] = m.cursor

    def list_cursors(self, m: ListCursors) -> list[Cursor]:
        return sorted((c for (tenant, _), c in self.data.cursors.items() if tenant == m.tenant),
                      key=lambda c: c.name)

    def request_cancel(self, m: RequestCancel) -> Any:
        row = self.data.backfills.get((m.tenant, m.id))
        if row is None:
            raise BackfillNotFound(m.id, tenant=m.tenant)
        row.cancel = row.saved.status.state == "running"
        return row.saved

    def list_backfills(self, m: ListBackfills) -> list[Any]:
        found: list[Any] = []
        skip = m.offset
        for (tenant, _id), row in reversed(self.data.backfills.items()):
            if len(found) >= m.limit:
                break
            if tenant == m.tenant:
                if skip:
                    skip -= 1
                else:
                    found.append(row.saved)
        return found

    def load_backfill(self, m: LoadBackfill) -> Any:
        row = self.data.backfills.get((m.tenant, m.id))
        return None if row is None else row.saved

    def claim_backfill(self, m: ClaimBackfill) -> BackfillClaim:
        row = self.data.backfills.get((m.tenant, m.id))
        if row is None:
            raise BackfillNotFound(m.id, tenant=m.tenant)
        previous, seen = None, None
        if row.saved.status.state == "running" and row.owner is not None and row.owner != m.owner:
            if (self.data.now() - row.heartbeat_at).total_seconds() <= m.stale_after:
                raise BackfillOwned(m.id, row.owner, row.heartbeat_at, tenant=m.tenant)
            previous, seen = row.owner, row.heartbeat_at
        row.owner, row.heartbeat_at = m.owner, self.data.now()
        return BackfillClaim(row.saved, previous, seen)


class InPlace:
    """The actor's handlers over its data, on its handle (``Handle.shared``): a
    client casting a write while no cast is queued or on its way to the actor
    handles it here instead (``MemoryActorClient._cast``; a job's input read as
    well, ``MemoryActorClient._read``), in the same order the mailbox would have
    given it. One event-loop thread runs both, and the handlers
    never await, so the outcome is the actor's: a ``FlowstoneError`` logged, and any
    other error a bug that restarts the actor (its data is left as it was: handlers
    check everything before they change anything). A call still queued is
    overtaken, as if posted a moment later: its caller waits for the answer, so
    nothing it does afterwards can be handled before it."""

    __slots__ = ("casts", "dispatch", "open", "serving", "taken")

    def __init__(self, data: MemoryData) -> None:
        self.dispatch = _Handlers(data).table()
        self.casts = 0
        """Casts posted to the actor (its handle counts them: ``CountedHandle``)."""
        self.taken = 0
        """Casts its serve loop took from the mailbox."""
        self.serving = False
        """An incarnation is serving (not crashed and waiting for its restart, not stopped)."""
        self.open = True
        """The mailbox takes messages (it was not closed)."""

    def idle(self) -> bool:
        """Whether a cast handled in place now would overtake no other cast: the
        actor serves, and none is queued or on its way to it (``MemoryActorClient._cast``
        asks this inline)."""
        return self.open and self.serving and self.casts == self.taken

    def took(self, message: Message) -> None:
        if message.reply is None:
            self.taken += 1

    def close(self) -> None:
        """The handle's mailbox closed: a cast raises ``RuntimeClosed`` from now on."""
        self.open = False

    def apply(self, actor: Handle, message: Message) -> None:
        try:
            self.dispatch[message.__class__](message)
        except FlowstoneError as error:
            log.warning("memory-store: cast %s failed: %s", type(message).__name__, error)
        except Exception as error:
            log.error("memory-store: cast %s failed; restarting the actor", type(message).__name__, exc_info=error)
            actor.try_cast(Crash(reason=f"a cast handled in place failed: {error!r}"))

    def answer(self, actor: Handle, message: Message[R]) -> R:
        """The answer to a read handled here and now (``MemoryActorClient._read``), as
        the actor would give it: a ``FlowstoneError`` is raised to the caller; any other
        error is a bug: the caller gets ``ActorCrashed`` and the actor restarts."""
        try:
            answer: R = self.dispatch[message.__class__](message)
        except FlowstoneError:
            raise
        except Exception as error:
            log.error("memory-store: %s failed; restarting the actor", type(message).__name__, exc_info=error)
            actor.try_cast(Crash(reason=f"a read handled in place failed: {error!r}"))
            raise ActorCrashed(actor.name) from error
        return answer


def memory_actor(door: InPlace) -> Callable[[MemoryObjectReceiveStream[Message]], Any]:
    """The incarnation function the supervisor restarts: the door's handlers, over
    the same data every time; it keeps the door's count of casts taken."""

    async def incarnation(mailbox: MemoryObjectReceiveStream[Message]) -> None:
        door.serving = True
        try:
            await serve("memory-store", mailbox, door.dispatch, taken=door.took)
        finally:
            door.serving = False

    return incarnation


def _same_prune(one: Prune, other: Prune) -> bool:
    """Whether two prunes choose the same records (their limits aside)."""
    return (one.tenant, one.asset, one.keep_last, one.before, one.spare) == (
        other.tenant, other.asset, other.keep_last, other.before, other.spare)
