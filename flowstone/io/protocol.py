"""The contract of an I/O manager: where asset values live (SPEC 5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Closeable", "IOManager"]


@runtime_checkable
class IOManager(Protocol):
    """Loads and stores asset values, scoped to ``current_tenant()``.

    ``asset`` is the asset name and ``partition`` the partition value (or its
    key). Optional methods: ``metadata(asset, partition, config)`` returning at
    least ``size_bytes`` and ``updated_at``, and ``exists(asset, partition,
    config)``.
    """

    async def load(self, asset: str, partition: Any, config: Mapping[str, Any]) -> Any:
        """The stored value; raises ``fs.NotFound`` when there is none."""
        ...

    async def store(self, asset: str, value: Any, partition: Any, config: Mapping[str, Any]) -> None: ...

    async def delete(self, asset: str, partition: Any, config: Mapping[str, Any]) -> None:
        """Remove the value; deleting a missing value is not an error."""
        ...


class Closeable:
    """``async with manager:`` closes it on the way out; ``close()`` releases what
    the manager holds (nothing, unless a subclass says otherwise)."""

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        return None
