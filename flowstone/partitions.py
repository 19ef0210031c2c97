"""Partitions: their values, their one string form, and the definitions that list them.

A partition *value* is what user code sees (``date``, aware ``datetime``, ``str`` or
a tuple of those). Its *key* is the string that records, object names and the CLI
use. The mapping is a bijection for every supported value, so a key read back from
a store always gives the value that wrote it (see docs/adr/0002).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone, tzinfo
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import InvalidPartition

__all__ = [
    "CompositePartitions",
    "DailyPartitions",
    "HourlyPartitions",
    "PartitionKind",
    "PartitionRange",
    "PartitionsDefinition",
    "StaticPartitions",
    "can_map",
    "deserialize_partition",
    "partition_range",
    "serialize_partition",
]

PartitionKind = str | tuple["PartitionKind", ...]
"""``"date"``, ``"datetime"``, ``"string"``, or a tuple of kinds for composite keys."""

_KINDS = ("date", "datetime", "string")
_SEPARATOR = "|"
_ESCAPE = "\\"
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
# Hour, minute and second are required so that "2025-01-15" is not read as a
# datetime by accident; fractions and any UTC offset (or Z) are accepted.
_DATETIME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})"
)


# --------------------------------------------------------------------------- keys


def serialize_partition(partition: Any) -> str | None:
    """The canonical string key of a partition value.

    ``date`` -> ``"2025-01-15"``; aware ``datetime`` -> UTC ISO-8601 with ``Z``;
    ``str`` -> itself; ``tuple`` -> parts joined with ``|`` (``|`` and ``\\``
    inside a part are escaped with ``\\``); ``None`` -> ``None``. Raises
    :class:`~flowstone.InvalidPartition` for a naive datetime or any other type.
    """
    if partition is None:
        return None
    kind = type(partition)
    if kind is date:  # the most common partition, first
        return partition.isoformat()
    if kind is str or isinstance(partition, str):
        return partition
    if isinstance(partition, tuple):
        if not partition:
            raise InvalidPartition("a composite partition needs at least one part")
        return _SEPARATOR.join(_escape(_serialize_part(p, partition)) for p in partition)
    return _serialize_scalar(partition)


def _serialize_part(part: Any, whole: tuple[Any, ...]) -> str:
    if part is None:
        raise InvalidPartition(f"a composite partition cannot hold None: {whole!r}")
    key = serialize_partition(part)
    assert key is not None
    return key


def _serialize_scalar(partition: Any) -> str:
    if isinstance(partition, datetime):
        if partition.tzinfo is None or partition.utcoffset() is None:
            raise InvalidPartition(
                f"naive datetime {partition.isoformat()!r} is ambiguous; "
                "give it a timezone (for example tzinfo=timezone.utc)"
            )
        text = partition.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
        return f"{text}Z"
    if isinstance(partition, date):
        return partition.isoformat()
    raise InvalidPartition(
        f"unsupported partition type {type(partition).__name__}: {partition!r}; "
        "use a date, an aware datetime, a str or a tuple of those"
    )


def _escape(part: str) -> str:
    return part.replace(_ESCAPE, _ESCAPE * 2).replace(_SEPARATOR, _ESCAPE + _SEPARATOR)


def _split(key: str) -> list[str]:
    """Split a composite key on unescaped ``|`` and unescape each part."""
    if _ESCAPE not in key:
        return key.split(_SEPARATOR)  # the common case: nothing escaped
    parts: list[str] = []
    current: list[str] = []
    chars = iter(key)
    for char in chars:
        if char == _ESCAPE:
            nxt = next(chars, None)
            if nxt not in (_ESCAPE, _SEPARATOR):
                raise InvalidPartition(
                    f"malformed composite partition key {key!r}: "
                    "'\\' must be followed by '\\' or '|'"
                )
            current.append(nxt)
        elif char == _SEPARATOR:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def deserialize_partition(key: str | None, kind: PartitionKind) -> Any:
    """The partition value of a key, read as ``kind``.

    Malformed input raises :class:`~flowstone.InvalidPartition` naming the input
    and the kind that was expected.
    """
    _check_kind(kind)
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidPartition(
            f"partition key must be a str, got {type(key).__name__}: {key!r} "
            f"(expected kind {kind!r})"
        )
    return _deserialize(key, kind)


def _deserialize(key: str, kind: PartitionKind) -> Any:
    if isinstance(kind, tuple):
        parts = _split(key)
        if len(parts) != len(kind):
            raise InvalidPartition(
                f"partition key {key!r} has {len(parts)} part(s); "
                f"expected {len(kind)} for kind {kind!r}"
            )
        return tuple(_deserialize(p, k) for p, k in zip(parts, kind, strict=True))
    if kind == "string":
        return key
    if kind == "date":
        if _DATE_RE.fullmatch(key):
            try:
                return date.fromisoformat(key)
            except ValueError:
                pass
        raise InvalidPartition(f"partition key {key!r} is not a date (expected YYYY-MM-DD)")
    if _DATETIME_RE.fullmatch(key):
        try:
            return datetime.fromisoformat(key).astimezone(timezone.utc)
        except ValueError:
            pass
    raise InvalidPartition(
        f"partition key {key!r} is not an aware datetime "
        "(expected YYYY-MM-DDTHH:MM:SSZ)"
    )


def _check_kind(kind: Any) -> None:
    if isinstance(kind, tuple):
        if not kind:
            raise InvalidPartition("a composite partition kind needs at least one part")
        for k in kind:
            _check_kind(k)
    elif kind not in _KINDS:
        raise InvalidPartition(
            f"unknown partition kind {kind!r}; expected one of {_KINDS} or a tuple of them"
        )


# -------------------------------------------------------------------------- range

_CALENDAR_STEPS = ("hour", "day", "week", "month")


def partition_range(start: Any, stop: Any, step: str | timedelta = "day") -> PartitionRange:
    """Every partition from ``start`` to ``stop``, both included, as a lazy sequence.

    ``step`` is ``"hour"``, ``"day"``, ``"week"``, ``"month"`` or a positive
    ``timedelta``. Dates take whole-day steps; datetimes must be timezone-aware and
    are stepped in UTC, so a daylight-saving change never skips or repeats an hour.
    Months step from ``start`` with the day clamped to the month's end (Jan 31 ->
    Feb 28 -> Mar 31), so the sequence does not drift. The result is never built
    as a list: ``len``, indexing, ``in`` and iteration compute each item, and it
    equals the list of its items.
    """
    if type(start) is not type(stop) or not isinstance(start, date):
        raise InvalidPartition(
            f"partition_range needs two dates or two aware datetimes, got "
            f"{type(start).__name__} {start!r} and {type(stop).__name__} {stop!r}"
        )
    is_datetime = isinstance(start, datetime)
    if isinstance(start, datetime) and isinstance(stop, datetime):
        for bound in (start, stop):
            if bound.tzinfo is None or bound.utcoffset() is None:
                raise InvalidPartition(
                    f"naive datetime {bound.isoformat()!r} in partition_range; "
                    "give it a timezone"
                )
        start = start.astimezone(timezone.utc)
        stop = stop.astimezone(timezone.utc)
    if start > stop:
        raise InvalidPartition(
            f"partition_range start {serialize_partition(start)!r} is after stop "
            f"{serialize_partition(stop)!r}"
        )
    if step == "month":
        return PartitionRange(start, stop, "month", None, _months_between(start, stop) + 1)
    delta = _step_delta(step, is_datetime)
    return PartitionRange(start, stop, step, delta, (stop - start) // delta + 1)


class PartitionRange(Sequence[Any]):
    """The partitions ``start``, ``start + step``, ... up to ``stop`` (made by
    :func:`partition_range`): a sequence that computes its items instead of holding
    them, so ten million hourly partitions take a few hundred bytes."""

    __slots__ = ("_count", "_delta", "start", "step", "stop")

    def __init__(self, start: Any, stop: Any, step: str | timedelta, delta: timedelta | None, count: int) -> None:
        self.start, self.stop, self.step = start, stop, step
        self._delta, self._count = delta, count

    @property
    def step_delta(self) -> timedelta | None:
        """The fixed step, or None for calendar months."""
        return self._delta

    @property
    def last(self) -> Any:
        """The last partition (``stop`` itself when the step lands on it)."""
        return self[self._count - 1]

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not isinstance(index, int):
            raise TypeError(f"partition range indices must be integers or slices, not {type(index).__name__}")
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("partition range index out of range")
        if self._delta is None:
            return _add_months(self.start, index)
        return self.start + self._delta * index

    def __iter__(self) -> Any:
        if self._delta is None:
            return (_add_months(self.start, i) for i in range(self._count))
        return itertools.accumulate(itertools.repeat(self._delta, self._count - 1), initial=self.start)

    def __contains__(self, value: Any) -> bool:
        if type(value) is not type(self.start) or (isinstance(value, datetime) and value.utcoffset() is None):
            return False
        if self._delta is None:
            return self.start <= value <= self.stop and value == _add_months(
                self.start, _months_between(self.start, value))
        offset = value - self.start
        return offset >= timedelta(0) and offset // self._delta < self._count and not offset % self._delta

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        if value not in self:
            raise ValueError(f"{value!r} is not in {self!r}")
        found = _months_between(self.start, value) if self._delta is None else (value - self.start) // self._delta
        if found < start or (stop is not None and found >= stop):
            raise ValueError(f"{value!r} is not in {self!r} between {start} and {stop}")
        return found

    def count(self, value: Any) -> int:
        return 1 if value in self else 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PartitionRange) and other._delta == self._delta:
            return self._count == other._count and (not self._count or self.start == other.start)
        if isinstance(other, (list, tuple, PartitionRange)):
            return len(other) == self._count and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        step = self.step if isinstance(self.step, str) else repr(self.step)
        return (f"partition_range({serialize_partition(self.start)!r}, {serialize_partition(self.stop)!r}, "
                f"{step!r}) ({self._count} partitions)")


def _months_between(start: date, value: date) -> int:
    """How many month steps from ``start`` stay at or before ``value``."""
    months = (value.year - start.year) * 12 + value.month - start.month
    if months > 0 and _add_months(start, months) > value:
        months -= 1
    return months


def _step_delta(step: Any, is_datetime: bool) -> timedelta:
    if isinstance(step, timedelta):
        delta = step
    elif step in ("hour", "day", "week"):
        delta = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}[step]
    else:
        raise InvalidPartition(
            f"unknown partition step {step!r}; use one of {_CALENDAR_STEPS} or a timedelta"
        )
    if delta <= timedelta(0):
        raise InvalidPartition(f"partition step must be positive, got {delta}")
    if not is_datetime and delta % timedelta(days=1):
        raise InvalidPartition(
            f"step {step!r} is finer than a day; date partitions step in whole days "
            "(use datetimes for hourly partitions)"
        )
    return delta


def _add_months(value: date, months: int) -> date:
    index = value.month - 1 + months
    year, month = value.year + index // 12, index % 12 + 1
    day = min(value.day, _days_in_month(year, month))
    return value.replace(year=year, month=month, day=day)


def _days_in_month(year: int, month: int) -> int:
    nxt = date(year + month // 12, month % 12 + 1, 1)
    return (nxt - timedelta(days=1)).day


# -------------------------------------------------------------------- definitions


class PartitionsDefinition:
    """Base of the partition definitions: the set of partitions an asset has.

    ``keys()`` lists partition *values* (what ``materialize`` and ``backfill``
    take), ``kind`` says how keys are read back, and ``validate(p)`` returns the
    canonical value of ``p`` (accepting its string key too) or raises
    :class:`~flowstone.InvalidPartition`.
    """

    kind: ClassVar[PartitionKind]

    def keys(self, start: Any = None, end: Any = None) -> list[Any]:
        """The partitions from ``start`` to ``end`` (both included, either open).
        Raises ``InvalidPartition`` for a bound that is not a partition here."""
        raise NotImplementedError

    def validate(self, partition: Any) -> Any:
        """The canonical value of ``partition`` (or of its string key). Raises
        ``InvalidPartition`` saying what a partition here looks like."""
        raise NotImplementedError

    def validate_range(self, partitions: PartitionRange) -> PartitionRange | None:
        """``partitions`` when every item is a canonical partition of this definition,
        decided from its ends and its step without visiting each item; ``None`` when
        that cannot be told so (check the items one by one). Raises
        :class:`~flowstone.InvalidPartition` when some items are not partitions here."""
        return None

    def key(self, partition: Any) -> str:
        """The string key of a partition of this definition, validated first
        (``InvalidPartition`` otherwise)."""
        key = serialize_partition(self.validate(partition))
        assert key is not None
        return key


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@attrs.frozen
class _TimeWindowPartitions(PartitionsDefinition):
    """Shared logic of the calendar definitions: ``start`` to ``end``, both included.

    With no ``end``, ``keys()`` stops at the last *complete* period (yesterday,
    the previous hour), as a scheduler would; ``validate`` still accepts any
    period from ``start`` on, so a run for the current period is allowed.
    ``timezone`` (an IANA name; UTC when None) says where days and hours are
    local: a day runs from local midnight to local midnight (23 or 25 hours on
    daylight-saving days), an hour starts on a local hour.
    """

    _step: ClassVar[str]
    if TYPE_CHECKING:  # the subclasses' fields, typed by each of them
        start: Any
        end: Any
        timezone: str | None

    def __attrs_post_init__(self) -> None:
        zone_of(self.timezone)  # an unknown name fails here
        object.__setattr__(self, "start", self._bound(self.start, "start"))
        if self.end is not None:
            object.__setattr__(self, "end", self._bound(self.end, "end"))
        end = self.end
        if end is not None and end < self.start:
            raise InvalidPartition(
                f"{type(self).__name__} end {serialize_partition(end)!r} is before start "
                f"{serialize_partition(self.start)!r}"
            )

    @property
    def zone(self) -> tzinfo:
        """The ``tzinfo`` of ``timezone`` (UTC when it is None)."""
        return zone_of(self.timezone)

    def keys(self, start: Any = None, end: Any = None) -> PartitionRange:  # type: ignore[override]
        """Partitions from ``start`` to ``end`` (both included), clamped to the definition."""
        lo = self.start if start is None else max(self._value(start), self.start)
        hi = self._last_complete() if self.end is None else self.end
        if end is not None:
            hi = min(self._value(end), hi)
        if lo > hi:
            return _empty(lo, self._step)
        return partition_range(lo, hi, self._step)

    def validate(self, partition: Any) -> Any:
        return self._check_bounds(self._value(partition))

    def validate_range(self, partitions: PartitionRange) -> PartitionRange:
        if partitions:
            # both ends in bounds and of this type: every item between is too
            self.validate(partitions.start)
            self.validate(partitions.last)
            if not self._aligned(partitions):
                raise InvalidPartition(
                    f"{partitions!r} steps off {type(self).__name__}'s {self._step} boundaries"
                )
        return partitions

    def window(self, partition: Any) -> tuple[datetime, datetime]:
        """When the partition's period starts and ends (end excluded), in UTC (two
        datetimes of one ``ZoneInfo`` subtract as wall clocks: a 25-hour day would
        measure 24). ``.astimezone(definition.zone)`` shows them locally."""
        raise NotImplementedError

    def _aligned(self, partitions: PartitionRange) -> bool:
        """Whether a range starting on a partition lands on partitions at every step."""
        return True  # dates step in whole days

    def _bound(self, value: Any, which: str) -> Any:
        """``start`` or ``end`` as this definition's type."""
        raise NotImplementedError

    def _value(self, partition: Any) -> Any:
        """The partition as this definition's type, without the range check."""
        raise NotImplementedError

    def _check_bounds(self, value: Any) -> Any:
        if value < self.start or (self.end is not None and value > self.end):
            end = "open" if self.end is None else repr(serialize_partition(self.end))
            raise InvalidPartition(
                f"partition {serialize_partition(value)!r} is outside "
                f"{type(self).__name__}(start={serialize_partition(self.start)!r}, end={end})"
            )
        return value

    def _last_complete(self) -> Any:
        raise NotImplementedError


@functools.lru_cache(maxsize=64)
def zone_of(name: str | None) -> tzinfo:
    """The time zone named ``name`` (an IANA name such as ``"America/Los_Angeles"``),
    UTC for None; ``InvalidPartition`` for anything else."""
    if name is None:
        return timezone.utc
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise InvalidPartition(f"timezone must be an IANA name such as 'America/Los_Angeles', got {name!r}")
    import zoneinfo  # here: UTC-only pipelines never load the time zone database

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise InvalidPartition(
            f"unknown time zone {name!r}: use an IANA name such as 'America/Los_Angeles' ({error})"
        ) from None


def local_midnight(day: date, zone: tzinfo) -> datetime:
    """When ``day`` starts in ``zone``, in UTC: its local midnight, or the first local
    time after it where midnight does not exist (a clock change at midnight)."""
    # fold=0 reads a skipped wall time with the offset before the change, which
    # lands on the first instant after the gap; a repeated midnight is its first.
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(timezone.utc)


def _empty(start: Any, step: str) -> PartitionRange:
    return PartitionRange(start, start, step, _step_delta(step, isinstance(start, datetime)), 0)


def _require_date(value: Any, what: str) -> date:
    if isinstance(value, str):
        value = deserialize_partition(value, "date")
    if not isinstance(value, date) or isinstance(value, datetime):
        raise InvalidPartition(f"{what} must be a date, got {type(value).__name__}: {value!r}")
    return value


@attrs.frozen
class DailyPartitions(_TimeWindowPartitions):
    """One partition per calendar day from ``start`` (a ``date``), local to ``timezone``."""

    kind: ClassVar[PartitionKind] = "date"
    _step: ClassVar[str] = "day"

    start: date
    end: date | None = None
    timezone: str | None = None

    def _bound(self, value: Any, which: str) -> date:
        return _require_date(value, f"DailyPartitions {which}")

    def _value(self, partition: Any) -> date:
        return _require_date(partition, "daily partition")

    def window(self, partition: Any) -> tuple[datetime, datetime]:
        day, zone = self.validate(partition), self.zone
        return local_midnight(day, zone), local_midnight(day + timedelta(days=1), zone)

    def _last_complete(self) -> date:
        return _utcnow().astimezone(self.zone).date() - timedelta(days=1)


def _require_hour(value: Any, what: str, zone: tzinfo = timezone.utc, *, naive_is_local: bool = False) -> datetime:
    if isinstance(value, str):
        value = deserialize_partition(value, "datetime")
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = local_midnight(value, zone)
    if not isinstance(value, datetime):
        raise InvalidPartition(f"{what} must be an aware datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        if not naive_is_local:
            raise InvalidPartition(f"{what} {value.isoformat()!r} is naive; give it a timezone")
        value = value.replace(tzinfo=zone)  # a wall time in the definition's zone
    value = value.astimezone(timezone.utc)
    local = value.astimezone(zone)
    if (local.minute, local.second, local.microsecond) != (0, 0, 0):
        where = "" if zone is timezone.utc else f" in {zone}"
        raise InvalidPartition(f"{what} {serialize_partition(value)!r} is not on the hour{where}")
    return value


@attrs.frozen
class HourlyPartitions(_TimeWindowPartitions):
    """One partition per hour from ``start`` (an aware datetime on the hour, or a
    date for its midnight); hours start on the hour of ``timezone`` (UTC when None).

    Partitions are the hours' starting instants, as UTC datetimes (keys end in
    ``Z``): a fall-back night's two local 01:00 hours are two partitions, a
    spring-forward night has no local 02:00. ``start`` and ``end`` may be naive
    when ``timezone`` is given: they are read as local wall times.
    """

    kind: ClassVar[PartitionKind] = "datetime"
    _step: ClassVar[str] = "hour"

    start: datetime
    end: datetime | None = None
    timezone: str | None = None

    def __attrs_post_init__(self) -> None:
        zone = zone_of(self.timezone)
        if self.timezone is not None:
            _check_whole_hour_shifts(self.timezone, zone, self.start)
        super().__attrs_post_init__()

    def _bound(self, value: Any, which: str) -> datetime:
        return _require_hour(value, f"HourlyPartitions {which}", self.zone, naive_is_local=self.timezone is not None)

    def _value(self, partition: Any) -> datetime:
        if isinstance(partition, date) and not isinstance(partition, datetime):
            raise InvalidPartition(f"hourly partition must be an aware datetime, got date {partition}")
        return _require_hour(partition, "hourly partition", self.zone)

    def window(self, partition: Any) -> tuple[datetime, datetime]:
        hour = self.validate(partition)
        return hour, hour + timedelta(hours=1)

    def _last_complete(self) -> datetime:
        local = _utcnow().astimezone(self.zone).replace(minute=0, second=0, microsecond=0)
        return local.astimezone(timezone.utc) - timedelta(hours=1)

    def _aligned(self, partitions: PartitionRange) -> bool:
        step = partitions.step_delta
        return step is None or not step % timedelta(hours=1)


def _check_whole_hour_shifts(name: str, zone: tzinfo, start: Any) -> None:
    """Hourly partitions step one hour at a time; a zone whose clocks shift by part of
    an hour (Lord Howe Island) would move its hours off the hour."""
    year = start.year if isinstance(start, date) else 2000
    offsets = {datetime(year, month, 1, 12, tzinfo=zone).utcoffset() for month in (1, 4, 7, 10)}
    if len({offset % timedelta(hours=1) for offset in offsets if offset is not None}) > 1:
        raise InvalidPartition(f"hourly partitions in {name!r} are not supported: its clocks shift by part of an hour")


def _static_keys(keys: Iterable[str]) -> tuple[str, ...]:
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise InvalidPartition(f"StaticPartitions takes a list of string keys, got {keys!r}")
    result = tuple(keys)
    if not result:
        raise InvalidPartition("StaticPartitions needs at least one key")
    seen: set[str] = set()
    for key in result:
        if not isinstance(key, str) or not key:
            raise InvalidPartition(f"static partition keys must be non-empty strings, got {key!r}")
        if key in seen:
            raise InvalidPartition(f"static partition key {key!r} is listed twice")
        seen.add(key)
    return result


@attrs.frozen(init=False)
class StaticPartitions(PartitionsDefinition):
    """A fixed list of string keys (regions, customers, ...), in the order given.

    The keys are kept in ``partition_keys``: the name ``keys`` belongs to the
    method every definition has.
    """

    kind: ClassVar[PartitionKind] = "string"

    partition_keys: tuple[str, ...]
    _positions: Mapping[str, int] = attrs.field(eq=False, repr=False, hash=False, alias="positions")
    """Each key's place in ``partition_keys``: validating a key is one lookup, not a
    scan (80,000 keys took 49 s to check a backfill's partitions by scanning)."""

    def __init__(self, keys: Iterable[str]) -> None:
        checked = _static_keys(keys)
        self.__attrs_init__(checked, MappingProxyType({key: place for place, key in enumerate(checked)}))

    def keys(self, start: Any = None, end: Any = None) -> list[Any]:
        lo = 0 if start is None else self._positions[self.validate(start)]
        hi = len(self.partition_keys) if end is None else self._positions[self.validate(end)] + 1
        return list(self.partition_keys[lo:hi])

    def validate(self, partition: Any) -> str:
        """``partition`` itself; ``InvalidPartition`` listing the keys if it is not one."""
        if type(partition) is not str or partition not in self._positions:
            shown = ", ".join(repr(k) for k in self.partition_keys[:10])
            more = ", ..." if len(self.partition_keys) > 10 else ""
            raise InvalidPartition(f"partition {partition!r} is not one of [{shown}{more}]")
        return partition


def _dimensions(dims: Sequence[Any]) -> tuple[PartitionsDefinition, ...]:
    dims = tuple(dims)
    if len(dims) < 2:
        raise InvalidPartition("CompositePartitions needs at least two dimensions")
    for dim in dims:
        if not isinstance(dim, PartitionsDefinition) or isinstance(dim, CompositePartitions):
            raise InvalidPartition(
                f"CompositePartitions dimensions must be Daily, Hourly or Static "
                f"partitions, got {dim!r}"
            )
    return dims


@attrs.frozen(init=False)
class CompositePartitions(PartitionsDefinition):
    """The product of several dimensions; a partition is a tuple with one value each.

    ``CompositePartitions(StaticPartitions(["eu", "us"]), DailyPartitions(d))``
    has partitions like ``("eu", date(2025, 1, 15))``, keyed ``"eu|2025-01-15"``.
    """

    dimensions: tuple[PartitionsDefinition, ...]

    def __init__(self, *dimensions: PartitionsDefinition) -> None:
        self.__attrs_init__(_dimensions(dimensions))

    @property
    def kind(self) -> PartitionKind:  # type: ignore[override]
        return tuple(d.kind for d in self.dimensions)

    def keys(self, start: Any = None, end: Any = None) -> list[Any]:
        """The product of each dimension's keys; ``start``/``end`` bound each dimension.

        ``start`` and ``end`` are tuples with one bound (or ``None``) per dimension.
        """
        starts = self._bounds(start)
        ends = self._bounds(end)
        per_dim = [d.keys(s, e) for d, s, e in zip(self.dimensions, starts, ends, strict=True)]
        return list(itertools.product(*per_dim))

    def _bounds(self, bound: Any) -> tuple[Any, ...]:
        if bound is None:
            return (None,) * len(self.dimensions)
        if not isinstance(bound, tuple) or len(bound) != len(self.dimensions):
            raise InvalidPartition(
                f"composite bound {bound!r} must be a tuple with one value per dimension "
                f"({len(self.dimensions)})"
            )
        return bound

    def validate(self, partition: Any) -> tuple[Any, ...]:
        """The canonical tuple, one value per dimension (the key string is read too);
        ``InvalidPartition`` naming the dimension that refuses its value."""
        if isinstance(partition, str):
            partition = deserialize_partition(partition, self.kind)
        if not isinstance(partition, tuple) or len(partition) != len(self.dimensions):
            raise InvalidPartition(
                f"composite partition must be a tuple of {len(self.dimensions)} values, "
                f"got {partition!r}"
            )
        return tuple(d.validate(p) for d, p in zip(self.dimensions, partition, strict=True))


def can_map(upstream: PartitionsDefinition | None, downstream: PartitionsDefinition | None) -> bool:
    """Whether a ``downstream`` asset can read ``upstream`` with the built-in mappings.

    Identity (same definition class and kind, and for days and hours the same
    time zone: each partition reads the same partition upstream, which must exist
    there), all-partitions (an unpartitioned
    asset reads every upstream partition) and broadcast (a partitioned asset reads
    an unpartitioned upstream's single value). See docs/adr/0002.
    """
    if upstream is None or downstream is None:
        return True
    if type(upstream) is not type(downstream):
        return False
    if isinstance(upstream, StaticPartitions):
        assert isinstance(downstream, StaticPartitions)
        return set(downstream.partition_keys) <= set(upstream.partition_keys)
    if isinstance(upstream, CompositePartitions):
        assert isinstance(downstream, CompositePartitions)
        return len(upstream.dimensions) == len(downstream.dimensions) and all(
            can_map(u, d) for u, d in zip(upstream.dimensions, downstream.dimensions, strict=True)
        )
    if isinstance(upstream, _TimeWindowPartitions) and isinstance(downstream, _TimeWindowPartitions):
        # 2025-03-09 in Los Angeles is not the UTC day of that date: same zone only
        return upstream.timezone == downstream.timezone
    return True
