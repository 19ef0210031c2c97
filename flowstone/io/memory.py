"""``fs.io.MemoryIO``: values held by the memory-store actor, as the objects themselves."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from ..actors import memory as m
from ..actors.client import MemoryActorClient
from ..partitions import serialize_partition
from ..tenancy import current_tenant

__all__ = ["MemoryIO"]

_NO_CONFIG: Mapping[str, Any] = {}


class MemoryIO(MemoryActorClient):
    """Keeps each value as the object itself: no copy, no serialization.

    Safe under concurrent access because one actor serves every call. A value
    mutated after it was stored changes what is stored, as with any in-memory
    cache; use a serializing manager when that matters. ``store`` is a cast.
    """

    returns_stored_object = True
    """``load`` gives back the very object ``store`` got, so the runtime may hand a
    value to readers in the same run without loading it again."""

    async def load(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        return await self.handle.call(
            m.GetValue, tenant=current_tenant(), asset=asset, partition=serialize_partition(partition)
        )

    async def store(
        self, asset: str, value: Any, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> None:
        await self.handle.cast(
            m.PutValue(tenant=current_tenant(), asset=asset, partition=serialize_partition(partition), value=value)
        )

    async def delete(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> None:
        await self.handle.cast(
            m.DropValue(tenant=current_tenant(), asset=asset, partition=serialize_partition(partition))
        )

    async def exists(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> bool:
        return await self.handle.call(
            m.HasValue, tenant=current_tenant(), asset=asset, partition=serialize_partition(partition)
        )

    async def metadata(
        self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> dict[str, Any]:
        stored = await self.handle.call(
            m.GetValue, tenant=current_tenant(), asset=asset, partition=serialize_partition(partition), with_meta=True
        )
        return {"size_bytes": _approximate_size(stored.value), "updated_at": stored.updated_at}


def _approximate_size(value: Any) -> int:
    """Bytes for bytes and text; the JSON length for JSON values; else the shallow size."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    try:
        return len(json.dumps(value).encode("utf-8"))
    except (TypeError, ValueError):
        return sys.getsizeof(value)
