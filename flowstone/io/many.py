"""Reading every partition of an asset at once (an unpartitioned asset reading a
partitioned one): IO managers may offer ``load_many(asset, keys, config)``, which
returns a mapping from partition key to value; the runtime uses it when all the
partitions were stored by the same manager with the same configuration."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio

from ..errors import single_error

__all__ = ["LOAD_MANY_CONCURRENCY", "load_concurrently"]

LOAD_MANY_CONCURRENCY = 16
"""Loads in flight at once: enough to hide network round trips, few enough to be
polite to a server and to bound the memory of values in transit."""


async def load_concurrently(
    load: Callable[[str, Any, Mapping[str, Any]], Awaitable[Any]],
    asset: str,
    keys: Sequence[str | None],
    config: Mapping[str, Any],
    limit: int = LOAD_MANY_CONCURRENCY,
) -> dict[str | None, Any]:
    """``{key: await load(asset, key, config)}`` with at most ``limit`` loads at once,
    in the order of ``keys``; the first failure cancels the rest and is raised."""
    values: dict[str | None, Any] = dict.fromkeys(keys)
    gate = anyio.Semaphore(limit)

    async def one(key: str | None) -> None:
        async with gate:
            values[key] = await load(asset, key, config)

    try:
        async with anyio.create_task_group() as tasks:
            for key in keys:
                tasks.start_soon(one, key)
    except BaseExceptionGroup as group:
        raise single_error(group) from None  # NotFound, StorageUnavailable: not a group
    return values
