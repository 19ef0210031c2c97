"""What the store keeps of a backfill: what it was asked to do, how far it got, and
their JSON form for databases. The runtime's backfill actor fills them in
(``flowstone.runtime.backfill``); the stores only keep them."""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs

from ..partitions import PartitionRange, deserialize_partition, partition_range, serialize_partition
from ..plumbing.jsonvalues import plain, to_json

__all__ = [
    "BackfillSpec", "BackfillStatus", "Saved", "WrittenSpecs", "saved_from_json", "spec_to_json", "status_from_json",
    "status_to_json",
]


@attrs.frozen
class BackfillSpec:
    """What a backfill was asked to do; saved in the store so it can be resumed."""

    id: uuid.UUID
    asset: str
    partitions: Sequence[Any]
    """A tuple of partitions, or a lazy ``PartitionRange`` (saved as its ends and step)."""
    max_parallel: int
    upstream: str
    force: bool
    io: Mapping[str, Any] | None
    context: Mapping[str, Any] | None
    tenant: str | None
    workers: bool = False
    """Run on ``flowstone worker`` processes (through the runtime's queue), not here."""


@attrs.frozen
class BackfillStatus:
    """A snapshot of a backfill's progress. ``state``: running, succeeded, failed, cancelled.
    ``interrupted``: cancelled because the process running it stopped (a shutdown),
    not because anyone asked; ``flowstone daemon`` resumes such a backfill when it starts."""

    id: uuid.UUID
    asset: str
    state: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    errors: tuple[tuple[str | None, str], ...] = ()
    started_at: datetime | None = None
    finished_at: datetime | None = None
    interrupted: bool = False

    @property
    def done(self) -> bool:
        return self.state != "running"


@attrs.frozen
class Saved:
    """What the store keeps per backfill."""

    spec: BackfillSpec
    status: BackfillStatus


_COUNTS = ("state", "total", "queued", "running", "succeeded", "failed", "cancelled")


def spec_to_json(spec: BackfillSpec) -> str:
    """The spec as JSON text for a database; partitions are kept as their keys (a
    resumed backfill validates them again), a range as its two ends and its step.
    ``io`` and ``context`` must be JSON: a backfill that cannot be saved does not
    start. A list of a million partitions is 13 MB of it and a second to make: a
    store writes it once per backfill (``WrittenSpecs``), not at every save."""
    return to_json(
        {
            "id": str(spec.id), "asset": spec.asset,
            "partitions": _partitions_to_json(spec.partitions),
            "max_parallel": spec.max_parallel, "upstream": spec.upstream, "force": spec.force,
            "io": plain(spec.io), "context": plain(spec.context), "tenant": spec.tenant,
            "workers": spec.workers,
        },
        asset=spec.asset, what="the backfill's io and context",
    )


def status_to_json(saved: Saved) -> tuple[str, str]:
    """``(status, state)``: the status as JSON text for a database, and its state."""
    status = saved.status
    status_json = to_json(
        {
            **{name: getattr(status, name) for name in _COUNTS},
            "errors": [list(error) for error in status.errors],
            "started_at": status.started_at.isoformat() if status.started_at else None,
            "finished_at": status.finished_at.isoformat() if status.finished_at else None,
            "interrupted": status.interrupted,
        },
        asset=saved.spec.asset, what="the backfill's status",
    )
    return status_json, status.state


class WrittenSpecs:
    """The specs a store has written, by backfill id, while their backfills hold
    them: a save whose spec is the very object written before (the same running
    backfill, checkpointing) writes the status alone. A spec never changes under
    its id; a resumed backfill's is a new object, so its first save writes it."""

    __slots__ = ("_specs",)

    def __init__(self) -> None:
        self._specs: weakref.WeakValueDictionary[uuid.UUID, BackfillSpec] = weakref.WeakValueDictionary()

    def written(self, spec: BackfillSpec) -> bool:
        """Whether this store wrote ``spec`` itself (this object) before."""
        return self._specs.get(spec.id) is spec

    def wrote(self, spec: BackfillSpec) -> None:
        self._specs[spec.id] = spec


def saved_from_json(spec_text: str, status_text: str) -> Saved:
    raw, state = json.loads(spec_text), json.loads(status_text)
    spec = BackfillSpec(
        id=uuid.UUID(raw["id"]), asset=raw["asset"], partitions=_partitions_from_json(raw["partitions"]),
        max_parallel=raw["max_parallel"], upstream=raw["upstream"], force=raw["force"],
        io=raw["io"], context=raw["context"], tenant=raw["tenant"],
        workers=raw.get("workers", False),  # absent from what earlier versions saved
    )
    return Saved(spec, _status(state, spec.id, spec.asset))


def status_from_json(status_text: str, id: uuid.UUID, asset: str) -> BackfillStatus:
    """The status of backfill ``id`` (of ``asset``) from its JSON text alone."""
    return _status(json.loads(status_text), id, asset)


def _status(state: Mapping[str, Any], id: uuid.UUID, asset: str) -> BackfillStatus:
    return BackfillStatus(
        id=id, asset=asset, **{k: state[k] for k in _COUNTS},
        errors=tuple((key, message) for key, message in state["errors"]),
        started_at=datetime.fromisoformat(state["started_at"]) if state["started_at"] else None,
        finished_at=datetime.fromisoformat(state["finished_at"]) if state["finished_at"] else None,
        interrupted=state.get("interrupted", False),  # absent from what earlier versions saved
    )


def _partitions_to_json(partitions: Sequence[Any]) -> Any:
    if isinstance(partitions, PartitionRange):
        step = partitions.step if isinstance(partitions.step, str) else partitions.step.total_seconds()
        kind = "datetime" if isinstance(partitions.start, datetime) else "date"
        return {"range": [serialize_partition(partitions.start), serialize_partition(partitions.stop), step, kind]}
    return [serialize_partition(p) for p in partitions]


def _partitions_from_json(saved: Any) -> Sequence[Any]:
    if isinstance(saved, dict):
        start, stop, step, kind = saved["range"]
        return partition_range(
            deserialize_partition(start, kind), deserialize_partition(stop, kind),
            step if isinstance(step, str) else timedelta(seconds=step),
        )
    return tuple(saved)

