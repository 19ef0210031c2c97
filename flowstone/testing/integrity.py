"""``check_integrity``: after a run full of faults, is what the store says true?

For one asset over a set of partition keys (in the current tenant):

- every record is terminal: no ``pending``, ``running`` or ``waiting_approval``
  left behind (a job that lost its lease or its process would show up here);
- every expected partition has exactly one success, and no partition has two (a
  duplicated computation or a write recorded twice);
- every success points at a value its IO manager still has (``exists``, or a
  ``load`` when the manager has no ``exists``);
- no record names a partition outside the expected set;
- listing by status finds every record of a rare status (failed, cancelled, stale,
  ...), and only records in it (PostgreSQL keeps a table of them, by triggers).

``report.problems`` lists each violation in words; ``report.ok`` is true when there
are none; ``report.raise_if_bad()`` raises ``IntegrityError`` with all of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..errors import NotFound
from ..partitions import serialize_partition
from ..runtime.job import IO_CONFIG, IO_KEY
from ..store.records import TERMINAL, Status

__all__ = ["IntegrityError", "IntegrityReport", "check_integrity"]

MAX_RECORDS = 1_000_000
_WALKED = frozenset({Status.RUNNING, Status.SUCCESS, Status.SUPERSEDED})
"""Statuses most records have (or pass through): not listed to check, a walk of them all."""


class IntegrityError(AssertionError):
    """The store and the storage disagree with what a finished run must leave."""


@attrs.frozen
class IntegrityReport:
    asset: str
    partitions: int
    records: int
    successes: int
    by_status: Mapping[str, int]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_bad(self) -> IntegrityReport:
        if self.problems:
            shown = "\n  ".join(self.problems[:50])
            more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
            raise IntegrityError(f"{self.asset}: {len(self.problems)} integrity problems:\n  {shown}{more}")
        return self


async def check_integrity(
    store: Any,
    asset: str,
    partitions: Iterable[Any],
    io_managers: Mapping[str, Any],
    *,
    default_io: str = "memory",
) -> IntegrityReport:
    expected = {serialize_partition(p) for p in partitions}
    records = await store.list_all(asset_name=asset, limit=MAX_RECORDS)
    problems: list[str] = []
    successes: Counter[str | None] = Counter()
    for record in records:
        if record.status not in TERMINAL:
            problems.append(f"record {record.id} ({record.partition}) is still {record.status.value}")
        if record.partition not in expected:
            problems.append(f"record {record.id} names partition {record.partition!r}, which was not asked for")
        if record.status is Status.SUCCESS:
            successes[record.partition] += 1
            problem = await _value_problem(record, io_managers, default_io)
            if problem is not None:
                problems.append(problem)
    for status in sorted({r.status for r in records} - _WALKED, key=str):
        held = {r.id for r in records if r.status is status}
        listed = {r.id for r in await store.list_by_status(status, limit=MAX_RECORDS) if r.asset_name == asset}
        if listed != held:
            problems.append(f"list_by_status({status.value!r}) finds {len(listed & held)} of the asset's "
                            f"{len(held)} {status.value} records and {len(listed - held)} others")
    for key in sorted(expected, key=str):
        if successes[key] == 0:
            problems.append(f"partition {key!r} has no success")
        elif successes[key] > 1:
            problems.append(f"partition {key!r} has {successes[key]} successes (duplicated)")
    return IntegrityReport(
        asset=asset,
        partitions=len(expected),
        records=len(records),
        successes=sum(successes.values()),
        by_status=dict(Counter(r.status.value for r in records)),
        problems=tuple(problems),
    )


async def _value_problem(record: Any, io_managers: Mapping[str, Any], default_io: str) -> str | None:
    key = record.metadata.get(IO_KEY, default_io)
    manager = io_managers.get(key)
    if manager is None:
        return f"success {record.id} ({record.partition}) was stored by {key!r}, which is not given"
    config = record.metadata.get(IO_CONFIG, {})
    inner = getattr(manager, "inner", manager)  # look behind a fault-injecting wrapper
    try:
        if hasattr(inner, "exists"):
            if await inner.exists(record.asset_name, record.partition, config):
                return None
        else:
            await inner.load(record.asset_name, record.partition, config)
            return None
    except NotFound:
        pass
    return f"success {record.id} ({record.partition}) points at a value {key!r} does not have"
