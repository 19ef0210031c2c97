"""Strict JSON for what FlowStone writes to PostgreSQL (JSONB).

``json.dumps`` quietly turns ``{1: "a"}`` into ``{"1": "a"}``, writes ``NaN`` that
PostgreSQL refuses, and would happily pass a ``\\u0000`` that JSONB cannot hold.
``to_json`` refuses all three (and anything not JSON) with a SerializationError
naming the asset and the offending type, before anything reaches the database.
Tuples are written as arrays and read back as lists.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import SerializationError

__all__ = ["to_json"]

_SCALARS = (str, int, float, bool, type(None))


def to_json(value: Any, *, asset: str | None = None, what: str = "value", partition: Any = None) -> str:
    problem = _problem(value, "$")
    if problem is not None:
        where, bad = problem
        raise SerializationError(
            f"{what} cannot be stored as JSON: {bad} at {where}", asset=asset, partition=partition
        )
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _problem(value: Any, where: str) -> tuple[str, str] | None:
    kind = type(value)
    if kind is str:
        return (where, "a string with a NUL character (\\u0000)") if "\x00" in value else None
    if kind is float:
        return None if math.isfinite(value) else (where, f"the float {value!r}")
    if kind in (int, bool, type(None)):
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return (where, f"a {type(key).__name__} key {key!r} (keys must be str)")
            if "\x00" in key:
                return (where, "a key with a NUL character (\\u0000)")
            found = _problem(item, f"{where}.{key}")
            if found is not None:
                return found
        return None
    if kind in (list, tuple):
        for index, item in enumerate(value):
            found = _problem(item, f"{where}[{index}]")
            if found is not None:
                return found
        return None
    if isinstance(value, _SCALARS):  # subclasses (an IntEnum, a str subclass): json may not round-trip them
        return (where, f"an instance of {kind.__name__} (a subclass of {kind.__mro__[1].__name__})")
    return (where, f"an object of type {kind.__name__}")
