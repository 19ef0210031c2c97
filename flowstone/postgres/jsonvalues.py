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
import re
from collections.abc import Mapping
from typing import Any

from ..errors import SerializationError

__all__ = ["plain", "storable_text", "text_problem", "to_json"]

_SCALARS = (str, int, float, bool, type(None))
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with what PostgreSQL text cannot hold replaced by U+FFFD (for messages)."""
    return _UNSTORABLE.sub("\ufffd", text)


def text_problem(text: str) -> str | None:
    """Why PostgreSQL text cannot hold ``text`` (a NUL, a lone surrogate), or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "a NUL character (\\u0000)"
    return f"a lone surrogate ({found.group().encode('utf-8', 'backslashreplace').decode()}), which UTF-8 cannot encode"


def to_json(
    value: Any, *, asset: str | None = None, what: str = "value", partition: Any = None, for_postgres: bool = True
) -> str:
    """``value`` as JSON text, or SerializationError. ``for_postgres=False`` allows
    NUL and lone surrogates in strings (files and objects hold them, escaped)."""
    problem = _problem(value, "$", for_postgres)
    if problem is not None:
        where, bad = problem
        raise SerializationError(
            f"{what} cannot be stored as JSON: {bad} at {where}", asset=asset, partition=partition
        )
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _problem(value: Any, where: str, check_text: bool = True) -> tuple[str, str] | None:
    kind = type(value)
    if kind is str:
        problem = text_problem(value) if check_text else None
        return None if problem is None else (where, f"a string with {problem}")
    if kind is float:
        return None if math.isfinite(value) else (where, f"the float {value!r}")
    if kind in (int, bool, type(None)):
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return (where, f"a {type(key).__name__} key {key!r} (keys must be str)")
            problem = text_problem(key) if check_text else None
            if problem is not None:
                return (where, f"a key with {problem}")
            found = _problem(item, f"{where}.{key}", check_text)
            if found is not None:
                return found
        return None
    if kind in (list, tuple):
        for index, item in enumerate(value):
            found = _problem(item, f"{where}[{index}]", check_text)
            if found is not None:
                return found
        return None
    if isinstance(value, _SCALARS):  # subclasses (an IntEnum, a str subclass): json may not round-trip them
        return (where, f"an instance of {kind.__name__} (a subclass of {kind.__mro__[1].__name__})")
    return (where, f"an object of type {kind.__name__}")


def plain(value: Any) -> Any:
    """Mappings (read-only ones, as records hold, nested too) as dicts, which JSON takes."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    return value
