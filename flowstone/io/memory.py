"""``fs.io.MemoryIO``: values held by the memory-store actor, each a private copy."""

from __future__ import annotations

import copy
import json
import sys
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from ..errors import SerializationError
from ..partitions import serialize_partition
from ..store import memory_actor as m
from ..store.memory_client import MemoryActorClient
from ..tenancy import current_tenant

__all__ = ["MemoryIO", "private_copy"]

_NO_CONFIG: Mapping[str, Any] = {}

_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, Decimal, date, datetime, time, timedelta,
                        uuid.UUID})
_IMMUTABLE_TABLES = frozenset({"Table", "RecordBatch", "ChunkedArray", "Array"})


def private_copy(value: Any, *, asset: str | None = None, partition: Any = None) -> Any:
    """A copy of ``value`` that no one else holds: mutating it changes nothing stored.

    Immutable values (numbers, text, dates, tuples of them, Arrow tables) are their
    own copy, so the usual small values cost one type check. Anything else is deep
    copied; a value that cannot be copied is a ``SerializationError``."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is tuple and all(type(item) in _IMMUTABLE for item in value):
        return value
    if kind.__module__ == "pyarrow.lib" and kind.__name__ in _IMMUTABLE_TABLES:
        return value
    try:
        return copy.deepcopy(value)
    except (TypeError, ValueError, RecursionError, copy.Error) as error:
        raise SerializationError(
            f"MemoryIO keeps a private copy of each value, and a {kind.__name__} cannot be copied ({error})",
            asset=asset, partition=partition,
        ) from None


class MemoryIO(MemoryActorClient):
    """Keeps a private copy of each value, with no serialization.

    ``store`` copies what it is given and ``load`` hands out a copy, so neither the
    producer nor a reader mutating its object changes what is stored (immutable
    values are not copied). Safe under concurrent access because the memory-store
    actor orders every call. ``store`` is a cast (handled in place when no other
    cast waits for the actor).
    """

    returns_stored_object = True
    """The runtime may hand the value to readers in the same run without loading it
    again (each reader gets its own ``private_copy``)."""

    async def load(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        key = serialize_partition(partition)
        stored = await self._read(m.GetValue, tenant=current_tenant(), asset=asset, partition=key)
        return private_copy(stored, asset=asset, partition=key)

    async def store(
        self, asset: str, value: Any, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> None:
        key = None if partition is None else serialize_partition(partition)
        kept = private_copy(value, asset=asset, partition=key)
        put = m.make_put_value(None, current_tenant(), asset, key, kept)
        handle = self._cast_now(put)
        if handle is not None:
            await handle.cast(put)

    async def delete(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> None:
        await self._cast(
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
