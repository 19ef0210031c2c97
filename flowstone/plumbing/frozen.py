"""Frozen attrs objects made on the hot path without attrs' ``__init__``.

A frozen attrs class sets each field in ``__init__`` through ``object.__setattr__``,
which looks the name up on the class every time, and its callers mostly pass the
fields by keyword, a dict built and unpacked on each call. Counted with callgrind
(CPython 3.11), a message of five keyword fields costs about 8,700 instructions to
make, a named tuple of four 3,200, and a materialization makes several such objects
(its context, the store's messages, its run's result, its record twice).

``builder(cls)`` makes, once, a function that takes every field positionally, in
the class's order, fills an object of the same layout by plain attribute stores
(the converters applied as attrs applies them) and makes it a ``cls``. It is for
slotted frozen classes without validators or ``__attrs_post_init__`` (checked
here): what it makes is equal to what the class's ``__init__`` makes from the
same values.
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
    scope: dict[str, Any] = {"__new": object.__new__, "__cls": cls, "__twin": _twin(cls)}
    names = [field.name for field in fields]
    head = "def build(__values):" if from_values else f"def build({', '.join(names)}):"
    lines = [head, "    __made = __new(__twin)"]
    for at, field in enumerate(fields):
        if field.validator is not None:
            raise TypeError(f"{cls.__name__}.{field.name} has a validator, which a builder would skip")
        value = f"__values[{at}]" if from_values else field.name
        if field.converter is not None:
            scope[f"__convert_{field.name}"] = field.converter
            value = f"__convert_{field.name}({value})"
        lines.append(f"    __made.{field.name} = {value}")
    lines += ["    __made.__class__ = __cls", "    return __made"]
    exec("\n".join(lines), scope)  # the code above, made from the class's own field names
    build: Callable[..., T] = scope["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    return build


def _twin(cls: type[Any]) -> type[Any]:
    """A class laid out as ``cls`` (the same base, the same slots) whose slots are set
    by plain attribute stores: the builder fills one of these, then makes it a ``cls``
    by assigning ``__class__``, which CPython allows between classes of one layout.

    Setting each slot through its descriptor's ``__set__`` (what this replaced) is a
    call that packs its arguments in a tuple, ~0.05 µs a field; a plain store on a
    class with ``object``'s own ``__setattr__`` is one specialized instruction. A
    frozen attrs class refuses both the store and, by its ``__setattr__``, the
    specialization; so does a class that inherits attrs' ``__delattr__`` (CPython
    then sets attributes through a lookup of ``__setattr__`` and its slot wrapper's
    call, slower than the descriptors were), hence both on the twin. CPython
    compares layouts by the slots a class adds, and counts a ``__weakref__`` declared
    with other slots as a different layout, so a built class that adds slots of its
    own is declared with ``weakref_slot=False``."""
    own = tuple(cls.__dict__["__slots__"])
    if len(cls.__bases__) != 1 or ("__weakref__" in own and len(own) > 1):
        raise TypeError(f"{cls.__name__}: a built class has one base and no __weakref__ slot beside its fields "
                        f"(declare it with weakref_slot=False)")
    twin = type(f"_Building{cls.__name__}", cls.__bases__,
                {"__slots__": own, "__setattr__": object.__setattr__, "__delattr__": object.__delattr__,
                 "__module__": cls.__module__})
    probe: Any = object.__new__(twin)
    probe.__class__ = cls  # TypeError here, once, if the layouts differ after all
    return twin


N = TypeVar("N", bound=tuple[Any, ...])


def tuple_maker(cls: type[N]) -> Callable[[tuple[Any, ...]], N]:
    """``make((field, ...))``: the named tuple ``cls`` from a tuple of every field in
    order, by tuple's own constructor. A named tuple's ``__new__`` is a Python
    function (one call each, ~3,200 instructions for four fields against ~2,100 this
    way); no length check: for the hot path's few fixed call sites."""
    return functools.partial(tuple.__new__, cls)
