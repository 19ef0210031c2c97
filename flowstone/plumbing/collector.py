"""How FlowStone's own processes set Python's garbage collector (ADR 0049).

The command line (``backfill``, ``daemon``, ``worker``, ``web``, ...) owns its process,
so it sets the collector for what FlowStone does there; the library never touches
the collector of a process it is embedded in.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune_collector"]

YOUNG_THRESHOLD = 50_000
"""Tracked objects allocated (net of those freed) before a young collection; Python's
default is 700. A batch of partitions keeps its plans, requests, records and leases
alive while the store writes it, so at 700 each young pass walked them again, and
passed them on to the older generations, whose passes walked them once more: 270
young and 25 middle passes per 10,000 partitions of a PostgreSQL backfill (in
batches of 64), 5 and none at 10,000. At 10,000 a batch's burst still reached the
threshold: at 100,000 partitions ~80 young passes of ~30,000 objects, 9-10 µs a
partition of the client's CPU (a reader's 24-25 at 30,000); at 50,000, one pass and
0.1-0.2 µs (a reader's 0.7-2.7; ADR 0049's addendum)."""


def tune_collector() -> None:
    """Once start-up is done: leave everything made so far (the modules imported,
    the definitions, the open runtime and store: about 50,000 objects, which each
    full pass walked again, 30-40 ms a pass on the 2-core machine measured) out of
    every later pass, and collect the young generation less often. Nothing is
    collected first: a collection would cost one such pass, for the few dozen
    objects start-up leaves as garbage."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
