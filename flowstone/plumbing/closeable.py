"""The ``async with`` base of everything that holds connections or files."""

from __future__ import annotations

from typing import Any

__all__ = ["Closeable"]


class Closeable:
    """``async with manager:`` closes it on the way out; ``close()`` releases what
    the manager holds (nothing, unless a subclass says otherwise)."""

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        return None
