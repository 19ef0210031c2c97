"""Guards decide who may read and materialize which asset.

The runtime asks its guard before every materialization and every load through
:func:`authorize`, the one place where a guard's answer is interpreted. It fails
closed: only a literal ``True`` allows; ``False``, ``None``, any other value and
any exception deny (docs/adr/0003).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import anyio

from .errors import AccessDenied

__all__ = ["Action", "Guard", "authorize"]

Action = Literal["access", "materialize"]


@runtime_checkable
class Guard(Protocol):
    """Access policy. Either method may be a plain or an ``async`` function.

    ``asset`` is the :class:`~flowstone.Asset`; ``context`` is a mapping with at
    least ``"tenant"`` plus whatever the caller passed as ``context=``.
    """

    def can_access(self, asset: Any, context: Mapping[str, Any]) -> bool | Awaitable[bool]: ...

    def can_materialize(
        self, asset: Any, context: Mapping[str, Any]
    ) -> bool | Awaitable[bool]: ...


async def authorize(
    guard: Guard | None, action: Action, asset: Any, context: Mapping[str, Any]
) -> None:
    """Raise :class:`AccessDenied` unless ``guard`` allows ``action`` on ``asset``.

    No guard allows everything. A guard that raises denies, and its exception is
    kept as the ``__cause__`` so the reason is not lost; the backend's
    cancellation is never swallowed.
    """
    if guard is None:
        return
    name = getattr(asset, "name", asset)
    tenant = context.get("tenant")
    method = guard.can_access if action == "access" else guard.can_materialize
    try:
        answer = method(asset, context)
        if inspect.isawaitable(answer):
            answer = await answer
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        raise AccessDenied(
            name, action, tenant, reason=f"guard raised {type(exc).__name__}: {exc}"
        ) from exc
    if answer is not True:
        reason = None if answer is False else f"guard returned {answer!r}, not True"
        raise AccessDenied(name, action, tenant, reason=reason)
