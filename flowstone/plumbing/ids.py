"""Random (version 4) UUIDs for records and runs, cheaper than ``uuid.uuid4()``.

Every materialization takes two (its record's and its run's). ``uuid.uuid4()``
asks the kernel for 16 bytes and then checks its own arguments; here the bytes
come from a buffer refilled 4 KiB at a time from ``os.urandom`` (the same source)
and the UUID is built from its integer directly. Each thread has its own buffer,
and a child process drops the parent's at fork, so no two callers ever get the
same bytes.
"""

from __future__ import annotations

import os
import threading
import uuid

__all__ = ["new_uuid"]

_BATCH = 256
_VERSION_4 = ~(0xC000 << 48 | 0xF000 << 64) & (1 << 128) - 1
_VARIANT_AND_VERSION = 0x8000 << 48 | 0x4000 << 64
_set = object.__setattr__
_new = object.__new__
_SAFE = uuid.SafeUUID.unknown


class _Pool(threading.local):
    buffer = b""
    used = 0

    def clear(self) -> None:
        self.buffer, self.used = b"", 0


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.clear)


def new_uuid() -> uuid.UUID:
    """A random UUID (version 4, RFC 4122 variant), as ``uuid.uuid4()`` makes."""
    pool = _pool
    start = pool.used
    if start >= len(pool.buffer):
        pool.buffer, start = os.urandom(16 * _BATCH), 0
    pool.used = start + 16
    value = int.from_bytes(pool.buffer[start:start + 16]) & _VERSION_4 | _VARIANT_AND_VERSION
    made = _new(uuid.UUID)
    _set(made, "int", value)
    _set(made, "is_safe", _SAFE)
    return made
