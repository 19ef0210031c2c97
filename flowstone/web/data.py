"""What the web view's pages show, as plain JSON-ready dicts (each page's ``/api/`` twin).

Every function reads a bounded amount: a page of records, one lookup per upstream or
downstream asset, the partition states of one asset (one query, no records built).
No third-party import here: ``flowstone status`` uses the same functions.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from ..dag import execution_layers
from ..pipeline import Pipeline
from ..plumbing.clock import utcnow
from ..store.health import health, key_strings
from ..tenancy import current_tenant

__all__ = [
    "PAGE", "HealthCache", "asset_data", "backfill_json", "backfills_data", "daemon_data", "daemon_json", "graph_data",
    "record_data", "record_json", "sensor_json",
]

PAGE = 50
"""Records per page."""


def graph_data(pipeline: Pipeline) -> dict[str, Any]:
    """Assets in layers (an asset's layer is one more than its deepest upstream's) and edges."""
    assets = pipeline.assets
    layers = execution_layers(assets)
    return {
        "layers": layers,
        "assets": [{"name": a.name, "partitioned": a.partitioned_by is not None, "depends_on": list(a.depends_on),
                    "automation": automation_name(a.automation)} for a in assets],
        "edges": [[up, a.name] for a in assets for up in a.depends_on],
    }


def automation_name(automation: Any) -> str | None:
    """``"eager"``, ``"on_missing"`` or None."""
    return None if automation is None else {"Eager": "eager", "OnMissing": "on_missing"}[type(automation).__name__]


class HealthCache:
    """Each asset's partition health (per tenant), the one part of a page whose cost
    grows with the asset: it reads the state of every partition. One computed less than
    ``seconds`` ago is used as it is. An older one, up to ``stale`` seconds, is used too
    when the caller can refresh it after answering (``later``: a list the refresh is
    appended to); else, or when older still, it is computed now."""

    def __init__(self, seconds: float = 1.0, *, stale: float = 60.0) -> None:
        self.seconds, self.stale = seconds, stale
        self._entries: dict[tuple[str | None, str], tuple[float, dict[str, Any]]] = {}
        self._keys: dict[str, tuple[int, list[Any]]] = {}
        self._refreshing: set[tuple[str | None, str]] = set()

    async def health(self, store: Any, asset: Any, *, later: list[Any] | None = None) -> dict[str, Any]:
        key, now = (current_tenant(), asset.name), time.monotonic()
        found = self._entries.get(key)
        if found is not None and now - found[0] < self.seconds:
            return found[1]
        if found is not None and later is not None and now - found[0] < self.stale:
            if key not in self._refreshing:  # one refresh at a time per asset
                self._refreshing.add(key)
                later.append(functools.partial(self._refresh, store, asset, key))
            return found[1]
        return await self._refresh(store, asset, key)

    async def _refresh(self, store: Any, asset: Any, key: tuple[str | None, str]) -> dict[str, Any]:
        try:
            states = await store.partition_states(asset.name)
            computed = {**health(self.keys(asset), states), "as_of": utcnow().isoformat()}
            self._entries[key] = (time.monotonic(), computed)
            return computed
        finally:
            self._refreshing.discard(key)

    def keys(self, asset: Any) -> list[Any]:
        """The asset's partition keys as text, made again only when their number changes
        (an open-ended daily definition gains a key a day)."""
        definition = asset.partitioned_by
        if definition is None:
            return [None]
        count = len(definition.keys())
        found = self._keys.get(asset.name)
        if found is None or found[0] != count:
            found = self._keys[asset.name] = (count, key_strings(definition))
        return found[1]


async def asset_data(store: Any, pipeline: Pipeline, name: str, *, before: str | None = None,
                     limit: int = PAGE, cache: HealthCache | None = None,
                     later: list[Any] | None = None) -> dict[str, Any]:
    """One asset: its definition, partition health (counts, segments in key order, as of
    when) and one page of its records, newest first (``next`` is the bookmark of the
    next page). ``cache`` and ``later``: see ``HealthCache``."""
    asset = pipeline.get(name)
    definition = asset.partitioned_by
    records = await store.list_all(asset_name=name, limit=limit + 1, before=before)
    shown = records[:limit]
    return {
        "asset": name, "description": asset.description, "depends_on": list(asset.depends_on),
        "dependents": _readers(pipeline, name), "partitioned": definition is not None,
        "automation": automation_name(asset.automation), "code_version": asset.code_version,
        "health": await (cache or HealthCache(0)).health(store, asset, later=later),
        "records": [record_json(r) for r in shown],
        "next": str(shown[-1].id) if len(records) > limit else None,
    }


def record_json(record: Any) -> dict[str, Any]:
    """A record, every field, as JSON values."""
    return {
        "id": str(record.id), "asset": record.asset_name, "partition": record.partition, "run_id": str(record.run_id),
        "status": record.status.value,
        "started_at": record.started_at.isoformat() if record.started_at else None,
        "completed_at": record.completed_at.isoformat() if record.completed_at else None,
        "duration_ms": record.duration_ms,
        "upstream_partitions": {k: list(v) for k, v in record.upstream_partitions.items()},
        "dependency_hash": record.dependency_hash, "metadata": dict(record.metadata),
        "error_message": record.error_message, "error_traceback": record.error_traceback,
        "executor_node": record.executor_node, "tenant": record.tenant_id,
        "inserted_at": record.inserted_at.isoformat() if record.inserted_at else None,
        "updated_at": record.updated_at.isoformat() if record.updated_at else None,
    }


async def record_data(store: Any, pipeline: Pipeline, id: str) -> dict[str, Any]:
    """One record with its lineage one step up (the successes of what it read) and one
    step down (successes built on this partition): one lookup per neighbouring asset."""
    record = await store.get_by_id(id)
    graph = pipeline.graph()
    wanted_up = [(asset, key) for asset, keys in record.upstream_partitions.items() for key in keys[:PAGE]]
    found_up = await store.latest_successes(wanted_up)
    upstream = [{"asset": asset, "partition": key, "record": _brief(found_up.get((asset, key)))}
                for asset, key in wanted_up]
    candidates = []
    for reader in _readers(pipeline, record.asset_name):
        definition = graph.get(reader).partitioned_by
        candidates.append((reader, record.partition if definition is not None else None))
    found_down = await store.latest_successes(candidates)
    downstream = [
        {"asset": reader, "partition": key, "record": _brief(found)}
        for reader, key in candidates
        if (found := found_down.get((reader, key))) is not None
        and record.partition in found.upstream_partitions.get(record.asset_name, ())
    ]
    return {"record": record_json(record), "upstream": upstream, "downstream": downstream}


def _readers(pipeline: Pipeline, name: str) -> list[str]:
    """The assets that read ``name`` directly."""
    return sorted(a.name for a in pipeline.assets if name in a.depends_on)


def _brief(record: Any) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"id": str(record.id), "partition": record.partition, "status": record.status.value,
            "completed_at": record.completed_at.isoformat() if record.completed_at else None}


def backfill_json(status: Any) -> dict[str, Any]:
    """A backfill's progress and state."""
    return {
        "id": str(status.id), "asset": status.asset, "state": status.state, "total": status.total,
        "queued": status.queued, "running": status.running, "succeeded": status.succeeded,
        "failed": status.failed, "cancelled": status.cancelled, "interrupted": status.interrupted,
        "errors": [{"partition": key, "error": message} for key, message in status.errors],
        "started_at": status.started_at.isoformat() if status.started_at else None,
        "finished_at": status.finished_at.isoformat() if status.finished_at else None,
    }


async def backfills_data(store: Any, *, offset: int = 0, limit: int = PAGE) -> dict[str, Any]:
    """A page of backfills, most recently saved first; ``next``: the offset of the next page."""
    found = await store.list_backfill_statuses(limit=limit + 1, offset=offset)
    return {"backfills": [backfill_json(status) for status in found[:limit]],
            "next": offset + limit if len(found) > limit else None}


def daemon_json(holder: Any) -> dict[str, Any] | None:
    """The daemon's role: who, its last heartbeat, and whether its hold still lasts
    (``active``; else it went quiet and a standby may take over)."""
    if holder is None:
        return None
    heartbeat = holder.heartbeat_at
    return {
        "owner": holder.owner, "fence": holder.fence, "active": holder.expires_at > utcnow(),
        "heartbeat_at": heartbeat.isoformat() if heartbeat is not None else None,
        "holds_until": holder.expires_at.isoformat(),
    }


def sensor_json(sensor: Any, cursor: Any) -> dict[str, Any]:
    """A sensor: its last call, the cursor it kept, its last error."""
    if cursor is None:
        return {"sensor": sensor.name, "interval": sensor.interval, "last_call": None, "cursor": None, "error": None}
    called = cursor.updated_at.isoformat() if cursor.updated_at else None
    return {"sensor": sensor.name, "interval": sensor.interval, "last_call": called, "cursor": cursor.value,
            "error": cursor.error}


def tick_json(schedule: Any, last: Any) -> dict[str, Any]:
    """A schedule and its newest tick."""
    return {
        "schedule": schedule.name, "asset": schedule.asset, "cron": schedule.cron, "timezone": schedule.timezone,
        "last_tick": last.at.isoformat() if last is not None else None,
        "state": last.state if last is not None else None, "error": last.error if last is not None else None,
        "next_tick": schedule.next_tick(utcnow()).isoformat(),
    }


async def daemon_data(store: Any, pipeline: Pipeline) -> dict[str, Any]:
    """Schedules with their last tick, sensors with their cursor, the daemon's heartbeat."""
    last = await store.last_ticks() if pipeline.schedules else {}
    cursors = {c.name: c for c in await store.list_cursors()} if pipeline.sensors else {}
    return {
        "schedules": [tick_json(s, last.get(s.name)) for s in pipeline.schedules],
        "sensors": [sensor_json(s, cursors.get(f"sensor:{s.name}")) for s in pipeline.sensors],
        "daemon": daemon_json(await store.role_holder("daemon")),
    }
