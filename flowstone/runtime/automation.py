"""The active daemon's automation and sensors (definitions: ``flowstone.automation``).

``run_automation`` looks every ``interval`` seconds:

- for each ``fs.Eager()`` asset, at the successes its upstream assets got since the
  last look (``successes_after``: the store's mark of what that look saw, kept in
  the store under ``automation:<asset>``, so a daemon taking over goes on from
  there). Each new upstream success triggers one
  materialization of the same partition (or of the whole asset when it is not
  partitioned), with ``upstream="none"``: a failure is not tried again until an
  upstream changes again. More than ``EAGER_ALONE`` changes at a look go as one
  backfill. An asset never followed before is followed from the start of
  automation: older successes are not followed.
- for each ``fs.OnMissing()`` asset, at the partitions that should exist (up to the
  newest complete one) and have no success: they are materialized (several at once
  as one backfill). One whose run failed is not tried again while this daemon runs;
  one that succeeded is forgotten, so the daemon remembers only what failed or still
  runs (not every partition it ever filled), and fills a partition again if its
  latest record stops being a success (a forced run that failed). Such a look reads
  every partition's state, so the looks of an asset with very many partitions are
  spaced to take at most ``MISSING_SHARE`` of the time.

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
import attrs
from anyio.abc import TaskGroup

from ..automation import Eager, OnMissing, RunRequest, Sensor, SensorContext
from ..definitions import Asset, FieldError
from ..errors import DefinitionError, FlowstoneError, InvalidPartition, MaterializationFailed, NotFound
from ..partitions import serialize_partition
from ..plumbing.clock import utcnow
from ..store.records import Status
from .retention import PAIRS_PER_LOOKUP

__all__ = ["AUTOMATION_SECONDS", "run_automation", "run_sensor"]

log = logging.getLogger("flowstone.daemon")

AUTOMATION_SECONDS = 10.0
"""How often the daemon looks for upstream changes and missing partitions."""
OVERLAP = timedelta(seconds=60)
"""A watermark kept as a time (before stores gave out marks) is read back this much
earlier, once: another process's clock may have been behind, or its write landed late."""
SENSOR_TIMEOUT = 60.0
"""A sensor call may take its interval, and at least this long, before it fails."""
MISSING_PARALLEL = 10
"""Missing partitions materialized at once by one automation backfill."""
EAGER_ALONE = MISSING_PARALLEL
"""Upstream changes a look runs one by one; more (a burst, behind an upstream
backfill) go as one backfill of ``MISSING_PARALLEL`` at a time, which the store
keeps: a daemon that stops before it ends leaves it to the next to resume."""
MARK_REFRESH = 60.0
"""Seconds after which a look that found nothing saves the store's newer mark all
the same: not at every look (a write each time, however idle), but before the
memory store's walk back to an old mark grows with what other assets did."""
MISSING_SHARE = 0.05
"""Most of the daemon's time an ``OnMissing`` asset's looks take: a look reads the
state of every partition the asset should have (about 1.5 s at a million), so the
next one waits at least that many times its cost, whatever the interval."""

_DONE = {Status.SUCCESS, Status.STALE}
_SETTLED = _DONE | {Status.RUNNING, Status.PENDING, Status.WAITING_APPROVAL}
"""A partition in one of these states is not missing (done, or on its way)."""


async def run_automation(rt: Any, work: TaskGroup, *, interval: float = AUTOMATION_SECONDS) -> None:
    """Evaluate every automated asset of ``rt`` every ``interval`` seconds, starting
    runs in ``work``, until cancelled. An ``Eager`` asset seen for the first time
    follows the upstream successes written from now on."""
    assets = {asset.name: asset for asset in await rt.assets()}
    eager = [a for a in assets.values() if isinstance(a.automation, Eager)]
    missing = [a for a in assets.values() if isinstance(a.automation, OnMissing)]
    if not eager and not missing:
        await anyio.sleep_forever()
    start = (await rt.store.successes_after(eager[0].depends_on[0], None))[1] if eager else ""
    looks: dict[str, _Looked] = {}  # per Eager asset, what its last look saw
    asked: dict[str, set[str | None]] = {}  # per OnMissing asset, the keys this daemon filled and not done yet
    due: dict[str, float] = {}  # OnMissing asset -> when its next look may start (next_look)
    while True:
        for asset in eager:
            try:
                await _follow_upstream(rt, asset, assets, work, looks, start)
            except FlowstoneError as error:
                log.warning("automation of %s: %s; looking again in %gs", asset.name, error, interval)
        for asset in missing:
            if anyio.current_time() < due.get(asset.name, 0.0):
                continue
            began = anyio.current_time()
            try:
                await _fill_missing(rt, asset, work, asked)
            except FlowstoneError as error:
                log.warning("automation of %s: %s; looking again in %gs", asset.name, error, interval)
            due[asset.name] = next_look(began, anyio.current_time(), interval)
        await anyio.sleep(interval)


def next_look(began: float, ended: float, interval: float) -> float:
    """When an ``OnMissing`` look that took ``began``..``ended`` may be followed by the
    next: after the interval, and late enough that looks take at most ``MISSING_SHARE``
    of the time (a look's cost grows with the partitions the asset should have)."""
    spent = ended - began
    return max(began + interval, ended + spent * (1 / MISSING_SHARE - 1))


@attrs.define
class _Looked:
    """What an ``Eager`` asset's last look saw: the upstream record ids it followed
    (the next look may find them again), and when it last saved a mark."""

    ids: set[str]
    saved: float


async def _follow_upstream(
    rt: Any, asset: Asset, assets: dict[str, Asset], work: TaskGroup, looks: dict[str, _Looked], start: str,
) -> None:
    store, cursor = rt.store, f"automation:{asset.name}"
    saved = await store.load_cursor(cursor)
    mark = saved.value if saved is not None and saved.value else None
    if mark is None:  # never followed: from the start of automation on
        await store.save_cursor(cursor, mark := start)
    # What the upstream assets succeeded at since the last look, as the store marked
    # it, not every partition's record: a look costs what happened, not what is stored.
    # The next look goes on from the first read's mark; what the later reads found
    # after it comes again then, and is skipped as followed.
    found, newer, unusable = [], None, False
    for upstream in asset.depends_on:
        try:
            records, now = await store.successes_after(upstream, mark)
        except DefinitionError:  # a watermark kept as a time, or another store's mark
            records, now = await _since_watermark(store, asset, upstream, mark)
            unusable = True
        found += records
        newer = newer or now
    last = looks.get(asset.name) or _Looked(set(), anyio.current_time())
    looks[asset.name] = _Looked({str(record.id) for record in found}, last.saved)
    definition, targets = asset.partitioned_by, set[str | None]()
    for record in found:
        if str(record.id) in last.ids:
            continue
        if definition is None:
            targets.add(None)
        elif record.partition is not None:
            try:
                targets.add(serialize_partition(definition.validate(record.partition)))
            except InvalidPartition:
                continue  # an upstream partition this asset does not have
    ordered = sorted(targets, key=lambda k: k or "")
    ready = await _upstream_ready(store, asset, assets, ordered)
    for key in sorted(targets.difference(ready), key=lambda k: k or ""):
        log.info("automation of %s: %s waits for its other upstream assets", asset.name, key or "it")
    if len(ready) > EAGER_ALONE:  # a burst (behind an upstream backfill): one backfill, bounded and resumable
        values = [definition.validate(key) for key in ready]  # type: ignore[union-attr]
        backfill = await rt.backfill(asset.name, values, max_parallel=MISSING_PARALLEL, upstream="none")
        log.info("automation of %s: %d upstream changes (%s..%s), backfill %s", asset.name, len(values),
                 ready[0], ready[-1], backfill)
        work.start_soon(_wait_backfill, rt, backfill)
    else:
        for key in ready:
            partition = None if key is None else definition.validate(key)  # type: ignore[union-attr]
            work.start_soon(_run, rt, asset.name, partition, "none", "an upstream asset changed")
    if newer is not None and newer != mark and (
            found or unusable or anyio.current_time() - last.saved > MARK_REFRESH):
        await store.save_cursor(cursor, newer)
        looks[asset.name].saved = anyio.current_time()


async def _since_watermark(store: Any, asset: Asset, upstream: str, value: str) -> tuple[list[Any], str]:
    """What a look kept as a time (an older daemon's watermark) asks for, once: the
    current successes of ``upstream`` since then less ``OVERLAP``, read the old way
    (every partition's record), and the store's mark of now, taken first. Another
    value (a mark of another store) is followed from now on."""
    _, now = await store.successes_after(upstream, None)
    try:
        since = datetime.fromisoformat(value) - OVERLAP
        if since.tzinfo is None:
            raise ValueError(value)
    except ValueError:
        log.warning("automation of %s: its cursor %r is no mark of this store; following from now on",
                    asset.name, value[:100])
        return [], now
    records = [record for record in (await store.partitions_of(upstream)).values()
               if record.status is Status.SUCCESS and record.updated_at is not None and record.updated_at > since]
    return sorted(records, key=lambda record: record.updated_at), now


async def _upstream_ready(
    store: Any, asset: Asset, assets: dict[str, Asset], keys: list[str | None],
) -> list[str | None]:
    """The partition ``keys`` for which every upstream asset has a success to read (an
    unpartitioned asset reads whatever partitions a partitioned upstream has), in
    order; asked ``PAIRS_PER_LOOKUP`` (upstream, key) pairs at a time."""
    wanted = {key: [(name, None) if assets[name].partitioned_by is None else (name, key)
                    for name in asset.depends_on if assets[name].partitioned_by is None or key is not None]
              for key in keys}
    pairs = list(dict.fromkeys(pair for needs in wanted.values() for pair in needs))
    found: set[tuple[str, str | None]] = set()
    for start in range(0, len(pairs), PAIRS_PER_LOOKUP):
        found.update(await store.latest_successes(pairs[start:start + PAIRS_PER_LOOKUP]))
    return [key for key in keys if all(pair in found for pair in wanted[key])]


async def _fill_missing(rt: Any, asset: Asset, work: TaskGroup, asked: dict[str, set[str | None]]) -> None:
    store, definition = rt.store, asset.partitioned_by
    states = await store.partition_states(asset.name)
    mine = asked.setdefault(asset.name, set())
    # Filled: forgotten. What is kept is what failed (not tried again) or still runs,
    # not every partition ever filled: a million of them held ~150 MB in the daemon.
    mine.difference_update([key for key in mine if states.get(key) in _DONE])
    if definition is None:
        if states.get(None) not in _SETTLED and None not in mine:
            mine.add(None)
            work.start_soon(_run, rt, asset.name, None, "missing", "it has never succeeded")
        return
    keys = ((value, serialize_partition(value)) for value in definition.keys())
    found = [(value, key) for value, key in keys if states.get(key) not in _SETTLED and key not in mine]
    if not found:
        return
    mine.update(key for _, key in found)
    values = [value for value, _ in found]
    backfill = await rt.backfill(asset.name, values, max_parallel=MISSING_PARALLEL, upstream="missing")
    log.info("automation of %s: %d missing partitions (%s..%s), backfill %s", asset.name, len(values),
             found[0][1], found[-1][1], backfill)
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

