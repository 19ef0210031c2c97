"""What a running FlowStone tells its watchers: typed, immutable events.

Subscribe with ``async with rt.events(asset=None, kinds=None) as events:`` and
iterate ``async for event in events``. Each event carries ``at`` (UTC), ``tenant``
and ``run_id`` (the run of one materialization; ``None`` for backfill events,
which span many runs), and where it applies ``asset``, ``partition`` (the key),
``materialization_id`` and ``backfill_id``. A subscriber sees only its own
tenant's events. A slow subscriber never slows the runtime: its buffer is
bounded, and when it overflows the events that did not fit are counted and
arrive as one :class:`EventsDropped` in their place.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import attrs

__all__ = [
    "BackfillFinished",
    "BackfillProgress",
    "Event",
    "EventsDropped",
    "MaterializationCancelled",
    "MaterializationEvent",
    "MaterializationFailed",
    "MaterializationSkipped",
    "MaterializationStarted",
    "MaterializationSucceeded",
]


@attrs.frozen(kw_only=True, slots=True)
class Event:
    """Base of every event: when, for which tenant, in which run."""

    at: datetime
    tenant: str | None
    run_id: uuid.UUID | None


@attrs.frozen(kw_only=True, slots=True)
class MaterializationEvent(Event):
    """Base of the events of one materialization: its asset, partition key and record."""

    asset: str
    partition: str | None
    materialization_id: uuid.UUID


@attrs.frozen(kw_only=True, slots=True)
class MaterializationStarted(MaterializationEvent):
    """The function of ``asset`` is about to run for ``partition`` (after approval, if asked)."""


@attrs.frozen(kw_only=True, slots=True)
class MaterializationSucceeded(MaterializationEvent):
    """The value of ``asset`` for ``partition`` is stored and its record says ``success``."""

    duration_ms: float | None


@attrs.frozen(kw_only=True, slots=True)
class MaterializationFailed(MaterializationEvent):
    """The materialization failed; ``error`` is its record's one-line ``error_message``.

    (Not the exception ``fs.MaterializationFailed``: this one is a fact to watch.)"""

    error: str


@attrs.frozen(kw_only=True, slots=True)
class MaterializationCancelled(MaterializationEvent):
    """The materialization was stopped (a cancel, a shutdown) and its record says ``cancelled``."""


@attrs.frozen(kw_only=True, slots=True)
class MaterializationSkipped(MaterializationEvent):
    """Nothing to compute: ``materialization_id`` is the up-to-date success reused."""


@attrs.frozen(kw_only=True, slots=True)
class BackfillProgress(Event):
    """A partition of the backfill finished; the counts as ``rt.backfill_status`` gives them."""

    backfill_id: uuid.UUID
    asset: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


@attrs.frozen(kw_only=True, slots=True)
class BackfillFinished(Event):
    """The backfill ended: ``state`` is ``succeeded``, ``failed`` or ``cancelled``."""

    backfill_id: uuid.UUID
    asset: str
    state: str
    total: int
    succeeded: int
    failed: int
    cancelled: int


@attrs.frozen(kw_only=True, slots=True)
class EventsDropped(Event):
    """``count`` events did not fit in this subscriber's buffer and are gone; the
    ones after them follow."""

    count: int


KINDS: dict[str, type[Event]] = {
    kind.__name__: kind
    for kind in (
        MaterializationStarted, MaterializationSucceeded, MaterializationFailed, MaterializationCancelled,
        MaterializationSkipped, BackfillProgress, BackfillFinished,
    )
}
"""Every kind a subscriber may ask for, by name (``EventsDropped`` always comes)."""
