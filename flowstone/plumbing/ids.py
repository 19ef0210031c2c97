"""Time-ordered (version 7, RFC 9562) UUIDs for records and runs.

Every materialization takes two (its record's and its run's), and every store
indexes them. Random (version 4) ids land on a random page of that index each
time: a batch of a few partitions dirtied a page per id in SQLite's id and run
indexes, and those pages were written again at every commit. A version-7 id
starts with the Unix time in milliseconds, so ids made one after another land
next to each other at the end of the index.

Layout: 48 bits of milliseconds, the version (7), 12 bits of a counter that
orders ids made within one millisecond by one thread (it starts at a random value
below 2048 each millisecond; past 4095 the id borrows the next millisecond), the
variant, and 62 random bits. The random bits come from 64-bit numbers drawn 4 KiB
at a time from ``os.urandom``; each thread has its own numbers and clock state,
and a child process drops the parent's at fork, so no two callers ever get the
same bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from array import array
from typing import Any

__all__ = ["new_uuid", "uuid_of"]

_RANDOM_INTS = 512
"""Random 64-bit numbers drawn from ``os.urandom`` at a time: one an id, and one more
each millisecond for its counter's start."""
_RANDOM_B = (1 << 62) - 1
_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62
_COUNT = 1 << 64
"""One step of the counter, where it sits in an id."""
_new = object.__new__
# A UUID's two slots, set through their descriptors: ``object.__setattr__`` looks each
# name up on the class first (a third of ``uuid_of``'s time; every id a store reads
# back is made here too).
_set_int = uuid.UUID.__dict__["int"].__set__
_set_safe = uuid.UUID.__dict__["is_safe"].__set__
_SAFE = uuid.SafeUUID.unknown
_time_ns = time.time_ns


def _draw() -> array[int]:
    return array("Q", os.urandom(8 * _RANDOM_INTS))


class _Pool(threading.local):
    """This thread's state: [random numbers, how many of them are used, the last
    millisecond, its counter, the id's bits above the random ones], in one list
    (one thread-local read an id)."""

    def __init__(self) -> None:
        self.state: list[Any] = [(), _RANDOM_INTS, 0, 0, 0]

    def clear(self) -> None:
        self.state[:] = [(), _RANDOM_INTS, 0, 0, 0]


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.clear)


def new_uuid() -> uuid.UUID:
    """A time-ordered UUID (version 7, RFC 4122/9562 variant): later ids made by one
    thread sort after earlier ones."""
    state = _pool.state
    numbers, used, last, counter, high = state
    if used >= _RANDOM_INTS - 1:  # room for an id and a counter's start
        numbers, used = _draw(), 0
    millis = _time_ns() // 1_000_000
    if millis > last:  # the counter starts at 11 random bits: room to count up
        last, counter = millis, numbers[used] >> 53
        high = last << 80 | counter << 64 | _VERSION_AND_VARIANT
        used += 1
    elif counter < 0xFFF:  # the same millisecond: one step up, the rest as it was
        counter += 1
        high += _COUNT
    else:  # 4,096 ids in one millisecond (or the clock went back): borrow the next one
        last, counter = last + 1, 0
        high = last << 80 | _VERSION_AND_VARIANT
    state[:] = numbers, used + 1, last, counter, high
    return uuid_of(high | numbers[used] & _RANDOM_B)


def uuid_of(value: int) -> uuid.UUID:
    """``uuid.UUID(int=value)`` without its checks, for a value that is a UUID's already."""
    made = _new(uuid.UUID)
    _set_int(made, value)
    _set_safe(made, _SAFE)
    return made
