"""Retention: deleting the history records the assets' ``fs.Retention`` no longer keeps.

``prune(store, limited(assets, default))`` runs, for each asset whose retention (its
own, else ``default``) limits anything, ``store.prune`` in batches until nothing is
left to delete, and returns how many records went per asset, in the caller's tenant.

What a current record was built from is never deleted. A current ``success`` was
built from its upstream partitions' current records (a newer upstream success would
have made it ``stale``), which are never deleted; so only ``stale`` records can have
been built from superseded ones. The superseded records of every partition a stale
record read are spared, and so, transitively, are those of the partitions those
partitions read (as their current records say). With more stale records than
``STALE_LIMIT``, nothing superseded is deleted that time (logged).

Values are not deleted: every IO manager keeps one value per partition, replaced by
each success, so a history record has no value of its own (ADR 0024).

``prune_finished(store, default)`` deletes, by the runtime-wide retention's
``max_age``, finished backfills and schedule ticks, each schedule's newest tick
aside (ADR 0026).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from typing import Any

from ..definitions import Asset, Retention
from ..plumbing.clock import utcnow
from ..store.records import Status

__all__ = ["BATCH", "STALE_LIMIT", "limited", "prune", "prune_finished"]

log = logging.getLogger("flowstone.retention")

BATCH = 10_000
"""Records deleted per store call (one statement, one short transaction)."""

STALE_LIMIT = 100_000
"""Stale records followed to find what they were built from."""

PAIRS_PER_LOOKUP = 1_000


def limited(assets: Iterable[Asset], default: Retention | None = None) -> list[tuple[Asset, Retention]]:
    """Each asset whose retention (its own, else ``default``) deletes anything, with it."""
    return [(asset, policy) for asset in assets
            if (policy := asset.retention or default) is not None and policy.limited]


async def prune(
    store: Any, chosen: Iterable[tuple[Asset, Retention]], *, now: datetime | None = None,
) -> dict[str, int]:
    """Delete what each of the ``chosen`` assets' retention (``limited``) no longer
    keeps; records deleted per asset."""
    now = now or utcnow()
    chosen = list(chosen)
    if not chosen:
        return {}
    spared = await _spared(store)
    deleted: dict[str, int] = {}
    for asset, policy in chosen:
        before = now - policy.max_age if policy.max_age is not None else None
        if spared is not None:
            spare: Collection[str | None] = spared.get(asset.name, frozenset())
        else:  # too many stale records to follow: every superseded record stays, this time
            spare = list(await store.partition_states(asset.name))
        total = 0
        while True:
            count = await store.prune(asset.name, keep_last=policy.keep_last, before=before, spare=spare,
                                      limit=BATCH)
            total += count
            if count < BATCH:
                break
        deleted[asset.name] = total
        if total:
            log.info("retention of %s: %d history records deleted", asset.name, total)
    return deleted


async def prune_finished(store: Any, default: Retention | None, *, now: datetime | None = None) -> int:
    """Delete the finished backfills and schedule ticks older than ``default.max_age``
    (each schedule's newest tick stays), in batches; how many. Nothing without a
    runtime-wide ``max_age``: how long to keep them is the runtime's call, not an asset's."""
    if default is None or default.max_age is None:
        return 0
    before = (now or utcnow()) - default.max_age
    total = 0
    while True:
        count = await store.prune_finished(before, limit=BATCH)
        total += count
        if count < BATCH:
            break
    if total:
        log.info("retention: %d finished backfills and schedule ticks deleted", total)
    return total


async def _spared(store: Any) -> Mapping[str, frozenset[str | None]] | None:
    """The partitions, per asset, whose superseded records a stale record may have been
    built from (transitively); None when there are too many stale records to follow."""
    stale = await store.list_by_status(Status.STALE, limit=STALE_LIMIT)
    if len(stale) >= STALE_LIMIT:
        log.warning("retention: %d or more stale records; superseded records are kept this time "
                    "(materialize what is stale, or let automation do it)", STALE_LIMIT)
        return None
    spared: dict[str, set[str | None]] = {}
    seen: set[tuple[str, str | None]] = set()
    frontier = _reads(stale)
    while frontier:
        fresh = [pair for pair in dict.fromkeys(frontier) if pair not in seen]
        seen.update(fresh)
        for asset, key in fresh:
            spared.setdefault(asset, set()).add(key)
        frontier = []
        for start in range(0, len(fresh), PAIRS_PER_LOOKUP):
            current = await store.latest_successes(fresh[start:start + PAIRS_PER_LOOKUP])
            frontier += _reads(current.values())
    return {asset: frozenset(keys) for asset, keys in spared.items()}


def _reads(records: Iterable[Any]) -> list[tuple[str, str | None]]:
    return [(asset, key) for record in records for asset, keys in record.upstream_partitions.items() for key in keys]
