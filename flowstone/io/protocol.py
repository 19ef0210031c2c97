"""The contract of an I/O manager: where asset values live."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..plumbing.closeable import Closeable

__all__ = ["Closeable", "IOManager", "LoadsMany", "returns_stored_object"]


@runtime_checkable
class IOManager(Protocol):
    """Loads and stores asset values, scoped to ``current_tenant()``.

    ``asset`` is the asset name and ``partition`` the partition value (or its
    key). Optional methods: ``metadata(asset, partition, config)`` returning at
    least ``size_bytes`` and ``updated_at``, and ``exists(asset, partition,
    config)``. Optional capabilities the runtime asks for by name: ``LoadsMany``
    and ``returns_stored_object`` (below).
    """

    async def load(self, asset: str, partition: Any, config: Mapping[str, Any]) -> Any:
        """The stored value; raises ``fs.NotFound`` when there is none."""
        ...

    async def store(self, asset: str, value: Any, partition: Any, config: Mapping[str, Any]) -> None:
        """Keep ``value``, replacing what was there. Raises ``SerializationError``
        for a value the manager cannot encode (nothing stored is lost) and
        ``StorageError`` when the backend refuses (``transient`` says whether a
        retry may help)."""
        ...

    async def delete(self, asset: str, partition: Any, config: Mapping[str, Any]) -> None:
        """Remove the value; deleting a missing value is not an error."""
        ...


@runtime_checkable
class LoadsMany(Protocol):
    """An optional capability: many partitions of one asset in one call (concurrent
    loads, or one dataset), for an unpartitioned asset that reads them all. Without
    it, the runtime loads them one by one through ``load``."""

    async def load_many(self, asset: str, partitions: Sequence[Any], config: Mapping[str, Any]) -> Mapping[Any, Any]:
        """Each partition's value by key; raises ``fs.NotFound`` naming one that is missing."""
        ...


def returns_stored_object(manager: Any) -> bool:
    """Another optional capability, declared as the class attribute
    ``returns_stored_object = True``: ``load`` gives back (a private copy of) the very
    value that was stored, with no encoding, so a reader in the same run may be handed
    the value without loading it (``MemoryIO``). False unless declared."""
    return getattr(manager, "returns_stored_object", False) is True
