"""The daemon: one active per store; it runs schedules, sensors and automation, and resumes backfills.

``run_daemon(rt, schedules, stop=event)`` runs until ``stop`` is set. It first
claims the store's ``"daemon"`` role (``store.claim_role``); while another daemon
holds it, this one is a standby that asks again every third of ``hold``, so it
takes over at most ``hold`` seconds (plus one look) after the active one went
quiet. The active daemon renews its hold every third of ``hold`` (its heartbeat)
and meanwhile:

- runs again the ticks a dead predecessor claimed and never ended, then runs the
  schedules (``run_schedules``);
- runs the sensors and the assets' automation (``flowstone.runtime.automation``);
- resumes backfills left unfinished: saved ``running`` by a process whose
  heartbeat stopped, or ``interrupted`` (their process stopped under them), and
  looks for such backfills again every ``RESCAN_SECONDS``.
- deletes what the assets' retention no longer keeps (``rt.prune()``), and the
  finished backfills and ticks older than the runtime's ``max_age``
  (``rt.prune_finished()``), every ``prune_interval`` seconds;
- when ``rt`` has a work queue (``open_runtime(queue=...)``), hands the jobs of
  workers that stopped answering back to it every ``RECONCILE_SECONDS``.

When ``stop`` is set it takes no more work: the runs in flight get ``grace``
seconds, then are cancelled (ticks end ``cancelled``; backfills are left to the
runtime, which saves them ``interrupted`` as it closes), and the role is released
so a standby takes over at once. A daemon that cannot renew its hold before it
lapses, or finds another holder, stops its work at once and becomes a standby.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs
from anyio.abc import TaskGroup

from ..automation import Sensor
from ..errors import BackfillOwned, FlowstoneError, RuntimeClosed
from ..schedules import Schedule
from .automation import AUTOMATION_SECONDS, run_automation, run_sensor
from .backfill import STALE_SECONDS
from .scheduler import Clock, SystemClock, run_schedules, run_tick

__all__ = ["GRACE_SECONDS", "HOLD_SECONDS", "ROLE", "run_daemon"]

log = logging.getLogger("flowstone.daemon")

ROLE = "daemon"
HOLD_SECONDS = 15.0
"""How long the active daemon's hold lasts unless renewed (renewed every third of it)."""
GRACE_SECONDS = 30.0
"""How long work in flight may take to finish once the daemon is asked to stop."""
RESCAN_SECONDS = STALE_SECONDS
"""How often the active daemon looks for backfills whose process died."""
PRUNE_SECONDS = 3600.0
"""How often the active daemon deletes what the assets' retention no longer keeps."""
RECONCILE_SECONDS = 5.0
"""How often the active daemon hands the jobs of dead workers back to the queue."""


def daemon_owner() -> str:
    """This process's name in the store: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def run_daemon(
    rt: Any,
    schedules: Sequence[Schedule] = (),
    *,
    stop: anyio.Event,
    sensors: Sequence[Sensor] = (),
    owner: str | None = None,
    grace: float = GRACE_SECONDS,
    hold: float = HOLD_SECONDS,
    clock: Clock | None = None,
    automation_interval: float = AUTOMATION_SECONDS,
    prune_interval: float = PRUNE_SECONDS,
) -> None:
    """Be the store's daemon until ``stop`` is set (see the module doc): run
    ``schedules``, ``sensors`` and the automation of ``rt``'s assets (looked at every
    ``automation_interval`` seconds). Backfills it resumed run in ``rt``: those still
    running when it returns stop when ``rt`` closes, saved ``interrupted``."""
    owner = owner or daemon_owner()
    store = rt.store
    standby_for: str | None = None
    while not stop.is_set():
        asked = anyio.current_time()
        try:
            holder = await store.claim_role(ROLE, owner, hold)
        except FlowstoneError as error:  # the store is away: keep asking
            log.warning("daemon %s: the store did not answer (%s); asking again in %.1fs", owner, error, hold / 3)
            await _wait(stop, hold / 3)
            continue
        if holder.owner != owner:
            if standby_for != holder.owner:
                log.info("daemon %s: standby; %s is active", owner, holder.owner)
                standby_for = holder.owner
            await _wait(stop, hold / 3)
            continue
        standby_for = None
        taken = f", taken over from {holder.taken_from}" if holder.taken_from else ""
        log.info("daemon %s: active (fence %d%s), %d schedules, %d sensors", owner, holder.fence, taken,
                 len(schedules), len(sensors))
        duties = _Duties(schedules, sensors, clock, automation_interval, prune_interval)
        await _active(rt, duties, owner, stop, grace=grace, hold=hold, renewed=asked)
    log.info("daemon %s: stopped", owner)


@attrs.frozen
class _Duties:
    """What the active daemon runs."""

    schedules: Sequence[Schedule]
    sensors: Sequence[Sensor]
    clock: Clock | None
    automation_interval: float
    prune_interval: float


async def _active(
    rt: Any, duties: _Duties, owner: str, stop: anyio.Event, *, grace: float, hold: float, renewed: float,
) -> None:
    """Hold the role and do the daemon's work until ``stop`` (then release the role)
    or until the hold is lost (then stop at once)."""
    lost, since = anyio.Event(), (duties.clock or SystemClock()).now()  # where schedules never run start
    async with anyio.create_task_group() as heart:
        heart.start_soon(_keep_role, rt.store, owner, hold, renewed, lost)
        async with anyio.create_task_group() as work:
            async with anyio.create_task_group() as intake:
                for what, duty in (
                    ("running again the ticks left unfinished",
                     functools.partial(_rerun_unfinished_ticks, rt, duties.schedules, owner, work)),
                    ("the schedules", functools.partial(
                        run_schedules, rt, duties.schedules, owner, clock=duties.clock, work=work, since=since)),
                    ("resuming backfills", functools.partial(_resume_backfills, rt, work)),
                    ("automation", functools.partial(
                        run_automation, rt, work, interval=duties.automation_interval)),
                    *((f"sensor {s.name}", functools.partial(run_sensor, rt, s, work)) for s in duties.sensors),
                    *((("the work queue", functools.partial(_reconcile, rt.queue)),) if rt.queue else ()),
                    ("retention", functools.partial(_prune, rt, duties.prune_interval)),
                ):
                    intake.start_soon(_supervised, what, duty)
                async with anyio.create_task_group() as either:
                    either.start_soon(_then_cancel, stop, either)
                    either.start_soon(_then_cancel, lost, either)
                intake.cancel_scope.cancel()
            if lost.is_set():
                work.cancel_scope.cancel()
            else:
                log.info("daemon %s: stopping; work in flight has %gs to finish", owner, grace)
                work.cancel_scope.deadline = anyio.current_time() + grace
        heart.cancel_scope.cancel()
    if not lost.is_set():
        with anyio.CancelScope(shield=True), anyio.move_on_after(hold / 3):
            try:
                await rt.store.release_role(ROLE, owner)  # a standby takes over at once
            except FlowstoneError as error:
                log.warning("daemon %s: the role was not released (%s); a standby takes over when it lapses",
                            owner, error)


RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Pauses before a duty that failed starts again (the last one repeats)."""


async def _supervised(what: str, duty: Callable[[], Awaitable[None]]) -> None:
    """Run ``duty`` until it returns; when it fails (the store is away, mostly), log it
    and start it again after a pause: a daemon does not stop over one failure."""
    failures = 0
    while True:
        try:
            await duty()
            return
        except Exception as error:
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            failures += 1
            log.error("daemon: %s failed (%s: %s); starting again in %gs", what, type(error).__name__, error, delay,
                      exc_info=not isinstance(error, FlowstoneError))
        await anyio.sleep(delay)


async def _then_cancel(event: anyio.Event, group: TaskGroup) -> None:
    await event.wait()
    group.cancel_scope.cancel()


async def _wait(stop: anyio.Event, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        await stop.wait()


async def _keep_role(store: Any, owner: str, hold: float, renewed: float, lost: anyio.Event) -> None:
    """Renew the hold every third of ``hold`` (the daemon's heartbeat). Set ``lost``
    when another daemon holds the role, or when the hold may have lapsed because the
    store did not answer in time: from then on a standby may be active."""
    every = hold / 3
    while True:
        await anyio.sleep(every)
        asked = anyio.current_time()
        try:
            with anyio.fail_after(max(0.0, renewed + hold - asked - every / 2)):
                holder = await store.claim_role(ROLE, owner, hold)
        except (FlowstoneError, TimeoutError) as error:
            if anyio.current_time() + every >= renewed + hold:
                log.error("daemon %s: the hold could not be renewed before it lapses (%s): stopping work",
                          owner, error or "timed out")
                lost.set()
                return
            log.warning("daemon %s: renewing the hold failed (%s); trying again", owner, error or "timed out")
            continue
        if holder.owner != owner:
            log.error("daemon %s: %s holds the role now (this daemon was silent too long): stopping work",
                      owner, holder.owner)
            lost.set()
            return
        renewed = asked


async def _rerun_unfinished_ticks(rt: Any, schedules: Sequence[Schedule], owner: str, work: TaskGroup) -> None:
    """Run again the ticks another daemon claimed and never ended (it died): one
    daemon is active at a time, so whatever another left running is orphaned."""
    by_name = {schedule.name: schedule for schedule in schedules}
    assets = {asset.name: asset for asset in await rt.assets()}
    for tick in await rt.store.unfinished_ticks():
        if tick.owner == owner:
            continue
        schedule = by_name.get(tick.schedule)
        if schedule is None:
            await rt.store.finish_tick(tick.schedule, tick.at, "cancelled",
                                       error=f"left by {tick.owner}; the schedule is no longer defined")
            continue
        log.warning("schedule %s: the tick of %s was left unfinished by %s; running it again",
                    tick.schedule, tick.at.isoformat(), tick.owner)
        work.start_soon(run_tick, rt, schedule, assets[schedule.asset].partitioned_by, tick.at)


async def _resume_backfills(rt: Any, work: TaskGroup) -> None:
    """Resume, here, each backfill left unfinished (saved running by a process whose
    heartbeat stopped, or interrupted); look again every ``RESCAN_SECONDS``."""
    resumed: set[uuid.UUID] = set()
    while True:
        for status in await rt.store.list_backfill_statuses(limit=1000):
            if status.id in resumed or not (status.state == "running" or status.interrupted):
                continue
            try:
                await rt.resume_backfill(status.id)
            except BackfillOwned:
                continue  # its process is alive: it finishes it
            except FlowstoneError as error:
                log.warning("backfill %s: could not be resumed: %s", status.id, error)
                resumed.add(status.id)  # not again and again
                continue
            log.info("backfill %s (%s): resumed, %d of %d partitions done before", status.id, status.asset,
                     status.succeeded, status.total)
            resumed.add(status.id)
            work.start_soon(_follow, rt, status.id)
        await anyio.sleep(RESCAN_SECONDS)


async def _prune(rt: Any, interval: float) -> None:
    """Delete what the assets' retention no longer keeps, and the finished backfills and
    ticks older than the runtime's ``max_age``, every ``interval`` seconds."""
    while True:
        if deleted := sum((await rt.prune()).values()):
            log.info("retention: %d history records deleted", deleted)
        await rt.prune_finished()  # logs what it deleted
        await anyio.sleep(interval)


async def _reconcile(queue: Any) -> None:
    """Hand the jobs of dead workers back to the queue, every ``RECONCILE_SECONDS``."""
    while True:
        if handed := await queue.reconcile():
            log.warning("the work queue: %d jobs of workers that stopped answering are back in it", handed)
        await anyio.sleep(RECONCILE_SECONDS)


async def _follow(rt: Any, backfill: uuid.UUID) -> None:
    """Work in flight while the backfill runs (so a stop waits for it, up to the grace)."""
    try:
        status = await rt.wait_backfill(backfill)
    except RuntimeClosed:
        return
    log.info("backfill %s: %s (%d succeeded, %d failed, %d cancelled of %d)", backfill, status.state,
             status.succeeded, status.failed, status.cancelled, status.total)
