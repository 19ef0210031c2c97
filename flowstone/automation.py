"""Automation and sensors: what makes the daemon materialize an asset besides a schedule.

- ``fs.asset(..., automation=fs.Eager())``: whenever an upstream asset gets a new
  success, the asset is materialized (the same partition, or the whole asset when it
  is not partitioned), once per upstream change: a run that fails is not tried again
  until an upstream changes again.
- ``fs.asset(..., automation=fs.OnMissing())``: whenever a partition that should
  exist has never succeeded, it is materialized (once: a failure is not retried in
  a loop).
- ``@pipeline.sensor(interval=30)``: an async function ``(ctx)`` that the daemon
  calls every ``interval`` seconds and that returns a list of ``fs.RunRequest``;
  ``ctx.cursor`` (text, or None) is kept in the store between calls.

The daemon evaluates them (``flowstone.runtime.automation``); these are the
definitions, checked with the pipeline.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import attrs

from .definitions import FieldError
from .errors import DefinitionError
from .identifiers import identifier_problem

__all__ = ["Eager", "OnMissing", "RunRequest", "Sensor", "SensorContext"]


@attrs.frozen
class Eager:
    """Materialize the asset whenever an upstream asset gets a new success."""


@attrs.frozen
class OnMissing:
    """Materialize each partition that should exist and has no success yet."""


AUTOMATIONS = (Eager, OnMissing)


@attrs.frozen
class RunRequest:
    """What a sensor asks for: ``asset`` materialized at ``partition`` (its key, or its
    value; None for an unpartitioned asset)."""

    asset: str
    partition: Any = None


@attrs.define
class SensorContext:
    """What a sensor gets: its ``name``, ``cursor`` as saved after its last call (set
    it to what the next call should see), ``now`` (aware), and ``last_error`` when
    the last call failed."""

    name: str
    cursor: str | None
    now: datetime
    last_error: str | None = None


@attrs.frozen
class Sensor:
    """A function the daemon calls every ``interval`` seconds; see the module doc."""

    name: str
    fn: Callable[[SensorContext], Awaitable[list[RunRequest]]]
    interval: float = 30.0

    def __attrs_post_init__(self) -> None:
        problems = []
        if (why := identifier_problem(self.name)) is not None:
            problems.append(FieldError("name", why))
        if not inspect.iscoroutinefunction(self.fn):
            problems.append(FieldError("sensor", f"must be an async def taking (ctx), got {self.fn!r}"))
        else:
            parameters = list(inspect.signature(self.fn).parameters.values())
            if len(parameters) != 1 or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY,
                                                                    parameters[0].POSITIONAL_OR_KEYWORD):
                problems.append(FieldError("sensor", "must take exactly one positional parameter (ctx)"))
        seconds = self.interval
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
            problems.append(FieldError("interval", f"must be a number of seconds > 0, got {seconds!r}"))
        if problems:
            raise DefinitionError([attrs.evolve(p, asset=self.name if isinstance(self.name, str) else None)
                                   for p in problems])


def automation_problem(automation: Any, depends_on: tuple[str, ...]) -> str | None:
    """Why ``automation`` does not fit an asset with those upstream assets, or None."""
    if automation is None:
        return None
    if not isinstance(automation, AUTOMATIONS):
        return f"must be fs.Eager(), fs.OnMissing() or None, got {automation!r}"
    if isinstance(automation, Eager) and not depends_on:
        return "fs.Eager() follows upstream assets, and this asset has none (use fs.OnMissing() or a schedule)"
    return None
