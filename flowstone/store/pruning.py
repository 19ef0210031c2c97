"""A retention pass's choice of history records, kept between ``prune`` calls.

Retention deletes in batches: it calls ``store.prune(..., limit=...)`` until fewer
than ``limit`` records go (``flowstone.runtime.retention``). Choosing what to delete
ranks every history record of the asset among its partition's (a scan of the asset's
records and a sort by partition, since no index of records leads with the partition),
so choosing again at each call made a deletion of N records cost N / limit choices:
on PostgreSQL 91 µs a record for 499,900 records out of a million (0.85 s of each
0.9 s batch went to the choice), against 31 µs for 400 out of 1,000.

The SQL stores therefore choose once, up to ``CHOSEN_MAX`` records (oldest first),
and each call with the same arguments deletes the next ``limit`` of that choice, as
the memory store does. What was chosen stays deletable meanwhile, in any process: a
history record never changes again and never becomes its partition's latest record
(only newer records can), and newer history only raises its rank; the deleting
statement still checks the tenant, asset and a history status of each row. When
another process deleted some of them first, a call deletes fewer (and its pass
ends there) and the choice is dropped: the next call chooses anew.

A pass stopped half-way (an error, a cancel) leaves the rest of its choice here;
the next pass with the same arguments (a ``keep_last`` alone, the same records to
spare) deletes that rest first, and what became deletable since waits one pass more.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import Any

__all__ = ["CHOSEN_MAX", "Choice", "prune_key"]

CHOSEN_MAX = 1_000_000
"""Records one choice holds at most (8 bytes each): past it, a pass chooses again
once the choice is used up."""


def prune_key(tenant: str | None, asset: str, keep_last: int | None, before: datetime | None,
              spare: Collection[str | None]) -> tuple[Any, ...]:
    """What makes two ``prune`` calls choose the same records (their limits aside)."""
    return tenant, asset, keep_last, before, frozenset(spare)


class Choice:
    """One store's choice in progress: the sequence numbers of the records chosen and
    not yet handed out, oldest first."""

    __slots__ = ("_at", "_key", "_left", "_whole", "most")

    def __init__(self, most: int = CHOSEN_MAX) -> None:
        self.most = most
        """How many records a choice holds at most (the limit of the choosing query)."""
        self._key: tuple[Any, ...] | None = None
        self._left = array("q")
        self._at = 0
        self._whole = True

    async def prune(
        self, key: tuple[Any, ...], limit: int, choose: Callable[[int], Awaitable[Sequence[int]]],
        delete: Callable[[list[int]], Awaitable[int]],
    ) -> int:
        """A SQL store's ``prune`` call: the next ``limit`` of the pass's choice for
        ``key`` (made by ``choose(most)`` when there is none to go on with) go through
        ``delete``, which says how many rows went; fewer than it was given drop the
        choice (another process deleted some first)."""
        chosen = self.take(key, limit)
        if chosen is None:  # a new pass, or one past its choice: choose (once for many calls)
            chosen = self.keep(key, await choose(self.most), limit)
        if not chosen:
            return 0
        deleted = await delete(chosen)
        if deleted < len(chosen):
            self.forget()
        return deleted

    def take(self, key: tuple[Any, ...], limit: int) -> list[int] | None:
        """The next ``limit`` chosen for ``key``; None when there is no choice to go on
        with: choose (``most`` at most) and ``keep`` it. A choice cut at ``most`` with
        fewer than ``limit`` left is chosen again, so a pass does not end before what
        lies past the cut."""
        left = len(self._left) - self._at
        if key != self._key or left == 0 or (left < limit and not self._whole):
            return None
        taken = self._left[self._at:self._at + limit].tolist()
        self._at += len(taken)
        return taken

    def forget(self) -> None:
        """Drop the choice (another process deleted some of it: choose anew next time)."""
        self._key, self._left, self._at = None, array("q"), 0

    def keep(self, key: tuple[Any, ...], chosen: Sequence[int], limit: int) -> list[int]:
        """Hold ``chosen`` (a new choice for ``key``) and hand out its first ``limit``."""
        self._key, self._left, self._at = key, array("q", chosen), min(limit, len(chosen))
        self._whole = len(chosen) < self.most
        return list(chosen[:limit])
