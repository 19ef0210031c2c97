"""Code versions and dependency hashes: what decides whether work can be skipped.

Both must be stable across processes (a persistent store compares hashes written
by yesterday's process), so nothing that varies per process goes in: no object
ids or addresses, sets in sorted order (their iteration order changes with hash
randomization), and a function's code without its file name or line numbers.

The automatic code version of a function covers what its result depends on in its
own code: its bytecode and constants (not its docstring), its default arguments
and closure values, the module-level values it reads, and the functions and
classes of its own package that it uses, transitively (a helper's helper, a
constant the helper reads). Code of other packages (the standard library, third
parties, FlowStone) does not count: its version is the environment's.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import hashlib
import inspect
import types
import uuid
from collections.abc import Mapping, Sequence
from types import CodeType
from typing import Any

from ..definitions import Asset

__all__ = ["code_version", "code_versions", "dependency_hash"]

_HAS_DOCSTRING = getattr(inspect, "CO_HAS_DOCSTRING", None)
MAX_VALUE_DEPTH = 32
"""How deep a module-level value is followed; deeper parts count by type only."""
MEMO_ITEMS = 32
"""Containers this big are hashed once per set of assets that read them."""


def code_version(asset: Asset, memo: dict[int, tuple[Any, bytes]] | None = None) -> str:
    """The asset's ``code_version``, or a hash of what its function's result depends on
    in its own code when none is given. ``memo``, shared by the calls for one set of
    assets, hashes a big module-level value they all read once (not once per asset)."""
    if asset.code_version is not None:
        return asset.code_version
    digest = hashlib.sha256()
    _CodeHasher(digest, _package_of(asset.execute_fn), {} if memo is None else memo).callable(asset.execute_fn)
    return f"code:{digest.hexdigest()[:16]}"


def code_versions(assets: Sequence[Asset]) -> dict[str, str]:
    """``code_version`` of each asset, by name, sharing one memo."""
    memo: dict[int, tuple[Any, bytes]] = {}
    return {asset.name: code_version(asset, memo) for asset in assets}


def _package_of(fn: Any) -> str | None:
    module = getattr(fn, "__module__", None) or getattr(getattr(fn, "func", None), "__module__", None)
    return module.partition(".")[0] if isinstance(module, str) else None


class _CodeHasher:
    """Feeds one asset's code, and the code and values it reaches, into ``digest``."""

    def __init__(self, digest: Any, package: str | None, memo: dict[int, tuple[Any, bytes]]) -> None:
        self.digest = digest
        self.package = package
        self.memo = memo
        self.seen: set[int] = set()  # functions and classes already in (recursion, shared helpers)
        self.visiting: set[int] = set()  # modules being walked now

    def put(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.digest.update(len(data).to_bytes(4, "big") + data)

    def own(self, value: Any, globals_: Mapping[str, Any] | None = None) -> bool:
        """Whether ``value`` (a function, class or module) is of the asset's own package."""
        module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if self.package is None or module is None:  # code compiled without a module: its own globals
            return globals_ is not None and getattr(value, "__globals__", None) is globals_
        return module.partition(".")[0] == self.package

    def callable(self, fn: Any) -> None:
        if isinstance(fn, functools.partial):
            self.callable(fn.func)
            self.value(fn.args)
            self.value(dict(sorted(fn.keywords.items())))
            return
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
        if isinstance(fn, types.FunctionType):
            self.function(fn)
            return
        call = inspect.getattr_static(type(fn), "__call__", None)
        if isinstance(call, types.FunctionType):  # an instance with __call__
            self.put(f"instance of {type(fn).__qualname__}")
            self.function(call)
            return
        self.put(getattr(fn, "__qualname__", type(fn).__qualname__))

    def function(self, fn: types.FunctionType) -> None:
        if id(fn) in self.seen:
            self.put(f"again: {fn.__qualname__}")
            return
        self.seen.add(id(fn))
        self.code(fn.__code__)
        self.value(fn.__defaults__)
        self.value(dict(sorted((fn.__kwdefaults__ or {}).items())))
        for cell in fn.__closure__ or ():
            try:
                self.reached(cell.cell_contents, fn.__globals__, set())
            except ValueError:  # an empty cell (a name bound later)
                self.put("empty cell")
        names = sorted(_names(fn.__code__))
        for name in names:
            if name in fn.__globals__:
                self.put(f"global {name}")
                self.reached(fn.__globals__[name], fn.__globals__, set(names))

    def reached(self, value: Any, globals_: Mapping[str, Any], names: set[str]) -> None:
        """A value the function reads: its own package's code in full, a module of its
        own package by the attributes the function names, plain data by value."""
        if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
            if self.own(getattr(value, "func", value), globals_):
                self.callable(value)
            else:
                self.put(f"outside: {getattr(value, '__qualname__', type(value).__qualname__)}")
        elif isinstance(value, type):
            if self.own(value, globals_):
                self.klass(value)
            else:
                self.put(f"outside: {value.__qualname__}")
        elif isinstance(value, types.ModuleType):
            self.put(f"module {value.__name__}")
            if self.own(value, globals_) and id(value) not in self.visiting:
                self.visiting.add(id(value))  # modules that import each other: once per path
                try:
                    for name in sorted(names):
                        if name in vars(value):
                            self.put(f"attribute {name}")
                            self.reached(vars(value)[name], vars(value), names)
                finally:
                    self.visiting.discard(id(value))
        elif isinstance(value, Asset):
            self.put(f"asset {value.name}")  # another definition, versioned on its own
        else:
            self.value(value)

    def klass(self, cls: type) -> None:
        if id(cls) in self.seen:
            self.put(f"again: {cls.__qualname__}")
            return
        self.seen.add(id(cls))
        self.put(f"class {cls.__qualname__}")
        for name, member in sorted(vars(cls).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                member = member.fget
            if isinstance(member, types.FunctionType):
                self.put(f"method {name}")
                self.function(member)
            elif not name.startswith("__"):
                self.put(f"attribute {name}")
                self.value(member)

    def code(self, code: CodeType) -> None:
        self.digest.update(code.co_code)
        self.put(repr((code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount)))
        consts = code.co_consts
        if _docstring_slot(code):
            consts = consts[1:]
        for const in consts:
            if isinstance(const, CodeType):
                self.code(const)
            else:
                self.put(_stable_repr(const))

    def value(self, value: Any, depth: int = 0, *, whole: bool = False) -> None:
        """Plain data by value; anything else by its type (never its address). A big
        container is hashed on its own once (``whole``) and then counts by that hash."""
        kind = type(value)
        if value is None or kind in (bool, int, float, complex, str, bytes, decimal.Decimal, uuid.UUID,
                                     dt.date, dt.datetime, dt.time, dt.timedelta, range):
            self.put(f"{kind.__name__}:{value!r}")
        elif isinstance(value, enum.Enum):
            self.put(f"{kind.__qualname__}.{value.name}")
        elif depth >= MAX_VALUE_DEPTH:
            self.put(f"deep {kind.__qualname__}")
        elif not whole and kind in (list, tuple, dict, types.MappingProxyType) and len(value) >= MEMO_ITEMS:
            found = self.memo.get(id(value))
            if found is None:  # hashed once per set of assets (held, so its id is not reused)
                inner = _CodeHasher(hashlib.sha256(), self.package, self.memo)
                inner.value(value, depth, whole=True)
                found = self.memo[id(value)] = (value, inner.digest.digest())
            self.put(f"{kind.__name__}#{found[1].hex()}")
        elif kind in (list, tuple):
            self.put(f"{kind.__name__}[{len(value)}]")
            for item in value:
                self.value(item, depth + 1)
        elif kind in (set, frozenset):
            self.put(f"{kind.__name__}:{_stable_repr(frozenset(value)) if _plain_items(value) else len(value)}")
        elif kind in (dict, types.MappingProxyType):
            self.put(f"dict[{len(value)}]")
            for key, item in value.items():
                self.value(key, depth + 1)
                self.value(item, depth + 1)
        elif isinstance(value, (types.FunctionType, type, types.ModuleType)):
            self.put(f"{kind.__name__} {getattr(value, '__qualname__', getattr(value, '__name__', ''))}")
        elif self.own(kind) and hasattr(value, "__dict__"):  # an instance of an own class: its fields
            self.put(f"instance of {kind.__qualname__}")
            self.value(dict(sorted(vars(value).items())), depth + 1)
        else:
            self.put(f"object of {kind.__module__}.{kind.__qualname__}")


def _plain_items(values: Any) -> bool:
    return all(v is None or type(v) in (bool, int, float, str, bytes) for v in values)


def _names(code: CodeType) -> set[str]:
    """Every name the code and its nested functions look up (globals, attributes)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names(const)
    return names


def _docstring_slot(code: CodeType) -> bool:
    """Whether ``co_consts[0]`` is the function's docstring (which does not count)."""
    if _HAS_DOCSTRING is not None:
        return bool(code.co_flags & _HAS_DOCSTRING)
    # Before 3.14 a function's first constant is its docstring, or None without one:
    # skipped either way, so adding or removing a docstring changes nothing.
    return bool(code.co_flags & inspect.CO_NEWLOCALS) and bool(code.co_consts) and (
        code.co_consts[0] is None or isinstance(code.co_consts[0], str))


def _stable_repr(value: Any) -> str:
    if isinstance(value, (frozenset, set)):
        return "{" + ",".join(sorted(_stable_repr(v) for v in value)) + "}"
    if isinstance(value, tuple):
        return "(" + ",".join(_stable_repr(v) for v in value) + ")"
    return repr(value)


def dependency_hash(version: str, partition_key: str | None, upstream: Mapping[str, Sequence[Any]]) -> str:
    """Hash of what a materialization's result depends on.

    ``upstream`` maps each upstream asset to the ids (UUIDs) of the
    materializations read from it. Same code, same partition, same inputs: same
    hash, so the work can be skipped. Every part is length-prefixed, so no two
    different inputs can run together into the same bytes.
    """
    # The bytes of every part joined, then hashed in one update (an update is a call
    # of its own: a chain's asset made five); the same bytes as part by part.
    parts = [_NONE if partition_key is None else _encoded(partition_key)]
    for name in sorted(upstream) if len(upstream) > 1 else upstream:
        ids = upstream[name]
        parts.append(_name_part(name))
        parts.append(len(ids).to_bytes(4, "big"))
        if len(ids) == 1:  # most reads are of one record: nothing to sort
            parts.append(ids[0].int.to_bytes(16, "big"))
        else:
            parts += [ident.int.to_bytes(16, "big") for ident in sorted(ids)]
    digest = _versioned(version).copy()
    digest.update(b"".join(parts))
    return digest.hexdigest()


_NONE = b"\xff\xff\xff\xff"
"""A missing text: a length no text has."""


def _encoded(text: str) -> bytes:
    """``text`` as a part: its length in UTF-8, then its bytes."""
    data = text.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "big") + data


@functools.lru_cache(maxsize=4096)
def _name_part(name: str) -> bytes:
    """An asset name as a part (``_encoded``): the same few names, read by every hash."""
    return _encoded(name)


@functools.lru_cache(maxsize=1024)
def _versioned(version: str) -> Any:
    """A digest that has read ``version``: each materialization copies it (an asset's
    partitions share their code version) instead of hashing the version again."""
    digest = hashlib.sha256()
    _part(digest, version)
    return digest


def _part(digest: Any, text: str | None) -> None:
    digest.update(_NONE if text is None else _encoded(text))
