"""Code versions and dependency hashes: what decides whether work can be skipped.

Both must be stable across processes (a persistent store compares hashes written
by yesterday's process), so a function's code is hashed from its bytecode,
names and constants, without file names or line numbers (moving a function
does not change what it computes), and sets are hashed in sorted order
(their iteration order changes with hash randomization).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from types import CodeType
from typing import Any

from ..definitions import Asset

__all__ = ["code_version", "dependency_hash"]


def code_version(asset: Asset) -> str:
    """The asset's ``code_version``, or a hash of its function's code when none is given."""
    if asset.code_version is not None:
        return asset.code_version
    digest = hashlib.sha256()
    _hash_callable(asset.execute_fn, digest)
    return f"code:{digest.hexdigest()[:16]}"


def _hash_callable(fn: Any, digest: Any) -> None:
    if isinstance(fn, functools.partial):
        _hash_callable(fn.func, digest)
        digest.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
        return
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):
        code = getattr(getattr(type(fn), "__call__", None), "__code__", None)
    if code is None:
        digest.update(getattr(fn, "__qualname__", type(fn).__qualname__).encode())
        return
    _hash_code(code, digest)


def _hash_code(code: CodeType, digest: Any) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_argcount)).encode())
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _hash_code(const, digest)
        else:
            digest.update(_stable_repr(const).encode())


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
    digest = hashlib.sha256()
    _part(digest, version)
    _part(digest, partition_key)
    for name in sorted(upstream):
        _part(digest, name)
        ids = sorted(upstream[name])
        digest.update(len(ids).to_bytes(4, "big"))
        for ident in ids:
            digest.update(ident.bytes)
    return digest.hexdigest()


def _part(digest: Any, text: str | None) -> None:
    if text is None:
        digest.update(b"\xff\xff\xff\xff")
        return
    data = text.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(4, "big"))
    digest.update(data)
