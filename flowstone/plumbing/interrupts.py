"""Where Ctrl-C may land, on trio.

trio raises ``KeyboardInterrupt`` in whatever code runs when the signal arrives,
unless that code is marked protected: then it is delivered to the main task at its
next checkpoint instead. FlowStone's own loops (actors, supervisors, the backfill
actor and its workers, the lease keeper) are marked, so Ctrl-C never tears one of
them down halfway (a memory store gone before the records it holds are closed);
it reaches the caller's task, whose ``open_runtime`` block then shuts the runtime
down in order. On asyncio the mark does nothing (asyncio turns Ctrl-C into a
cancellation of the main task anyway).
"""

from __future__ import annotations

from trio.lowlevel import enable_ki_protection as internal

__all__ = ["internal"]
