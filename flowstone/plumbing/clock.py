"""The one clock records and events are stamped with."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timezone

__all__ = ["utcnow"]

utcnow: Callable[[], datetime] = functools.partial(datetime.now, timezone.utc)
"""``utcnow()``: now, as an aware UTC datetime. A partial of ``datetime.now``, not a
function calling it: a materialization asks the time five times, and a function is
one Python call more each time (a partial's call stays in C)."""
