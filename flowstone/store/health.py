"""Partition health: each partition's state from its latest record, as counts and as
runs of consecutive partitions (what ``flowstone status`` prints and the web view draws)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from ..partitions import serialize_partition

__all__ = ["MAX_SEGMENTS", "STATES", "health", "key_strings", "partition_summary", "state_of"]

STATES = ("succeeded", "failed", "missing", "stale", "running")
"""A partition's state, from the status of its latest record."""

MAX_SEGMENTS = 1000
"""A health bar draws at most this many segments; beyond, partitions are grouped evenly."""

_STATE_OF = {
    "success": "succeeded", "stale": "stale", "failed": "failed", "cancelled": "missing",
    "running": "running", "pending": "running", "waiting_approval": "running",
}


def state_of(status: Any) -> str:
    """The state of a partition whose latest record has ``status`` (None: no record)."""
    return "missing" if status is None else _STATE_OF.get(str(status), "missing")


def key_strings(definition: Any) -> list[str]:
    """Every partition key of ``definition``, in order (dates take a short cut: the
    keys of a daily definition are their ISO dates)."""
    values = definition.keys()
    if len(values) and type(values[0]) is date:
        return [value.isoformat() for value in values]
    return [serialize_partition(value) for value in values]  # type: ignore[misc]


def health(
    keys: Sequence[str | None], states: Mapping[str | None, Any], *, max_segments: int | None = MAX_SEGMENTS,
) -> dict[str, Any]:
    """Counts per state and the partitions in key order as ``segments``: runs
    ``[first key, last key, count, {state: count}]`` of one state each. Past
    ``max_segments`` runs (None: never), a segment is instead one of that many even groups,
    with the count of each state in it (neighbouring groups all in one state are
    merged), so the bar stays drawable at any size and shows every failure."""
    limit = len(keys) + 1 if max_segments is None else max_segments
    name_of = {status: state_of(status) for status in set(states.values())}
    get = states.get
    named = [name_of[found] if (found := get(key)) is not None else "missing" for key in keys]
    counts = dict.fromkeys(STATES, 0)
    counts.update(Counter(named))
    segments: list[list[Any]] = []
    start = 0
    for state, group in itertools.groupby(named):
        count = sum(1 for _ in group)
        segments.append([keys[start], keys[start + count - 1], count, {state: count}])
        start += count
        if len(segments) > limit:
            break
    grouped = len(segments) > limit
    if grouped:
        segments = []
        size = -(-len(keys) // limit)
        for first in range(0, len(keys), size):
            last = min(first + size, len(keys)) - 1
            inside = dict(Counter(named[first:last + 1]))
            if segments and len(inside) == 1 and segments[-1][3].keys() == inside.keys():
                segments[-1][1] = keys[last]
                segments[-1][2] += last - first + 1
                segments[-1][3] = {state: segments[-1][2] for state in inside}
            else:
                segments.append([keys[first], keys[last], last - first + 1, inside])
    return {"total": len(keys), "counts": counts, "segments": segments, "grouped": grouped}


def partition_summary(keys: Sequence[str | None], states: Mapping[str | None, Any]) -> dict[str, Any]:
    """Counts per state and the runs of consecutive partitions in one state, in the
    definition's order: ``{"total", "counts": {state: n}, "ranges": {state: [[first,
    last, n], ...]}}``. A partition without a record is missing."""
    found = health(keys, states, max_segments=None)
    ranges: dict[str, list[list[Any]]] = {state: [] for state in STATES}
    for first, last, count, inside in found["segments"]:
        [state] = inside
        ranges[state].append([first, last, count])
    return {"total": found["total"], "counts": found["counts"], "ranges": ranges}
