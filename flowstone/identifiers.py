"""Names that may reach SQL, object keys or file paths: one strict pattern, one place.

Asset names, resource names and (later) table and column names share this rule:
ASCII letters, digits and underscores, not starting with a digit, at most 128
characters. Anything else is refused before it is used, rather than escaped.
"""

from __future__ import annotations

import functools
import re

from .errors import InvalidIdentifier

__all__ = ["MAX_IDENTIFIER_LENGTH", "check_identifier", "identifier_problem", "is_identifier", "sql_table"]

MAX_IDENTIFIER_LENGTH = 128
_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def identifier_problem(name: object) -> str | None:
    """Why ``name`` is not an identifier, or ``None`` when it is one."""
    if not isinstance(name, str):
        return f"must be a str, got {type(name).__name__}: {name!r}"
    return _text_problem(str(name))


@functools.lru_cache(maxsize=65_536)
def _text_problem(name: str) -> str | None:
    # Memoized: every record write checks its asset name, and the same few
    # names come back millions of times.
    if not name:
        return "must not be empty"
    if len(name) > MAX_IDENTIFIER_LENGTH:
        return f"is {len(name)} characters long; the limit is {MAX_IDENTIFIER_LENGTH}"
    if not _PATTERN.fullmatch(name):
        return (
            f"{name!r} is not an identifier: use ASCII letters, digits and '_', "
            "not starting with a digit"
        )
    return None


def is_identifier(name: object) -> bool:
    return identifier_problem(name) is None


def check_identifier(name: object, what: str = "name") -> str:
    """Return ``name`` if it is an identifier, else raise :class:`InvalidIdentifier`."""
    problem = identifier_problem(name)
    if problem is not None:
        raise InvalidIdentifier(f"{what} {problem}")
    return name  # type: ignore[return-value]


SQL_NAME_LIMIT = 63
"""PostgreSQL truncates longer names silently; refusing them is safer."""


def sql_table(name: object, what: str = "table") -> str:
    """``table`` or ``schema.table``, each part an identifier of at most 63
    characters, returned double-quoted and ready for SQL; else InvalidIdentifier."""
    if not isinstance(name, str):
        raise InvalidIdentifier(f"{what} must be a str, got {type(name).__name__}: {name!r}")
    parts = name.split(".")
    if len(parts) > 2:
        raise InvalidIdentifier(f"{what} {name!r} has more than one '.': use table or schema.table")
    for part in parts:
        check_identifier(part, what)
        if len(part) > SQL_NAME_LIMIT:
            raise InvalidIdentifier(f"{what} part {part[:20]!r}... is longer than {SQL_NAME_LIMIT} characters")
    return ".".join(f'"{part}"' for part in parts)
