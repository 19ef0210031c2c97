"""Backfills: one asset over many partitions, with bounded parallelism.

A backfill is an actor started in the runtime's nursery. ``max_parallel``
workers pull partitions from a bounded feed and run each as an ordinary
materialization (so skipping, lineage, retries and single flight all apply);
the actor answers ``status``/``wait``/``cancel`` meanwhile. Memory holds
counters and at most 100 error messages, never a result per partition.

Cancelling cancels the workers; each in-flight run tells its executor it left,
the executor cancels the orphaned job and records it ``cancelled``, and only
then does the worker finish. So when ``cancel_backfill`` returns, every record
the backfill created is terminal.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import Any, Protocol

import anyio
import attrs
from anyio.abc import TaskStatus

from .. import events as ev
from ..actors.mailbox import DEFERRED, Handle, Handlers, Message, Reply, fail_pending, open_mailbox, serve
from ..errors import FlowstoneError, LeaseLost, MaterializationFailed, RuntimeClosed
from ..partitions import serialize_partition
from ..plumbing.clock import utcnow
from ..plumbing.interrupts import internal
from ..store.backfills import BackfillSpec, BackfillStatus, Saved
from ..store.leases import CancelRequested, LeaseHeld
from ..tenancy import tenant_scope
from .job import BATCH_SECONDS
from .run import RunRequest, RunResult, new_request
from .watch import EventBus

__all__ = ["BackfillSpec", "BackfillStatus", "Dispatcher", "Runner", "run_backfill"]

log = logging.getLogger("flowstone.backfill")

MAX_ERRORS = 100

CHECKPOINT_SECONDS = 5.0
"""How often a running backfill saves its progress. Each save is also its owner's
heartbeat: a process killed outright leaves counts no older than this, and a
heartbeat older than ``STALE_SECONDS`` says its owner is gone."""

STALE_SECONDS = 30.0
"""A running backfill whose owner has not saved for this long may be resumed elsewhere."""

SAVE_ATTEMPTS = 5
SAVE_DELAY = 0.2
"""A save that fails is tried again (pauses from this, doubling), up to
``SAVE_ATTEMPTS`` times; each try may take ``SAVE_TIMEOUT`` seconds."""
SAVE_TIMEOUT = 10.0


@attrs.frozen(kw_only=True)
class Status(Message[BackfillStatus]):
    pass


@attrs.frozen(kw_only=True)
class Cancel(Message[BackfillStatus]):
    pass


@attrs.frozen(kw_only=True)
class Wait(Message[BackfillStatus]):
    pass


MAX_CHUNK = 16
"""Most partitions a worker takes at once, and a batch holds (the pace keeps a batch
to ``BATCH_SECONDS`` of work), unless the store asks for more (``Runner.most``).
On the memory store a batch's jobs, records and leases live until it ends: 64 of
them at a time outlived the collector's young passes (at 100,000 partitions 1,465
young collections and 12 full ones, ~8 µs a partition, against 20 and none)."""


Reported = Callable[[int, Any], None]
"""Told a batch's outcomes, each by its partition's index, as they come."""


@attrs.frozen
class Runner:
    """How a backfill runs partitions: ``prefetch`` prepares a chunk at once (one
    store round trip for its latest successes) and answers one entry per partition
    (or None), ``run`` runs one partition with its entry; ``batch``, when given,
    runs several with their entries as one batch, reports each one's outcome (by
    index: the run's result, or the error it failed with) as soon as it is known,
    and answers the indexes of those to ``run`` alone instead."""

    prefetch: Callable[[list[RunRequest]], Awaitable[Sequence[Any] | None]]
    run: Callable[[RunRequest, Any], Awaitable[Any]]
    batch: Callable[[list[RunRequest], list[Any], Reported], Awaitable[list[int]]] | None = None
    most: int = MAX_CHUNK
    """Most partitions a worker takes at once and a batch holds: the store's
    ``backfill_chunk`` when it has one (a database's write has fixed costs that more
    rows share), else ``MAX_CHUNK``."""


class Dispatcher(Protocol):
    """Where a backfill on workers sends its partitions (``flowstone.workers.Queue``,
    given to ``open_runtime(queue=...)``): the backfill actor stays here, counting and
    saving as for a local backfill; its ``max_parallel`` tasks each send one partition
    and wait for its outcome, so at most that many are enqueued at once."""

    def runner(self, spec: BackfillSpec, store: Any) -> Runner:
        """How ``spec``'s partitions run: each sent as a job, its outcome read from ``store``."""
        ...

    async def reconcile(self) -> int:
        """Hand the jobs of workers that stopped answering back to the queue; how many."""
        ...


@attrs.define
class _Progress:
    """Owned by one backfill actor and its workers."""

    spec: BackfillSpec
    started_at: datetime
    started: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: list[tuple[str | None, str]] = attrs.field(factory=list)
    finished_at: datetime | None = None
    cancel_requested: bool = False
    waiters: list[Reply] = attrs.field(factory=list)
    lost: str | None = None
    """Why another process drives this backfill now (it claimed it): we stopped."""
    interrupted: bool = False
    """Stopped because the runtime stopped, not because anyone asked: resumable."""
    unsaved: str | None = None
    """Why the final status could not be saved: the backfill fails, loudly."""
    deferred: list[Any] = attrs.field(factory=list)
    """Partitions another process was computing when their turn came: run last."""
    bus: EventBus | None = None
    """The runtime's watchers, told of each partition done and of the end."""

    def announce_progress(self) -> None:
        if self.bus is not None and self.bus.subscribers:
            spec = self.spec
            self.bus.publish(ev.BackfillProgress(
                at=utcnow(), tenant=spec.tenant, run_id=None, backfill_id=spec.id, asset=spec.asset,
                total=len(spec.partitions), queued=len(spec.partitions) - self.started, running=self.running,
                succeeded=self.succeeded, failed=self.failed, cancelled=0,
            ))

    def announce_end(self) -> None:
        if self.bus is not None and self.bus.subscribers:
            status = self.status()
            self.bus.publish(ev.BackfillFinished(
                at=utcnow(), tenant=self.spec.tenant, run_id=None, backfill_id=status.id, asset=status.asset,
                state=status.state, total=status.total, succeeded=status.succeeded, failed=status.failed,
                cancelled=status.cancelled,
            ))

    def status(self) -> BackfillStatus:
        total = len(self.spec.partitions)
        errors = list(self.errors)
        if self.finished_at is None:
            state, cancelled = "running", 0
            queued = total - self.started
        else:
            cancelled = total - self.succeeded - self.failed
            queued = 0
            state = "cancelled" if self.cancel_requested else ("failed" if self.failed else "succeeded")
            if self.lost is not None:
                state = "cancelled"
                errors.append((None, self.lost))
            elif self.interrupted:
                state = "cancelled"
            elif self.unsaved is not None:
                state = "failed"
                errors.append((None, f"the final status could not be saved: {self.unsaved}"))
        return BackfillStatus(
            id=self.spec.id,
            asset=self.spec.asset,
            state=state,
            total=total,
            queued=queued,
            running=self.running,
            succeeded=self.succeeded,
            failed=self.failed,
            cancelled=cancelled,
            errors=tuple(errors),
            started_at=self.started_at,
            finished_at=self.finished_at,
            interrupted=self.interrupted and self.lost is None and self.finished_at is not None,
        )


async def save_retrying(save: Callable[[Saved], Awaitable[None]], saved: Saved) -> None:
    """``save(saved)``, tried again while it fails (never dropped in silence); the last
    failure is raised. ``LeaseLost`` (another process owns the backfill now) is final."""
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            with anyio.fail_after(SAVE_TIMEOUT):
                await save(saved)
            return
        except LeaseLost:
            raise
        except (FlowstoneError, TimeoutError) as error:
            if attempt == SAVE_ATTEMPTS:
                raise
            delay = SAVE_DELAY * 2 ** (attempt - 1)
            log.warning("backfill %s: saving failed (%s), attempt %d/%d; again in %.1fs",
                        saved.spec.id, error or "timed out", attempt, SAVE_ATTEMPTS, delay)
            await anyio.sleep(delay)


@internal  # Ctrl-C goes to the caller's task, not into this loop
async def run_backfill(
    spec: BackfillSpec,
    runner: Runner,
    save: Callable[[Saved], Awaitable[None]],
    on_enter: Callable[[Handle], Awaitable[None]],
    on_exit: Callable[[Handle, BackfillStatus | None], Awaitable[None]],
    *,
    bus: EventBus | None = None,
    task_status: TaskStatus[Handle] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The backfill actor; start with ``handle = await tg.start(run_backfill, ...)``.

    ``save`` writes the status as this process's (retried; see ``save_retrying``): a
    first save that fails means the backfill does not start; a checkpoint that finds
    another owner stops it; a final save that fails makes it ``failed``, and
    ``on_exit`` gets that status to keep, so the backfill is never unknown."""
    handle, send, receive = open_mailbox(f"backfill:{spec.id}")
    progress = _Progress(spec=spec, started_at=utcnow(), bus=bus)
    work = anyio.CancelScope()

    def status(message: Status) -> BackfillStatus:
        return progress.status()

    def wait(message: Wait | Cancel) -> Any:
        """Answered when the backfill ends (at once when it has)."""
        if progress.finished_at is not None:
            return progress.status()
        assert message.reply is not None
        progress.waiters.append(message.reply)
        return DEFERRED

    def cancel(message: Cancel) -> Any:
        progress.cancel_requested = progress.finished_at is None
        work.cancel()
        return wait(message)

    handlers: Handlers = {Status: status, Wait: wait, Cancel: cancel}

    unsaved: BackfillStatus | None = None
    final: BackfillStatus | None = None  # once it ended and saved its end
    left = False  # the registry (on_exit)
    try:
        await save_retrying(save, Saved(spec, progress.status()))
        await on_enter(handle)  # registered before anyone can ask about it
        task_status.started(handle)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve, handle.name, receive, handlers)
            with tenant_scope(spec.tenant) if spec.tenant is not None else nullcontext():
                try:
                    with work:
                        done = anyio.Event()
                        async with anyio.create_task_group() as running:
                            running.start_soon(_checkpoints, spec, progress, save, done, work)
                            try:
                                await _work(spec, progress, runner)
                            finally:
                                done.set()
                except Exception:
                    raise
                except BaseException:
                    # The runtime is stopping (cancelled, or Ctrl-C landed here): what
                    # ran is recorded, the rest is cancelled; a persistent store keeps
                    # that for resume_backfill.
                    progress.interrupted = not progress.cancel_requested
                    progress.cancel_requested = True
                    progress.finished_at = utcnow()
                    with anyio.CancelScope(shield=True):
                        unsaved = await _save_final(spec, progress, save)
                    progress.announce_end()
                    raise
            progress.finished_at = utcnow()  # from now on a Wait is answered at once
            with anyio.CancelScope(shield=True):
                unsaved = await _save_final(spec, progress, save)
                final = progress.status()
                progress.announce_end()
                # Leave the registry before anyone hears "done", so a resume that
                # follows at once starts a new run instead of finding this one.
                await on_exit(handle, unsaved)
                left = True
            send.close()  # serve answers what is already queued, then ends
    finally:
        send.close()
        # Those waiting hear the end once this task has nothing left to await: a
        # runtime closed right after would otherwise cancel it, and anyio keeps a
        # cancelled task's frames (the runner: the store, the runtime) in a reference
        # cycle that only the garbage collector frees.
        for waiter in progress.waiters:
            if final is not None:
                waiter.resolve(final)
            else:
                waiter.fail(RuntimeClosed(f"backfill {spec.id} stopped with the runtime"))
        fail_pending(handle.name, receive, lambda: RuntimeClosed(f"backfill {spec.id} stopped"))
        receive.close()
        if not left:
            with anyio.CancelScope(shield=True):
                await on_exit(handle, unsaved)


async def _save_final(
    spec: BackfillSpec, progress: _Progress, save: Callable[[Saved], Awaitable[None]]
) -> BackfillStatus | None:
    """Save the final status; the status to keep in memory when that failed (or when
    another process owns the backfill now), else None."""
    if progress.lost is None:
        try:
            await save_retrying(save, Saved(spec, progress.status()))
            return None
        except LeaseLost as error:
            progress.lost = str(error)
        except (FlowstoneError, TimeoutError) as error:
            progress.unsaved = str(error) or type(error).__name__
            log.error("backfill %s finished but its final status could not be saved: %s", spec.id, progress.unsaved)
    return progress.status()


async def _checkpoints(
    spec: BackfillSpec, progress: _Progress, save: Callable[[Saved], Awaitable[None]], done: anyio.Event,
    work: anyio.CancelScope,
) -> None:
    """Save the progress every ``CHECKPOINT_SECONDS`` until ``done`` (each save is the
    owner's heartbeat). A save is never cut short (the task group waits for it), so
    no checkpoint can land after the final status. One that fails is logged and tried
    again next time: a store that is down now may be back. One that finds another
    owner stops the backfill: that process drives it now."""
    while True:
        with anyio.move_on_after(CHECKPOINT_SECONDS):
            await done.wait()
        if done.is_set():
            return
        with anyio.CancelScope(shield=True):
            try:
                await save(Saved(spec, progress.status()))
            except LeaseLost as error:
                log.warning("backfill %s: %s; stopping here", spec.id, error)
                progress.lost = str(error)
                work.cancel()
                return
            except CancelRequested:
                log.info("backfill %s: cancelled from another process", spec.id)
                progress.cancel_requested = True
                work.cancel()
                return
            except Exception as error:
                log.warning("backfill %s: checkpoint not saved: %s", spec.id, error)


def chunk_size(total: int, max_parallel: int, most: int = MAX_CHUNK) -> int:
    """Partitions a worker takes at once: enough to share one lookup round trip,
    few enough that every worker gets work (ADR 0005), at most ``most``."""
    return max(1, min(most, total // (max_parallel * 2)))


async def _work(spec: BackfillSpec, progress: _Progress, runner: Runner) -> None:
    # The workers are this actor's own tasks and share one iterator: taking the
    # next partitions is a plain islice(), with no channel hop or yield per item.
    feed = iter(spec.partitions)
    size = chunk_size(len(spec.partitions), spec.max_parallel, runner.most)
    pace = _Pace(runner.most)
    async with anyio.create_task_group() as workers:
        for _ in range(min(spec.max_parallel, len(spec.partitions))):
            workers.start_soon(_worker, spec, progress, runner, feed, size, pace)


async def _worker(
    spec: BackfillSpec, progress: _Progress, runner: Runner, feed: Iterator[Any], size: int, pace: _Pace
) -> None:
    """Run chunks of partitions from the shared feed: ``size`` at a time, or as many
    as a batch takes (``pace``) when that is more. A chunk of fast partitions then
    shares one lookup and one batch, and still holds about ``BATCH_SECONDS`` of
    work, so the workers run out together. A partition another process is
    computing right now is put aside rather than waited for (several processes
    backfilling the same partitions then share the work instead of queueing behind
    each other); once the feed is empty, the ones put aside run, now waiting if they
    must, and mostly find the other process's success to take."""
    while chunk := list(itertools.islice(feed, max(size, pace.size))):
        # A partition that blocks on nothing never yields, and the chunk's lookup is
        # answered before anyio's cancellation reaches a waiting task on asyncio (it
        # only cancels tasks whose wait is not over): without this, cancelling a
        # backfill of fast partitions never stopped it there.
        await anyio.lowlevel.checkpoint_if_cancelled()
        requests = [
            new_request((spec.asset, p, spec.upstream, spec.force, spec.io, spec.context, True))  # defer_held
            for p in chunk
        ]
        try:
            ahead = await runner.prefetch(requests)
        except FlowstoneError:
            ahead = None  # each run looks up for itself, and reports what is wrong
        entries = list(ahead) if ahead is not None else [None] * len(chunk)
        start = 0
        while start < len(chunk):
            end = start + (pace.size if runner.batch is not None and ahead is not None else 1)
            if end - start > 1:
                await _run_batch(spec, progress, runner, pace, chunk[start:end], requests[start:end],
                                 entries[start:end])
            else:
                pace.saw([await _run_one(spec, progress, runner, chunk[start], requests[start], entries[start])])
            start = end
    while progress.deferred:
        await anyio.lowlevel.checkpoint_if_cancelled()
        partition = progress.deferred.pop()
        request = RunRequest(spec.asset, partition, spec.upstream, spec.force, spec.io, spec.context)
        await _run_one(spec, progress, runner, partition, request, None)


class _Pace:
    """How many partitions the next batch of a backfill's workers takes: as many as
    computed in ``BATCH_SECONDS`` in the batch (or lone partition) that ended last,
    in any worker, judged by their records' durations; one while none is known, and
    one after a partition whose duration is not known. Shared by the workers (the
    partitions of one asset take about as long as each other): each worker knowing
    only its own ran twenty partitions alone before any batch, a fifth of a
    366-partition backfill's runs at ``max_parallel=20``."""

    __slots__ = ("most", "size")

    def __init__(self, most: int = MAX_CHUNK) -> None:
        self.size = 1
        self.most = most

    def saw(self, results: Sequence[Any]) -> None:
        durations = [_duration_ms(result) for result in results]
        known = [d for d in durations if d is not None]
        if len(known) < len(durations) or not known:
            self.size = 1
            return
        each = max(sum(known) / len(known), 0.001) / 1000
        self.size = max(1, min(self.most, int(BATCH_SECONDS / each)))


def _duration_ms(result: Any) -> float | None:
    """How long the functions of a partition's run ran, given ``result`` (the run's
    result, or the error it failed with): 0 when it reused everything; None when
    not known."""
    if isinstance(result, MaterializationFailed):
        result = result.result
    if not isinstance(result, RunResult):
        return None
    total = 0.0
    for name, record in result.materializations.items():
        if name not in result.skipped:
            if record.duration_ms is None:
                return None
            total += record.duration_ms
    return total


async def _run_batch(
    spec: BackfillSpec, progress: _Progress, runner: Runner, pace: _Pace, partitions: list[Any],
    requests: list[RunRequest], entries: list[Any],
) -> None:
    """Run ``partitions`` as one batch (``Runner.batch``), counting each as its
    outcome comes; then, alone, those the batch handed back."""
    assert runner.batch is not None
    progress.started += len(partitions)
    progress.running += len(partitions)
    outcomes: list[Any] = []
    counted: set[int] = set()

    def report(index: int, outcome: Any) -> None:
        counted.add(index)
        outcomes.append(outcome)
        progress.running -= 1
        _count(spec, progress, partitions[index], outcome)
        progress.announce_progress()

    try:
        alone = await runner.batch(requests, entries, report)
    except Exception as error:  # the batch broke: each partition it did not finish failed with it
        alone = []
        for index in range(len(partitions)):
            if index not in counted:
                report(index, error)
    finally:
        uncounted = len(partitions) - len(counted)
        progress.running -= uncounted
        progress.started -= uncounted
    pace.saw(outcomes)
    for index in alone:
        await _run_one(spec, progress, runner, partitions[index], requests[index], entries[index])


async def _run_one(
    spec: BackfillSpec, progress: _Progress, runner: Runner, partition: Any, request: RunRequest, ahead: Any
) -> Any:
    """Run one partition; its result, or the error it failed with."""
    progress.started += 1
    progress.running += 1
    try:
        outcome = await runner.run(request, ahead)
    except Exception as error:
        outcome = error
    finally:
        progress.running -= 1
    _count(spec, progress, partition, outcome)
    progress.announce_progress()
    return outcome


def _count(spec: BackfillSpec, progress: _Progress, partition: Any, outcome: Any) -> None:
    """Count a started partition's outcome: a run's result, or the error it failed with."""
    if isinstance(outcome, LeaseHeld):
        progress.started -= 1  # queued again, for after the feed
        progress.deferred.append(partition)
    elif isinstance(outcome, Exception):  # FlowstoneErrors, and anything a bug let through:
        # one partition's failure never stops the others or the runtime
        if not isinstance(outcome, FlowstoneError):
            log.error("backfill %s: partition %r failed unexpectedly", spec.id, partition, exc_info=outcome)
        progress.failed += 1
        if len(progress.errors) < MAX_ERRORS:
            progress.errors.append((serialize_partition(partition), str(outcome) or type(outcome).__name__))
    else:
        progress.succeeded += 1
