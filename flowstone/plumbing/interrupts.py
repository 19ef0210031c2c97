"""Where Ctrl-C may land, on trio.

trio raises ``KeyboardInterrupt`` in whatever code runs when the signal arrives,
unless that code is marked protected: then it is delivered to the main task at its
next checkpoint instead. FlowStone's own loops (actors, supervisors, the backfill
actor and its workers, the lease keeper) are marked ``@internal``, so Ctrl-C never
tears one of them down halfway (a memory store gone before the records it holds
are closed); it reaches the caller's task, whose ``open_runtime`` block then shuts
the runtime down in order. asyncio turns Ctrl-C into a cancellation of the main
task anyway, so there nothing is marked and trio is not even imported: the marks
are applied by ``protect_on_trio()``, which actors call as they start.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["internal", "protect_on_trio"]

F = TypeVar("F", bound=Callable[..., Any])

_internal: list[Callable[..., Any]] = []
_protected = False


def internal(fn: F) -> F:
    """Mark ``fn`` as FlowStone's own loop: Ctrl-C is not raised inside it on trio."""
    _internal.append(fn)
    if _protected:  # defined after the first marking (a module imported late)
        _mark(fn)
    return fn


def protect_on_trio() -> None:
    """Apply the marks once trio runs in this process (cheap when done, or on asyncio)."""
    global _protected
    if _protected or "trio" not in sys.modules:
        return
    for fn in _internal:
        _mark(fn)
    _protected = True


def _mark(fn: Callable[..., Any]) -> None:
    from trio.lowlevel import enable_ki_protection

    enable_ki_protection(fn)
