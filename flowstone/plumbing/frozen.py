"""Frozen attrs objects made on the hot path without attrs' ``__init__``.

A frozen attrs class sets each field in ``__init__`` through ``object.__setattr__``,
which looks the name up on the class every time, and its callers mostly pass the
fields by keyword, a dict built and unpacked on each call. Counted with callgrind
(CPython 3.11), a message of five keyword fields costs about 8,700 instructions to
make, a named tuple of four 3,200, and a materialization makes several such objects
(its context, the store's messages, its run's result, its record twice).

``builder(cls)`` makes, once, a function that takes every field positionally, in
the class's order, and sets each slot through its own descriptor, the converters
applied as attrs applies them. It is for slotted frozen classes without validators
or ``__attrs_post_init__`` (checked here): what it makes is equal to what the
class's ``__init__`` makes from the same values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

__all__ = ["builder", "tuple_maker"]

T = TypeVar("T", bound=attrs.AttrsInstance)


def builder(cls: type[T], *, from_values: bool = False) -> Callable[..., T]:
    """``build(field, ...)`` (``from_values``: ``build(values)``, one sequence of
    every field) making an instance of ``cls`` without its ``__init__``."""
    fields = attrs.fields(cls)
    if "__slots__" not in cls.__dict__ or hasattr(cls, "__attrs_post_init__"):
        raise TypeError(f"{cls.__name__}: only slotted attrs classes without __attrs_post_init__ can be built")
    scope: dict[str, Any] = {"__new": object.__new__, "__cls": cls}
    names = [field.name for field in fields]
    head = "def build(__values):" if from_values else f"def build({', '.join(names)}):"
    lines = [head, "    __made = __new(__cls)"]
    for at, field in enumerate(fields):
        if field.validator is not None:
            raise TypeError(f"{cls.__name__}.{field.name} has a validator, which a builder would skip")
        # The slot's descriptor, from the class that declares it (a base, for inherited fields).
        owner = next(klass for klass in cls.__mro__ if field.name in vars(klass))
        scope[f"__set_{field.name}"] = vars(owner)[field.name].__set__
        value = f"__values[{at}]" if from_values else field.name
        if field.converter is not None:
            scope[f"__convert_{field.name}"] = field.converter
            value = f"__convert_{field.name}({value})"
        lines.append(f"    __set_{field.name}(__made, {value})")
    lines.append("    return __made")
    exec("\n".join(lines), scope)  # the code above, made from the class's own field names
    build: Callable[..., T] = scope["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    return build


N = TypeVar("N", bound=tuple[Any, ...])


def tuple_maker(cls: type[N]) -> Callable[[tuple[Any, ...]], N]:
    """``make((field, ...))``: the named tuple ``cls`` from a tuple of every field in
    order, by tuple's own constructor. A named tuple's ``__new__`` is a Python
    function (one call each, ~3,200 instructions for four fields against ~2,100 this
    way); no length check: for the hot path's few fixed call sites."""
    return functools.partial(tuple.__new__, cls)
