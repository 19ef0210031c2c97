"""Schedules: materialize an asset on the ticks of a cron expression, in a time zone.

This module is the definition and its arithmetic: which ticks fall in a span of
time, which of them to run after a pause (``catch_up``), and which partition a
tick materializes. The daemon runs them; nothing here waits or keeps state, so
every rule is tested by feeding times in, DST nights included.

Ticks follow Debian cron in local time (cronsim): a time that a spring-forward
skips runs right after the gap, and a time that a fall-back repeats runs once (at
its first occurrence); an hourly schedule runs in both of the repeated hours,
which are two distinct instants. Ticks are handed out as aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from .definitions import FieldError
from .errors import DefinitionError

__all__ = ["Schedule", "aware_datetime"]

CATCH_UP_WORDS = ("skip", "latest")

ON_TIME = timedelta(minutes=1)
"""How late a tick may be noticed and still count as on time (not missed):
``catch_up="skip"`` runs it, drops the ticks older than this."""


def _cron(expression: Any, zone: str) -> Any:
    """The parsed expression, checked by cronsim (one tick computed)."""
    from cronsim import CronSim, CronSimError

    from .partitions import zone_of

    if not isinstance(expression, str) or not expression.strip():
        raise DefinitionError(
            [FieldError("cron", f"must be a cron expression such as '0 6 * * *', got {expression!r}")])
    try:
        start = datetime(2000, 1, 1, tzinfo=zone_of(zone))
        next(CronSim(expression, start))
    except CronSimError as error:
        raise DefinitionError([FieldError("cron", f"{expression!r} is not a cron expression: {error}")]) from None
    except StopIteration:
        raise DefinitionError([FieldError("cron", f"{expression!r} never fires")]) from None
    return expression


@attrs.frozen
class Schedule:
    """Materialize ``asset`` at each tick of ``cron`` in ``timezone`` (an IANA name).

    ``catch_up`` says what runs after the daemon was away and ticks went by:
    ``"skip"`` (only a tick noticed within a minute of its time), ``"latest"`` (the
    newest missed tick) or an int N (the last N missed ticks, oldest first). A tick
    of a partitioned asset materializes the newest partition complete at the tick's
    time. ``name`` identifies the schedule's ticks in the store (default:
    ``"<asset> <cron> <timezone>"``). Raises ``DefinitionError`` for a bad field.
    """

    asset: str
    cron: str
    timezone: str = attrs.field(default="UTC", kw_only=True)
    catch_up: str | int = attrs.field(default="latest", kw_only=True)
    name: str = attrs.field(default="", kw_only=True)

    def __attrs_post_init__(self) -> None:
        from .identifiers import identifier_problem
        from .partitions import zone_of

        problems = []
        if (why := identifier_problem(self.asset)) is not None:
            problems.append(FieldError("asset", why))
        try:
            zone_of(self.timezone)
        except Exception as error:  # InvalidPartition names the problem
            problems.append(FieldError("timezone", str(error)))
        else:
            try:
                _cron(self.cron, self.timezone)
            except DefinitionError as error:
                problems += error.errors
        catch_up = self.catch_up
        if not (catch_up in CATCH_UP_WORDS or (type(catch_up) is int and catch_up >= 1)):
            problems.append(FieldError("catch_up", f"must be 'skip', 'latest' or an int >= 1, got {catch_up!r}"))
        if problems:
            raise DefinitionError(problems)
        if not self.name:
            object.__setattr__(self, "name", f"{self.asset} {self.cron} {self.timezone}")

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The ticks in ``(after, until]``, oldest first, as UTC datetimes."""
        from cronsim import CronSim

        from .partitions import zone_of

        zone = zone_of(self.timezone)
        for tick in CronSim(self.cron, aware_datetime(after, "after").astimezone(zone)):
            if tick > aware_datetime(until, "until"):
                return
            yield tick.astimezone(timezone.utc)

    def next_tick(self, after: datetime) -> datetime:
        """The first tick after ``after`` (UTC)."""
        from cronsim import CronSim

        from .partitions import zone_of

        return next(CronSim(self.cron, aware_datetime(after, "after").astimezone(zone_of(self.timezone)))).astimezone(
            timezone.utc)

    def due(self, last: datetime, now: datetime) -> list[datetime]:
        """The ticks to run now, oldest first, when ``last`` is the newest tick already
        handled (or the time the schedule started) and ``now`` the time: what
        ``catch_up`` keeps of the ticks in ``(last, now]``."""
        return self.keep(list(self.ticks(last, now)), now)

    def keep(self, passed: list[datetime], now: datetime) -> list[datetime]:
        """What ``catch_up`` keeps of ``passed`` (ticks up to ``now``, oldest first):
        ``due`` for a caller that has listed the ticks already."""
        now = aware_datetime(now, "now")
        if self.catch_up == "skip":
            return [tick for tick in passed[-1:] if now - tick <= ON_TIME]
        count = 1 if self.catch_up == "latest" else int(self.catch_up)
        return passed[-count:]

    def partition_at(self, definition: Any, tick: datetime) -> Any:
        """The partition a tick materializes: none for an unpartitioned asset, else
        the newest partition of ``definition`` complete at the tick's time (the day
        before the tick's local day, the hour before the hour the tick falls in).
        Raises ``DefinitionError`` for a definition that is not a calendar one."""
        if definition is None:
            return None
        from .partitions import DailyPartitions, HourlyPartitions

        tick = aware_datetime(tick, "tick")
        if isinstance(definition, DailyPartitions):
            return definition.validate(tick.astimezone(definition.zone).date() - timedelta(days=1))
        if isinstance(definition, HourlyPartitions):
            # The local hour the tick falls in (hours start on local hours: +05:30 too).
            started = tick.astimezone(definition.zone).replace(minute=0, second=0, microsecond=0)
            return definition.validate(started.astimezone(timezone.utc) - timedelta(hours=1))  # not complete yet
        raise DefinitionError([FieldError(
            "schedule", f"a schedule materializes an unpartitioned asset or one with daily or hourly partitions; "
            f"{self.asset!r} has {type(definition).__name__}", self.asset,
        )])


def aware_datetime(value: Any, what: str) -> datetime:
    """``value`` if it is a timezone-aware datetime; ``DefinitionError`` naming ``what`` otherwise."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise DefinitionError([FieldError(what, f"must be a timezone-aware datetime, got {value!r}")])
    return value
