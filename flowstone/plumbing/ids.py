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
variant, and 62 random bits. The random bytes come from a buffer refilled 4 KiB
at a time from ``os.urandom``; each thread has its own buffer and clock state,
and a child process drops the parent's at fork, so no two callers ever get the
same bytes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

__all__ = ["new_uuid", "uuid_of"]

_BUFFER = 16 * 256
"""Random bytes read from ``os.urandom`` at a time: 16 an id."""
_RANDOM_B = (1 << 62) - 1
_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62
_new = object.__new__
# A UUID's two slots, set through their descriptors: ``object.__setattr__`` looks each
# name up on the class first (a third of ``uuid_of``'s time; every id a store reads
# back is made here too).
_set_int = uuid.UUID.__dict__["int"].__set__
_set_safe = uuid.UUID.__dict__["is_safe"].__set__
_SAFE = uuid.SafeUUID.unknown
_from_bytes = int.from_bytes
_time_ns = time.time_ns


class _Pool(threading.local):
    """This thread's state: [random bytes, how many of them are used, the last
    millisecond, its counter], in one list (one thread-local read an id)."""

    def __init__(self) -> None:
        self.state: list[Any] = [b"", _BUFFER, 0, 0]

    def clear(self) -> None:
        self.state[:] = [b"", _BUFFER, 0, 0]


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.clear)


def new_uuid() -> uuid.UUID:
    """A time-ordered UUID (version 7, RFC 4122/9562 variant): later ids made by one
    thread sort after earlier ones."""
    state = _pool.state
    buffer, start, last, counter = state
    if start >= _BUFFER:
        buffer, start = os.urandom(_BUFFER), 0
    random = _from_bytes(buffer[start:start + 16])
    millis = _time_ns() // 1_000_000
    if millis > last:
        last, counter = millis, random >> 117  # 11 random bits: room to count up
    elif counter < 0xFFF:
        counter += 1
    else:  # 4,096 ids in one millisecond (or the clock went back): borrow the next one
        last, counter = last + 1, 0
    state[:] = buffer, start + 16, last, counter
    return uuid_of(last << 80 | counter << 64 | _VERSION_AND_VARIANT | random & _RANDOM_B)


def uuid_of(value: int) -> uuid.UUID:
    """``uuid.UUID(int=value)`` without its checks, for a value that is a UUID's already."""
    made = _new(uuid.UUID)
    _set_int(made, value)
    _set_safe(made, _SAFE)
    return made
