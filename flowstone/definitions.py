"""Assets as pure data: what to compute, from what, and how to store it.

An :class:`Asset` is an immutable record and constructs without checks, like a
struct, so tools can build and compare them freely. :func:`validate_asset` is the
one place that knows what a *valid* asset is; the decorators run it and raise
:class:`~flowstone.DefinitionError` at definition time, the Python counterpart of a
compile error (docs/adr/0001).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import FunctionType, MappingProxyType
from typing import Any

import attrs

from .errors import DefinitionError
from .identifiers import identifier_problem
from .partitions import PartitionsDefinition

__all__ = ["Asset", "FieldError", "Retention", "RetryPolicy", "asset", "validate_asset"]


@attrs.frozen
class FieldError:
    """One problem with one field of a definition (``asset`` names the asset, if any)."""

    field: str
    message: str
    asset: str | None = None

    def __str__(self) -> str:
        where = f"asset {self.asset!r}: " if self.asset is not None else ""
        return f"{where}{self.field}: {self.message}"


@attrs.frozen
class RetryPolicy:
    """Retry a failing asset before recording it failed.

    ``max_attempts`` counts every try, the first included. ``backoff`` is the
    first delay in seconds and doubles after each failure (``0`` retries at once);
    ``jitter`` spreads each delay over [0.5, 1.5) of its value so that many
    partitions failing together do not retry in lockstep.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    jitter: bool = True

    def __attrs_post_init__(self) -> None:
        errors = []
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            errors.append(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if (
            isinstance(self.backoff, bool)
            or not isinstance(self.backoff, (int, float))
            or not 0 <= self.backoff < float("inf")
        ):
            errors.append(f"backoff must be a finite number of seconds >= 0, got {self.backoff!r}")
        if not isinstance(self.jitter, bool):
            errors.append(f"jitter must be a bool, got {self.jitter!r}")
        if errors:
            raise DefinitionError([FieldError("retry", e) for e in errors])

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed try number ``attempt`` (counted from 1)."""
        base = self.backoff * 2 ** (attempt - 1)
        return base * (0.5 + rand()) if self.jitter else base


def _duration(value: Any) -> Any:
    """Seconds as a ``timedelta``; anything else as it is (checked after)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return timedelta(seconds=value)
    return value


@attrs.frozen
class Retention:
    """How much of an asset's history to keep: ``flowstone prune`` and the daemon delete
    its superseded, failed and cancelled records beyond the ``keep_last`` newest of each
    partition, or older than ``max_age`` (a ``timedelta``, or seconds). None: no limit
    of that kind; both None keep everything. A partition's current success, its latest
    record (a failure stays visible until it is fixed), unfinished records, and what a
    stale record was built from are never deleted."""

    keep_last: int | None = None
    max_age: timedelta | None = attrs.field(default=None, converter=_duration)

    def __attrs_post_init__(self) -> None:
        errors = []
        if self.keep_last is not None and (type(self.keep_last) is not int or self.keep_last < 0):
            errors.append(f"keep_last must be an int >= 0 or None, got {self.keep_last!r}")
        if self.max_age is not None and (not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)):
            errors.append(f"max_age must be a timedelta or a number of seconds > 0, or None, got {self.max_age!r}")
        if errors:
            raise DefinitionError([FieldError("retention", e) for e in errors])

    @property
    def limited(self) -> bool:
        """Whether this retention deletes anything at all."""
        return self.keep_last is not None or self.max_age is not None


def _names(value: Any) -> Any:
    """Lists become tuples and ``Asset`` objects their names; anything else is kept
    as given so that :func:`validate_asset` can say what is wrong with it."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value
    return tuple(v.name if isinstance(v, Asset) else v for v in value)


def _frozen_mapping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType(dict(value))
    return value


@attrs.frozen
class Asset:
    """A persistent piece of data and the function that computes it.

    ``metadata`` and ``io_config`` are read-only mappings;
    ``depends_on``, ``requires`` and ``tags`` are tuples (lists are converted, and
    ``Asset`` objects in ``depends_on`` are replaced by their names).
    """

    name: str
    description: str | None = attrs.field(default=None, kw_only=True)
    depends_on: tuple[str, ...] = attrs.field(default=(), converter=_names, kw_only=True)
    io_manager: str | None = attrs.field(default=None, kw_only=True)
    io_config: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_frozen_mapping, hash=False, kw_only=True
    )
    partitioned_by: PartitionsDefinition | None = attrs.field(default=None, kw_only=True)
    execute_fn: Callable[..., Any] | None = attrs.field(default=None, kw_only=True)
    requires: tuple[str, ...] = attrs.field(default=(), converter=_names, kw_only=True)
    metadata: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_frozen_mapping, hash=False, kw_only=True
    )
    tags: tuple[str, ...] = attrs.field(default=(), converter=_names, kw_only=True)
    code_version: str | None = attrs.field(default=None, kw_only=True)
    requires_approval: bool = attrs.field(default=False, kw_only=True)
    retry: RetryPolicy | None = attrs.field(default=None, kw_only=True)
    max_concurrency: int | None = attrs.field(default=None, kw_only=True)
    timeout: float | None = attrs.field(default=None, kw_only=True)
    executor: str | None = attrs.field(default=None, kw_only=True)
    automation: Any = attrs.field(default=None, kw_only=True)
    retention: Retention | None = attrs.field(default=None, kw_only=True)
    """``fs.Eager()``, ``fs.OnMissing()`` or None: when the daemon materializes it."""
    module: str | None = attrs.field(default=None, kw_only=True)
    line: int | None = attrs.field(default=None, kw_only=True)


def validate_asset(asset: Asset) -> list[FieldError]:
    """Every problem with one asset on its own; an empty list means valid.

    Graph-level problems (unknown dependencies, cycles, duplicate names) need the
    other assets and are found by :meth:`Pipeline.validate <flowstone.Pipeline.validate>`.
    """
    if not isinstance(asset, Asset):
        return [FieldError("asset", f"expected an fs.Asset, got {type(asset).__name__}")]
    name = asset.name if isinstance(asset.name, str) else None
    errors: list[FieldError] = []

    def problem(field: str, message: str) -> None:
        errors.append(FieldError(field, message, name))

    if (why := identifier_problem(asset.name)) is not None:
        problem("name", why)
    _check_names("depends_on", asset.depends_on, problem, own_name=asset.name)
    _check_names("requires", asset.requires, problem)
    if (why := _execute_problem(asset.execute_fn)) is not None:
        problem("execute", why)
    if asset.description is not None and not isinstance(asset.description, str):
        problem("description", f"must be a str or None, got {type(asset.description).__name__}")
    if asset.io_manager is not None and (not isinstance(asset.io_manager, str) or not asset.io_manager):
        problem("io_manager", f"must be a non-empty str key or None, got {asset.io_manager!r}")
    if (why := _mapping_problem(asset.io_config, json_values=False)) is not None:
        problem("io_config", why)
    if asset.partitioned_by is not None and not isinstance(asset.partitioned_by, PartitionsDefinition):
        problem(
            "partitioned_by",
            f"must be a partitions definition (fs.DailyPartitions, ...) or None, "
            f"got {asset.partitioned_by!r}",
        )
    _check_tags(asset.tags, problem)
    if (why := _mapping_problem(asset.metadata, json_values=True)) is not None:
        problem("metadata", why)
    if asset.code_version is not None and not isinstance(asset.code_version, str):
        problem("code_version", f"must be a str or None, got {asset.code_version!r}")
    if not isinstance(asset.requires_approval, bool):
        problem("requires_approval", f"must be a bool, got {asset.requires_approval!r}")
    if asset.retry is not None and not isinstance(asset.retry, RetryPolicy):
        problem("retry", f"must be an fs.RetryPolicy or None, got {asset.retry!r}")
    if asset.retention is not None and not isinstance(asset.retention, Retention):
        problem("retention", f"must be an fs.Retention or None, got {asset.retention!r}")
    limit = asset.max_concurrency
    if limit is not None and (type(limit) is not int or limit < 1):
        problem("max_concurrency", f"must be an int >= 1 or None, got {limit!r}")
    seconds = asset.timeout
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf
    ):
        problem("timeout", f"must be a number of seconds > 0 or None, got {seconds!r}")
    if (why := _executor_problem(asset)) is not None:
        problem("executor", why)
    from .automation import automation_problem  # it builds on this module

    if isinstance(asset.depends_on, tuple) and (why := automation_problem(asset.automation, asset.depends_on)):
        problem("automation", why)
    return errors


EXECUTORS = ("async", "thread", "process")


def executor_of(asset: Asset) -> str:
    """Where the function runs: the asset's ``executor``, else ``"async"`` for an
    ``async def`` and ``"thread"`` for a plain function."""
    if asset.executor is not None:
        return asset.executor
    try:
        return _function_kind(asset.execute_fn)
    except TypeError:  # an unhashable callable object
        return "async" if inspect.iscoroutinefunction(asset.execute_fn) else "thread"


@functools.lru_cache(maxsize=4096)
def _function_kind(fn: Any) -> str:
    """``executor_of`` a function without ``executor=``: worked out once per function
    (every materialization asks)."""
    return "async" if inspect.iscoroutinefunction(fn) else "thread"


def _executor_problem(asset: Asset) -> str | None:
    executor, fn = asset.executor, asset.execute_fn
    if executor is None or not callable(fn):
        return None
    if executor not in EXECUTORS:
        return f"must be one of {', '.join(map(repr, EXECUTORS))} or None, got {executor!r}"
    coroutine = inspect.iscoroutinefunction(fn)
    if executor == "async":
        return None if coroutine else "'async' runs an async def; this is a plain function (use 'thread' or 'process')"
    if coroutine:
        return f"{executor!r} runs a plain function; this is an async def (use 'async', or make it a def)"
    if executor == "process":
        qualname = getattr(fn, "__qualname__", "")
        if not inspect.isfunction(fn) or "<" in qualname or not getattr(fn, "__module__", None):
            return (
                "'process' needs a function defined at module level (a worker process imports it "
                f"by module and name), got {qualname or fn!r}"
            )
        if asset.requires:
            return "'process' cannot pass resources (they are live objects of this process)"
    return None


def _check_names(field: str, value: Any, problem: Callable[[str, str], None], own_name: Any = None) -> None:
    if isinstance(value, str):
        problem(field, f"must be a list of names, got the string {value!r}; did you mean [{value!r}]?")
        return
    if not isinstance(value, tuple):
        problem(field, f"must be a list of names, got {type(value).__name__}")
        return
    seen: set[str] = set()
    for item in value:
        if (why := identifier_problem(item)) is not None:
            problem(field, f"name {why}")
        elif item in seen:
            problem(field, f"{item!r} is listed twice")
        elif field == "depends_on" and item == own_name:
            problem(field, f"{item!r} cannot depend on itself")
        else:
            seen.add(item)


def _check_tags(tags: Any, problem: Callable[[str, str], None]) -> None:
    if not isinstance(tags, tuple):
        problem("tags", f"must be a list of strings, got {type(tags).__name__}: {tags!r}")
        return
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            problem("tags", f"each tag must be a non-empty str, got {tag!r}")


def _mapping_problem(value: Any, *, json_values: bool) -> str | None:
    if not isinstance(value, Mapping):
        return f"must be a mapping, got {type(value).__name__}"
    for key in value:
        if not isinstance(key, str):
            return f"keys must be str, got {type(key).__name__}: {key!r}"
    if json_values:
        # Metadata is saved with every materialization record, as JSON.
        try:
            json.dumps(dict(value), allow_nan=False)
        except (TypeError, ValueError) as exc:
            return f"must hold JSON values only (it is saved on every record): {exc}"
    return None


def _execute_problem(fn: Any) -> str | None:
    if fn is None:
        return "missing: give the function that computes the asset, taking (ctx, deps)"
    if not callable(fn):
        return f"must be callable, got {type(fn).__name__}"
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        return "must return its value, not yield it (generators are not supported)"
    if _plainly_two_positional(fn):
        return None  # what inspect.signature would say, read from the code object (it costs ~15 us)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return "its signature cannot be read; wrap it in a def taking (ctx, deps)"
    params = list(signature.parameters.values())
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) != 2 or len(positional) != 2:
        return f"must take exactly two positional parameters (ctx, deps), got {signature}"
    return None


_VARIADIC = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


def _plainly_two_positional(fn: Any) -> bool:
    """A plain function (not wrapped, no ``__signature__``) whose code takes exactly two
    positional parameters and nothing else; False means "ask inspect.signature"."""
    if type(fn) is not FunctionType or hasattr(fn, "__wrapped__") or hasattr(fn, "__signature__"):
        return False
    code = fn.__code__
    return code.co_argcount == 2 and code.co_kwonlyargcount == 0 and not code.co_flags & _VARIADIC


def asset(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    depends_on: Iterable[str | Asset] = (),
    description: str | None = None,
    io_manager: str | None = None,
    io_config: Mapping[str, Any] | None = None,
    partitioned_by: PartitionsDefinition | None = None,
    requires: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
    tags: Iterable[str] = (),
    code_version: str | None = None,
    requires_approval: bool = False,
    retry: RetryPolicy | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    executor: str | None = None,
    automation: Any = None,
    retention: Retention | None = None,
) -> Any:
    """Define an asset from the function that computes it: ``@fs.asset`` or ``@fs.asset(...)``.

    The name defaults to the function's name and the description to its
    docstring. Raises :class:`~flowstone.DefinitionError` listing every invalid
    field.
    """

    def build(func: Callable[..., Any]) -> Asset:
        code = getattr(func, "__code__", None)
        doc = inspect.getdoc(func) if inspect.isfunction(func) or inspect.ismethod(func) else None
        definition = Asset(
            name=name if name is not None else getattr(func, "__name__", None),  # type: ignore[arg-type]
            description=description if description is not None else doc,
            depends_on=depends_on,
            io_manager=io_manager,
            io_config={} if io_config is None else io_config,
            partitioned_by=partitioned_by,
            execute_fn=func,
            requires=requires,
            metadata={} if metadata is None else metadata,
            tags=tags,
            code_version=code_version,
            requires_approval=requires_approval,
            retry=retry,
            max_concurrency=max_concurrency,
            timeout=timeout,
            executor=executor,
            automation=automation,
            retention=retention,
            module=getattr(func, "__module__", None),
            line=code.co_firstlineno if code is not None else None,
        )
        errors = validate_asset(definition)
        if errors:
            raise DefinitionError(errors, asset=definition.name if isinstance(definition.name, str) else None)
        return definition

    if fn is None:
        return build
    if isinstance(fn, (str, Asset)):
        raise DefinitionError(
            [FieldError("execute", "use @fs.asset or @fs.asset(name=...): arguments are keywords")]
        )
    return build(fn)
