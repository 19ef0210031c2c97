"""Materialization records and the status machine they move through."""

from __future__ import annotations

import enum
import operator
import uuid
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import attrs

from ..definitions import FieldError
from ..errors import DefinitionError, InvalidTransition, NotFound
from ..identifiers import check_identifier
from ..partitions import serialize_partition
from ..plumbing.frozen import builder
from ..plumbing.ids import new_uuid
from ..plumbing.jsonvalues import PLAIN_TYPES, storable_text, text_problem

__all__ = [
    "ACTIVE", "CURRENT", "ORPHAN_ENDING", "TERMINAL", "TRANSITIONS", "Materialization", "Status", "check_transition",
]


class Status(enum.StrEnum):
    """Where a materialization is in its life. ``str`` so it stores and prints as its value."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    STALE = "stale"
    WAITING_APPROVAL = "waiting_approval"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"

    def __str__(self) -> str:
        return self.value


SUCCESS, RUNNING = Status.SUCCESS, Status.RUNNING
"""Two statuses as module globals, for the checks every materialization makes:
``Status.SUCCESS`` is an attribute of the enum class, which CPython 3.11 looks up
anew each time (~70 ns), where it caches a global."""

TRANSITIONS: Mapping[Status, frozenset[Status]] = MappingProxyType({
    Status.PENDING: frozenset({Status.RUNNING, Status.WAITING_APPROVAL, Status.CANCELLED}),
    Status.WAITING_APPROVAL: frozenset({Status.RUNNING, Status.FAILED, Status.CANCELLED}),
    Status.RUNNING: frozenset({Status.SUCCESS, Status.FAILED, Status.CANCELLED}),
    Status.SUCCESS: frozenset({Status.STALE, Status.SUPERSEDED}),
    Status.FAILED: frozenset(),
    Status.STALE: frozenset({Status.SUPERSEDED}),
    Status.CANCELLED: frozenset(),
    Status.SUPERSEDED: frozenset(),
})

STATUS_TEXT = {status: status.value for status in Status}
"""Each status's text, for the stores: an enum's ``.value`` is a Python property call."""
STATUS_OF = {status.value: status for status in Status}
"""Each status from its text, for the stores' reads: a dict lookup, 3x faster than
``Status(text)``."""
TERMINAL = frozenset({Status.SUCCESS, Status.FAILED, Status.STALE, Status.CANCELLED, Status.SUPERSEDED})
"""Statuses a run leaves a record in; ``success`` can still become ``stale`` or
``superseded`` later."""

CURRENT = frozenset({Status.SUCCESS, Status.STALE})
"""The statuses of a partition's current record: at most one record of a (tenant,
asset, partition) has one of them; a newer success supersedes it."""

ACTIVE = frozenset({Status.PENDING, Status.RUNNING, Status.WAITING_APPROVAL})
"""Statuses of work not finished yet; a process that dies leaves its records here."""

HISTORY = frozenset({Status.SUPERSEDED, Status.FAILED, Status.CANCELLED})
"""Statuses of records that are only history: what retention may delete (``prune``)."""

ORPHAN_ENDING = MappingProxyType({
    Status.RUNNING: Status.FAILED, Status.PENDING: Status.CANCELLED, Status.WAITING_APPROVAL: Status.CANCELLED,
})
"""How a dead process's unfinished record is closed: started work failed, the rest never ran."""


def to_status(value: Any) -> Status:
    """A ``Status`` from itself or its string value; anything else is InvalidTransition."""
    if value.__class__ is Status:
        return value
    try:
        return Status(value)
    except ValueError:
        raise InvalidTransition(value, value, detail=f"{value!r} is not a status") from None


def check_transition(current: Status, requested: Status, record: Materialization | None = None) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> requested`` is allowed."""
    if requested not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "nothing (terminal)"
        raise InvalidTransition(
            current,
            requested,
            asset=record.asset_name if record else None,
            partition=record.partition if record else None,
            tenant=record.tenant_id if record else None,
            detail=f"{current.value} may move to {allowed}",
        )


EMPTY: Mapping[Any, Any] = MappingProxyType({})
"""The read-only empty mapping records share."""
_SHARED: dict[tuple[tuple[str, type, Any], ...], Mapping[str, Any]] = {}
_SHARED_KEPT = 1024


def _frozen(value: Any) -> Any:
    """A read-only copy of a record's mapping. Records that say the same small thing
    (no lineage; metadata naming the IO manager) share one copy: a store holding a
    million records then holds one mapping for them, not a million, and the
    garbage collector has that many fewer objects to walk."""
    kind = type(value)
    if kind is MappingProxyType:
        return value  # already a read-only copy: records share it when they are copied
    if kind is not dict and not isinstance(value, Mapping):  # a dict skips the ABC's slow check
        return value
    if not value:
        return EMPTY
    if len(value) <= 4 and all(type(k) is str and type(v) in PLAIN_TYPES for k, v in value.items()):
        # Each value's type is part of the key: 1, 1.0 and True are equal, but a
        # record that says True must not read back 1.
        key = tuple((k, type(v), v) for k, v in value.items())
        shared = _SHARED.get(key)
        if shared is None:
            if len(_SHARED) >= _SHARED_KEPT:
                _SHARED.clear()
            shared = _SHARED[key] = MappingProxyType(dict(value))
        return shared
    return MappingProxyType(dict(value))


def _frozen_lineage(value: Any) -> Any:
    """``_frozen`` for a record's lineage, which is never shared: its values are
    tuples of keys, which the test for plain values always refused, one item at a
    time, for every record a downstream asset built."""
    kind = type(value)
    if kind is MappingProxyType:
        return value
    if kind is not dict and not isinstance(value, Mapping):
        return value
    return MappingProxyType(dict(value)) if value else EMPTY


@attrs.frozen(weakref_slot=False)  # built by a builder (see flowstone.plumbing.frozen)
class Materialization:
    """One attempt to compute one partition of one asset, with its lineage.

    ``partition`` is the partition's string key (or ``None``). ``upstream_partitions``
    maps each upstream asset name to the tuple of partition keys read from it.
    """

    id: uuid.UUID
    asset_name: str
    partition: str | None
    run_id: uuid.UUID
    status: Status
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: float | None = None
    upstream_assets: tuple[str, ...] = ()
    upstream_partitions: Mapping[str, tuple[str | None, ...]] = attrs.field(
        factory=dict, converter=_frozen_lineage, hash=False
    )
    dependency_hash: str | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen, hash=False)
    error_message: str | None = None
    executor_node: str | None = None
    tenant_id: str | None = None
    inserted_at: datetime | None = None
    updated_at: datetime | None = None
    error_traceback: str | None = None
    """Where a failure came from: the user's traceback, bounded (``TRACEBACK_LIMIT``)."""

    def __reduce__(self) -> tuple[Any, tuple[tuple[Any, ...]]]:
        """Pickling and ``copy.deepcopy``: the fields in order, the read-only mappings
        as dicts (a ``mappingproxy`` cannot be pickled or deep-copied), frozen again
        by the fields' converters when the record is built back."""
        return _restored, (tuple(dict(v) if type(v) is MappingProxyType else v for v in values_of(self)),)


def _restored(values: tuple[Any, ...]) -> Materialization:
    """A record from ``Materialization.__reduce__``'s values."""
    return build(values)


# ------------------------------------------------------------ building records

_SET_BY_STORE = frozenset({"inserted_at", "updated_at", "tenant_id"})
_FIELDS = frozenset(f.name for f in attrs.fields(Materialization))
UPDATABLE = frozenset({
    "started_at", "completed_at", "duration_ms", "upstream_assets", "upstream_partitions",
    "dependency_hash", "metadata", "error_message", "error_traceback", "executor_node",
})
"""What ``update_status`` may change besides the status: never identity or tenant."""
ENDING = frozenset({"completed_at", "duration_ms", "metadata", "error_message", "error_traceback"})
"""What a job's end changes besides the status (and the update time): a completion
that changes no more is written as those columns alone by the SQL stores (ADR 0031)."""
_CREATABLE = _FIELDS - _SET_BY_STORE


def parse_id(value: Any, what: str = "materialization") -> uuid.UUID:
    """A UUID from itself or its string form; anything else is NotFound naming it."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except (ValueError, TypeError, AttributeError):
        raise NotFound(f"no {what} with id {value!r} (not a UUID)") from None


def check_retention(keep_last: Any, limit: Any) -> tuple[int | None, int]:
    """``prune``'s ``keep_last`` (an int >= 0 or None) and ``limit`` (an int >= 1), else DefinitionError."""
    if keep_last is not None:
        check_limit(keep_last, "keep_last")
    return keep_last, check_batch(limit)


def check_batch(limit: Any) -> int:
    """The ``limit`` of a deleting call (rows per call): an int >= 1, else DefinitionError."""
    if check_limit(limit) < 1:
        raise DefinitionError([FieldError("limit", f"must be an int >= 1, got {limit!r}")])
    return int(limit)


def check_before(before: Any, field: str = "before") -> datetime:
    """``prune_finished``'s ``before``: an aware datetime, else DefinitionError."""
    if not isinstance(before, datetime) or before.tzinfo is None:
        raise DefinitionError([FieldError(field, f"must be an aware datetime, got {before!r}")])
    return before


MARK_LIMIT = 1_000_000
"""Longest mark a store reads (PostgreSQL's names the transactions in flight, up to
one per connection: thousands of 20-digit ids on a server that allows as many)."""


def read_mark(mark: Any, kind: str) -> str:
    """The body of a ``successes_after`` mark that store ``kind`` gave out
    (``"<kind>:<body>"``), else DefinitionError: a mark of another store, or no mark."""
    if not isinstance(mark, str) or len(mark) > MARK_LIMIT or not mark.startswith(f"{kind}:"):
        raise DefinitionError([FieldError(
            "mark", f"must be a mark this {kind} store gave out (successes_after), got {mark!r:.100}")])
    return mark[len(kind) + 1:]


def bad_mark(mark: Any, why: str = "is not a mark this store gave out") -> DefinitionError:
    """The error for a ``successes_after`` mark a store cannot read: ``why``."""
    return DefinitionError([FieldError("mark", f"{why}: {mark!r:.100}")])


def check_limit(limit: Any, field: str = "limit") -> int:
    """The ``limit=`` (or ``offset=``) of a listing: an int >= 0, or DefinitionError."""
    if type(limit) is not int or limit < 0:
        raise DefinitionError([FieldError(field, f"must be an int >= 0, got {limit!r}")])
    return limit


def _bad_fields(names: Any, allowed: frozenset[str], action: str) -> None:
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise DefinitionError(
            [FieldError(name, f"cannot be given to {action}; allowed: {sorted(allowed)}") for name in unknown]
        )


_GOOD_NAMES: set[str] = set()
"""Asset names ``new_record`` has checked (a set of strings, so only a ``str`` that
passed is ever found in it)."""
_GOOD_NAMES_KEPT = 1024


def new_record(fields: Mapping[str, Any], tenant: str | None, now: datetime) -> Materialization:
    """A record from ``create(**fields)``: checked, normalized, stamped with the tenant."""
    if not fields.keys() <= _CREATABLE:
        _bad_fields(fields, _CREATABLE, "create()")
    if "asset_name" not in fields:
        _bad_fields(["asset_name"], frozenset(), "create() without it: asset_name is required")
    values = list(_DEFAULTS)
    for name, value in fields.items():
        values[POSITION[name]] = value
    # The checks below, past what is already right: an asset name checked before, a
    # UUID, a Status (three or four calls fewer for each record a job begins).
    asset = values[_ASSET]
    if type(asset) is not str or asset not in _GOOD_NAMES:
        check_identifier(asset, "asset_name")
        if len(_GOOD_NAMES) >= _GOOD_NAMES_KEPT:
            _GOOD_NAMES.clear()
        _GOOD_NAMES.add(asset)
    given = values[_ID]
    values[_ID] = new_uuid() if "id" not in fields else given if type(given) is uuid.UUID else parse_id(given)
    run = values[_RUN]
    values[_RUN] = (
        new_uuid() if "run_id" not in fields else run if type(run) is uuid.UUID else parse_id(run, "run"))
    status = values[_STATUS]
    values[_STATUS] = (
        Status.PENDING if "status" not in fields else status if status.__class__ is Status else to_status(status))
    partition = values[_PARTITION]
    if partition is not None and type(partition) is not str:
        values[_PARTITION] = serialize_partition(partition)
    upstream = values[_UPSTREAM_ASSETS]
    if type(upstream) is not tuple:
        values[_UPSTREAM_ASSETS] = tuple(upstream)
    upstream_partitions = values[_UPSTREAM_PARTITIONS]
    if not upstream_partitions:
        values[_UPSTREAM_PARTITIONS] = EMPTY
    else:  # the converter copies it, read only; keys given as lists become tuples first
        for keys in upstream_partitions.values():
            if type(keys) is not tuple:
                values[_UPSTREAM_PARTITIONS] = {name: tuple(keys) for name, keys in upstream_partitions.items()}
                break
    values[_TENANT], values[_INSERTED_AT], values[_UPDATED_AT] = tenant, now, now
    return build(values)


FIELDS = tuple(f.name for f in attrs.fields(Materialization))
"""A record's fields in the order its constructor takes them."""
values_of = operator.attrgetter(*FIELDS)
"""Every field of a record at once, in the order of ``FIELDS``."""
POSITION = {name: i for i, name in enumerate(FIELDS)}


build = builder(Materialization, from_values=True)
"""``build(values)``: the record of ``values`` (every field, in the order of
``FIELDS``), as ``Materialization(*values)`` makes it, mappings frozen by their
fields' converters, without attrs' ``__init__`` (each of the 18 fields looked up by
name): a backfilled partition builds two records."""
_DEFAULTS: tuple[Any, ...] = tuple(
    EMPTY if f.converter is not None else None if f.default is attrs.NOTHING else f.default
    for f in attrs.fields(Materialization)
)
"""Each field's value in a record created without it (``new_record``): the mappings
(the fields with a converter) empty, the required fields None until set."""
_ID, _ASSET, _PARTITION, _RUN, _STATUS, _UPSTREAM_ASSETS, _UPSTREAM_PARTITIONS, _TENANT, _INSERTED_AT, _UPDATED_AT = (
    POSITION[name] for name in (
        "id", "asset_name", "partition", "run_id", "status", "upstream_assets", "upstream_partitions", "tenant_id",
        "inserted_at", "updated_at"))


def evolve(record: Materialization, **changes: Any) -> Materialization:
    """``attrs.evolve`` for records, without its per-call field introspection: every
    field read at once, the changes put in place, the record built positionally
    (hot path: a third cheaper than a dict of fields)."""
    values = list(values_of(record))
    for name, value in changes.items():
        values[POSITION[name]] = value
    return build(values)


def update_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The checked ``**fields`` of ``update_status``."""
    _check_updatable(fields)
    return {name: _as_stored(name, value) for name, value in fields.items()}


def _check_updatable(fields: Mapping[str, Any]) -> None:
    if not fields.keys() <= UPDATABLE:
        _bad_fields(fields, UPDATABLE, "update_status()")


def _as_stored(name: str, value: Any) -> Any:
    """An updated field as records hold it: the upstream assets as a tuple."""
    return tuple(value) if name == "upstream_assets" else value


def completed(
    record: Materialization, status: Status, fields: Mapping[str, Any], tenant: str | None, now: datetime
) -> Materialization:
    """``record`` as the runtime's ``complete`` moves it, checked before any store is
    asked: in the caller's tenant (else ``NotFound``), along the status machine (else
    ``InvalidTransition``), known fields only, an exception's text kept minus what a
    database cannot hold."""
    if record.tenant_id != tenant:
        raise NotFound(f"no materialization with id {str(record.id)!r}", tenant=tenant)
    check_transition(record.status, status, record)
    _check_updatable(fields)
    # ``evolve`` and ``update_fields`` in one pass (a job's end is on the hot path).
    values = list(values_of(record))
    values[_STATUS], values[_UPDATED_AT] = status, now
    for name, value in fields.items():  # _as_stored, inline
        values[POSITION[name]] = (
            storable_text(value) if name in _TEXTS and value
            else tuple(value) if name == "upstream_assets" else value)
    return build(values)


_TEXTS = frozenset({"error_message", "error_traceback"})
"""The fields ``completed`` rids of what a database cannot hold."""


def id_in_use(record: Materialization) -> DefinitionError:
    """What every store raises for a record whose id another record holds (whoever's
    it is: another tenant's id looks taken too), from ``create`` or ``begin``."""
    return DefinitionError([FieldError("id", f"a materialization with id {record.id} already exists")],
                           asset=record.asset_name, partition=record.partition, tenant=record.tenant_id)


def check_decidable(record: Materialization, approve: bool, decided: bool) -> None:
    """``InvalidTransition`` unless the record waits for a decision nobody made yet."""
    if record.status is not Status.WAITING_APPROVAL or decided:
        raise InvalidTransition(
            record.status, Status.RUNNING if approve else Status.FAILED,
            asset=record.asset_name, partition=record.partition, tenant=record.tenant_id,
            detail="it was decided already" if decided else "it is not waiting for approval",
        )


def unstorable_text(record: Materialization) -> str | None:
    """Why a text field of the record cannot be stored (a NUL, a lone surrogate), or None."""
    texts = [record.partition, record.error_message, record.error_traceback, record.executor_node,
             record.dependency_hash]
    texts += record.upstream_assets
    for name, keys in record.upstream_partitions.items():
        texts.append(name)
        texts.extend(keys)
    for text in texts:
        if text is not None and (not text.isascii() or "\x00" in text):  # text_problem's own first test
            problem = text_problem(text)
            if problem is not None:
                return problem
    return None
