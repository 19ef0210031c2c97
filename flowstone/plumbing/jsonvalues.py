"""Strict JSON for what FlowStone writes to PostgreSQL (JSONB).

``json.dumps`` quietly turns ``{1: "a"}`` into ``{"1": "a"}``, writes ``NaN`` that
PostgreSQL refuses, and would happily pass a ``\\u0000`` that JSONB cannot hold.
``to_json`` refuses all three (and anything not JSON: a value that contains
itself, one nested deeper than ``MAX_DEPTH``, an int too long to write) with a
SerializationError naming the asset, the offending type and where it sits, before
anything reaches the database.
Tuples are written as arrays and read back as lists.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import SerializationError

__all__ = ["PLAIN_TYPES", "mapping_to_json", "plain", "storable_text", "text_problem", "to_json"]

_SCALARS = (str, int, float, bool, type(None))
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with what PostgreSQL text cannot hold replaced by U+FFFD (for messages)."""
    return _UNSTORABLE.sub("\ufffd", text)


def text_problem(text: str) -> str | None:
    """Why PostgreSQL text cannot hold ``text`` (a NUL, a lone surrogate), or None."""
    if text.isascii():  # known from the string's header: no surrogate; a NUL is found by memchr
        return "a NUL character (\\u0000)" if "\x00" in text else None
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
        if len(where) > 100:  # a deep value's path: its start and where it ends
            where = f"{where[:50]}...{where[-40:]}"
        raise SerializationError(
            f"{what} cannot be stored as JSON: {bad} at {where}", asset=asset, partition=partition
        )
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


MAX_DEPTH = 256
"""Containers nested deeper than this are refused: JSON readers (PostgreSQL's among
them) recurse per level, and a value this deep is almost always a mistake."""

_INT_DIGITS = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
_INT_BOUND = 10**_INT_DIGITS if _INT_DIGITS else None
"""Python writes ints of at most this many digits as text (``sys.int_max_str_digits``)."""


def _problem(
    value: Any, where: str, check_text: bool = True, depth: int = 0, path: set[int] | None = None
) -> tuple[str, str] | None:
    kind = type(value)
    if kind is str:
        problem = text_problem(value) if check_text else None
        return None if problem is None else (where, f"a string with {problem}")
    if kind is float:
        return None if math.isfinite(value) else (where, f"the float {value!r}")
    if kind is int:
        if _INT_BOUND is not None and value.bit_length() > 64 and not -_INT_BOUND < value < _INT_BOUND:
            return (where, f"an int of more than {_INT_DIGITS} digits")
        return None
    if kind in (bool, type(None)):
        return None
    if kind in (dict, list, tuple):
        if depth >= MAX_DEPTH:
            return (where, f"a value nested more than {MAX_DEPTH} levels deep")
        path = set() if path is None else path
        if id(value) in path:
            return (where, f"a {kind.__name__} that contains itself (a cycle)")
        path.add(id(value))
        try:
            return _container_problem(value, where, check_text, depth + 1, path)
        finally:
            path.discard(id(value))
    if isinstance(value, _SCALARS):  # subclasses (an IntEnum, a str subclass): json may not round-trip them
        return (where, f"an instance of {kind.__name__} (a subclass of {kind.__mro__[1].__name__})")
    return (where, f"an object of type {kind.__name__}")


def _container_problem(value: Any, where: str, check_text: bool, depth: int, path: set[int]) -> tuple[str, str] | None:
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                return (where, f"a {type(key).__name__} key {key!r} (keys must be str)")
            problem = text_problem(key) if check_text else None
            if problem is not None:
                return (where, f"a key with {problem}")
            found = _problem(item, f"{where}.{key}", check_text, depth, path)
            if found is not None:
                return found
        return None
    for index, item in enumerate(value):
        found = _problem(item, f"{where}[{index}]", check_text, depth, path)
        if found is not None:
            return found
    return None


PLAIN_TYPES = frozenset(_SCALARS)
"""The types of JSON's scalars, exactly (no subclasses): what a small mapping's text or a
shared record mapping may be keyed on."""
_WRITTEN: dict[tuple[tuple[Any, type, Any], ...], str] = {}
_WRITTEN_KEPT = 1024


def mapping_to_json(value: Mapping[Any, Any], *, asset: str | None = None, what: str = "value",
                    partition: Any = None) -> str:
    """``to_json(plain(value))``. The text of a small mapping of plain values (a
    record's metadata naming its IO manager: the same for most records) is kept and
    given again instead of checked and written each time (6.5 µs each)."""
    if not value:
        return "{}"  # a record begun: no metadata yet
    if len(value) > 4 or not all(type(item) in PLAIN_TYPES for item in value.values()):
        return to_json(plain(value), asset=asset, what=what, partition=partition)
    # Each value's type is part of the key: 1, 1.0 and True are equal, and write differently.
    key = tuple((name, type(item), item) for name, item in value.items())
    text = _WRITTEN.get(key)
    if text is None:
        text = to_json(dict(value), asset=asset, what=what, partition=partition)
        if len(_WRITTEN) >= _WRITTEN_KEPT:
            _WRITTEN.clear()
        _WRITTEN[key] = text
    return text


def plain(value: Any) -> Any:
    """Mappings (read-only ones, as records hold, nested too) as dicts, which JSON takes."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    return value
