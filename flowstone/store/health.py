"""Partition health: each partition's state from its latest record, as counts and as
runs of consecutive partitions (what ``flowstone status`` prints and the web view draws)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["STATES", "partition_summary", "state_of"]

STATES = ("succeeded", "failed", "missing", "stale", "running")
"""A partition's state, from the status of its latest record."""

_STATE_OF = {
    "success": "succeeded", "stale": "stale", "failed": "failed", "cancelled": "missing",
    "running": "running", "pending": "running", "waiting_approval": "running",
}


def state_of(status: Any) -> str:
    """The state of a partition whose latest record has ``status`` (None: no record)."""
    return "missing" if status is None else _STATE_OF.get(str(status), "missing")


def partition_summary(keys: Iterable[str | None], states: Mapping[str | None, Any]) -> dict[str, Any]:
    """Counts per state and the runs of consecutive partitions in one state, in the
    definition's order: ``{"total", "counts": {state: n}, "ranges": {state: [[first,
    last, n], ...]}}``. A partition without a record is missing."""
    counts = dict.fromkeys(STATES, 0)
    ranges: dict[str, list[list[Any]]] = {state: [] for state in STATES}
    current: list[Any] | None = None
    current_state = None
    total = 0
    for key in keys:
        state = state_of(states.get(key))
        counts[state] += 1
        total += 1
        if state == current_state and current is not None:
            current[1] = key
            current[2] += 1
        else:
            current, current_state = [key, key, 1], state
            ranges[state].append(current)
    return {"total": total, "counts": counts, "ranges": ranges}
