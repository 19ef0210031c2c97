"""The active daemon's automation and sensors (definitions: ``flowstone.automation``).

``run_automation`` looks every ``interval`` seconds:

- for each ``fs.Eager()`` asset, at the successes its upstream assets got since the
  last look (``successes_since``: a watermark of when they became successes, kept
  in the store under ``automation:<asset>``, so a daemon taking over goes on from
  there). Each new upstream success triggers one
  materialization of the same partition (or of the whole asset when it is not
  partitioned), with ``upstream="none"``: a failure is not tried again until an
  upstream changes again. An asset never followed before is followed from the
  daemon's start (less ``OVERLAP``): older successes are not followed.
- for each ``fs.OnMissing()`` asset, at the partitions that should exist (up to the
  newest complete one) and have no success: they are materialized (several at once
  as one backfill), once each while this daemon runs.

``run_sensor`` calls one sensor every ``interval`` seconds, with the cursor the store
kept, and materializes what it asks for; its failures are recorded with its cursor
and it is called again at the next interval. A daemon that takes over waits for the
rest of the interval since the last call.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ..automation import Eager, OnMissing, RunRequest, Sensor, SensorContext
from ..definitions import Asset, FieldError
from ..errors import DefinitionError, FlowstoneError, InvalidPartition, MaterializationFailed, NotFound
from ..partitions import serialize_partition
from ..plumbing.clock import utcnow
from ..store.records import Status

__all__ = ["AUTOMATION_SECONDS", "run_automation", "run_sensor"]

log = logging.getLogger("flowstone.daemon")

AUTOMATION_SECONDS = 10.0
"""How often the daemon looks for upstream changes and missing partitions."""
OVERLAP = timedelta(seconds=60)
"""Successes finished this long before the watermark are looked at again: another
process's clock may be behind, or its write may land after a later one."""
SENSOR_TIMEOUT = 60.0
"""A sensor call may take its interval, and at least this long, before it fails."""
MISSING_PARALLEL = 10
"""Missing partitions materialized at once by one automation backfill."""

_SETTLED = {Status.SUCCESS, Status.STALE, Status.RUNNING, Status.PENDING, Status.WAITING_APPROVAL}
"""A partition in one of these states is not missing (done, or on its way)."""


async def run_automation(
    rt: Any, work: TaskGroup, *, interval: float = AUTOMATION_SECONDS, since: datetime | None = None,
) -> None:
    """Evaluate every automated asset of ``rt`` every ``interval`` seconds, starting
    runs in ``work``, until cancelled. An ``Eager`` asset seen for the first time
    follows the upstream successes that end after ``since`` (default: now)."""
    since = since or utcnow()
    assets = {asset.name: asset for asset in await rt.assets()}
    eager = [a for a in assets.values() if isinstance(a.automation, Eager)]
    missing = [a for a in assets.values() if isinstance(a.automation, OnMissing)]
    if not eager and not missing:
        await anyio.sleep_forever()
    followed: dict[tuple[str, str], datetime] = {}  # (asset, upstream record id) -> its end: run once each
    asked: set[tuple[str, str | None]] = set()  # OnMissing partitions started by this daemon
    while True:
        for asset in eager:
            try:
                await _follow_upstream(rt, asset, assets, work, followed, since)
            except FlowstoneError as error:
                log.warning("automation of %s: %s; looking again in %gs", asset.name, error, interval)
        for asset in missing:
            try:
                await _fill_missing(rt, asset, work, asked)
            except FlowstoneError as error:
                log.warning("automation of %s: %s; looking again in %gs", asset.name, error, interval)
        await anyio.sleep(interval)


async def _follow_upstream(
    rt: Any, asset: Asset, assets: dict[str, Asset], work: TaskGroup, followed: dict[tuple[str, str], datetime],
    start: datetime,
) -> None:
    store, cursor = rt.store, f"automation:{asset.name}"
    saved = await store.load_cursor(cursor)
    if saved is None or not saved.value:  # never followed: from the daemon's start on
        await store.save_cursor(cursor, start.isoformat())
    mark = datetime.fromisoformat(saved.value) if saved is not None and saved.value else start
    since, newest = mark - OVERLAP, mark
    for seen in [k for k, ended in followed.items() if k[0] == asset.name and ended <= since]:
        del followed[seen]  # older than any success a look can find again: the map stays small
    definition, targets = asset.partitioned_by, set[str | None]()
    for upstream in asset.depends_on:
        # The successes written since the look before (less the overlap), not every
        # partition's record: a look costs what happened, not what is stored.
        for record in await store.successes_since(upstream, since):
            ended, key = record.updated_at, record.partition
            if ended is None:
                continue
            newest = max(newest, ended)
            if (asset.name, str(record.id)) in followed:
                continue
            followed[(asset.name, str(record.id))] = ended
            if definition is None:
                targets.add(None)
            elif key is not None:
                try:
                    targets.add(serialize_partition(definition.validate(key)))
                except InvalidPartition:
                    continue  # an upstream partition this asset does not have
    for key in sorted(targets, key=lambda k: k or ""):
        partition = None if key is None else definition.validate(key)  # type: ignore[union-attr]
        if not await _upstream_ready(store, asset, assets, key):
            log.info("automation of %s: %s waits for its other upstream assets", asset.name, key or "it")
            continue
        work.start_soon(_run, rt, asset.name, partition, "none", "an upstream asset changed")
    if newest > mark:
        await store.save_cursor(cursor, newest.isoformat())


async def _upstream_ready(store: Any, asset: Asset, assets: dict[str, Asset], key: str | None) -> bool:
    """Whether every upstream asset has a success to read for partition ``key`` (an
    unpartitioned asset reads whatever partitions a partitioned upstream has)."""
    pairs: list[tuple[str, str | None]] = []
    for name in asset.depends_on:
        if assets[name].partitioned_by is None:
            pairs.append((name, None))
        elif key is not None:
            pairs.append((name, key))
    found = await store.latest_successes(pairs)
    return all(pair in found for pair in pairs)


async def _fill_missing(rt: Any, asset: Asset, work: TaskGroup, asked: set[tuple[str, str | None]]) -> None:
    store, definition = rt.store, asset.partitioned_by
    states = await store.partition_states(asset.name)
    if definition is None:
        if states.get(None) not in _SETTLED and (asset.name, None) not in asked:
            asked.add((asset.name, None))
            work.start_soon(_run, rt, asset.name, None, "missing", "it has never succeeded")
        return
    keys = ((value, serialize_partition(value)) for value in definition.keys())
    values = [value for value, key in keys if states.get(key) not in _SETTLED and (asset.name, key) not in asked]
    if not values:
        return
    asked.update((asset.name, serialize_partition(v)) for v in values)
    backfill = await rt.backfill(asset.name, values, max_parallel=MISSING_PARALLEL, upstream="missing")
    log.info("automation of %s: %d missing partitions (%s..%s), backfill %s", asset.name, len(values),
             serialize_partition(values[0]), serialize_partition(values[-1]), backfill)
    work.start_soon(_wait_backfill, rt, backfill)


async def _wait_backfill(rt: Any, backfill: Any) -> None:
    status = await rt.wait_backfill(backfill)
    log.info("automation backfill %s of %s: %s (%d succeeded, %d failed)", backfill, status.asset, status.state,
             status.succeeded, status.failed)


async def _run(rt: Any, asset: str, partition: Any, upstream: str, why: str) -> None:
    """One automated materialization; its failure is logged, never the daemon's."""
    where = "" if partition is None else f" @ {serialize_partition(partition)}"
    log.info("automation: %s%s runs (%s)", asset, where, why)
    try:
        result = await rt.materialize(asset, partition, upstream=upstream)
    except MaterializationFailed as failure:
        log.warning("automation: %s%s failed: %s", asset, where, failure)
    except FlowstoneError as error:
        log.warning("automation: %s%s could not run: %s", asset, where, error)
    else:
        if asset in result.skipped:
            log.info("automation: %s%s was up to date", asset, where)


async def run_sensor(rt: Any, sensor: Sensor, work: TaskGroup) -> None:
    """Call ``sensor`` every ``interval`` seconds until cancelled (see the module doc)."""
    store, cursor = rt.store, f"sensor:{sensor.name}"
    assets = {asset.name: asset for asset in await rt.assets()}
    saved = await store.load_cursor(cursor)
    if saved is not None and saved.updated_at is not None:  # another daemon called it not long ago
        await anyio.sleep(max(0.0, (saved.updated_at + timedelta(seconds=sensor.interval) - utcnow()).total_seconds()))
    while True:
        saved = await store.load_cursor(cursor)
        before = saved.value if saved is not None else None
        ctx = SensorContext(sensor.name, before, utcnow(), saved.error if saved is not None else None)
        try:
            with anyio.fail_after(max(sensor.interval, SENSOR_TIMEOUT)):
                requested = await sensor.fn(ctx)
            runs = _checked(requested, assets)
            await store.save_cursor(cursor, ctx.cursor)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:  # whatever the sensor raised is its failure, never the daemon's
            why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if isinstance(error, TimeoutError):
                why = f"it did not return within {max(sensor.interval, SENSOR_TIMEOUT):g}s"
            log.warning("sensor %s failed: %s; called again in %gs", sensor.name, why, sensor.interval)
            await store.save_cursor(cursor, before, error=why)
        else:
            for asset, partition in runs:
                work.start_soon(_run, rt, asset, partition, "missing", f"sensor {sensor.name}")
        await anyio.sleep(sensor.interval)


def _checked(requested: Any, assets: dict[str, Asset]) -> list[tuple[str, Any]]:
    """The (asset, partition value) of each request; ``DefinitionError``, ``NotFound`` or
    ``InvalidPartition`` naming the first bad one (then none of them runs)."""
    if not isinstance(requested, (list, tuple)):
        raise DefinitionError([FieldError("sensor", f"must return a list of fs.RunRequest, got {requested!r:.100}")])
    runs = []
    for request in requested:
        if not isinstance(request, RunRequest):
            raise DefinitionError([FieldError("sensor", f"must return fs.RunRequest items, got {request!r:.100}")])
        asset = assets.get(request.asset)
        if asset is None:
            raise NotFound(f"unknown asset {request.asset!r}; known: {', '.join(sorted(assets))}")
        definition = asset.partitioned_by
        if definition is None:
            if request.partition is not None:
                raise InvalidPartition(f"asset {asset.name!r} is not partitioned", asset=asset.name)
            runs.append((asset.name, None))
        elif request.partition is None:
            raise InvalidPartition(f"asset {asset.name!r} is partitioned: give a partition", asset=asset.name)
        else:
            runs.append((asset.name, definition.validate(request.partition)))
    return list(dict.fromkeys(runs))

