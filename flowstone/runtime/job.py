"""One materialization of one partition, run in the caller's task under a lease.

The job records the materialization, waits for approval when the asset asks for
it, loads its inputs, calls the user's function (retrying per its policy),
stores the value and records the outcome. A user error is a result: the record
says ``failed`` and the error travels back for ``__cause__``. Cancellation and
infrastructure failures are recorded too (``cancelled`` / ``failed``), shielded
and bounded, so no record is left ``running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

import anyio
import attrs
from anyio.abc import TaskStatus

from .. import events as ev
from ..actors.mailbox import CLEANUP_SECONDS, Handle
from ..context import Context
from ..definitions import Asset, executor_of
from ..errors import (
    ActorCrashed,
    AssetTimeout,
    DatabaseUnavailable,
    FlowstoneError,
    LeaseLost,
    NotFound,
    StorageError,
)
from ..io.memory import private_copy
from ..io.protocol import LoadsMany, returns_stored_object
from ..plumbing import threads
from ..plumbing.clock import utcnow
from ..plumbing.frozen import builder, tuple_maker
from ..plumbing.interrupts import internal
from ..store.leases import Lease, new_end, new_start
from ..store.records import ACTIVE, RUNNING, SUCCESS, Materialization, Status
from ..tenancy import current_tenant, tenant_scope
from . import tracing
from .executor import AwaitApproval, Env, JobResult, new_job_result
from .processes import run_in_process

__all__ = ["IO_CONFIG", "IO_KEY", "BatchWriter", "Job", "Read", "describe", "run_job", "run_jobs"]

IO_KEY = "flowstone.io_manager"
IO_CONFIG = "flowstone.io_config"
"""Record metadata saying where the value went, so any later reader finds it."""

T = TypeVar("T")


class Read:
    """One input: the records read and, when already in hand, their values. Slotted
    (as ``Job``): read several times a job, where a named tuple's field is not a
    specialized read."""

    __slots__ = ("all_partitions", "asset", "records", "values")

    def __init__(
        self, asset: str, records: tuple[Materialization, ...], all_partitions: bool,
        values: tuple[Any, ...] | None = None,
    ) -> None:
        self.asset, self.records, self.all_partitions, self.values = asset, records, all_partitions, values

    def __repr__(self) -> str:
        return f"Read({self.asset!r}, {len(self.records)} records, all_partitions={self.all_partitions})"


class Job:
    """One asset's partition to materialize in a run, with what it reads."""

    # Slotted, not a named tuple (ADR 0042's addendum): a job's fields are read ~25
    # times as it runs, and CPython 3.11 specializes the read of a slot but not of a
    # named tuple's field (~130 instructions more a read, valgrind).
    __slots__ = ("asset", "dependency_hash", "io_config", "io_key", "key", "marks_stale", "partition", "reads",
                 "run_id", "tenant", "unless_done")

    def __init__(
        self, asset: Asset, run_id: uuid.UUID, partition: Any, key: str | None, tenant: str | None,
        reads: tuple[Read, ...], dependency_hash: str, io_key: str, io_config: Mapping[str, Any], marks_stale: bool,
        unless_done: tuple[uuid.UUID | None, str] | None = None,
    ) -> None:
        self.asset, self.run_id, self.partition, self.key, self.tenant = asset, run_id, partition, key, tenant
        self.reads, self.dependency_hash, self.io_key, self.io_config = reads, dependency_hash, io_key, io_config
        self.marks_stale = marks_stale
        """Whether a success here should mark what was built on the previous one stale:
        there was a previous success and some asset of the graph reads this one."""
        self.unless_done = unless_done
        """(id of the success the run saw, dependency hash) when a success that another
        process finished since may be taken instead of computing; None to compute anyway."""

    def __repr__(self) -> str:
        return f"Job({self.asset.name!r}, {self.key!r}, run_id={self.run_id}, tenant={self.tenant!r})"


def run_job(job: Job, env: Env, executor: Handle) -> Awaitable[JobResult]:
    """Run ``job`` to a terminal record (await the answer). Raises only for
    cancellation, a broken runtime, ``LeaseHeld`` (another process computes this
    partition now) or ``FinishedElsewhere`` (it did already): nothing was recorded;
    or ``LeaseLost`` (another process took the work over: nothing more is written).
    Untraced, the job's own coroutine, with no coroutine of this function around it."""
    tracer = env.tracing.tracer() if env.tracing is not None else None
    if tracer is None:
        return _run_job(job, env, executor)
    return _traced_job(job, env, executor, tracer)


async def _traced_job(job: Job, env: Env, executor: Handle, tracer: Any) -> JobResult:
    # a flowstone.materialize span, a child of the run's
    with tracer.start_as_current_span(
        "flowstone.materialize",
        attributes=tracing.attributes(asset=job.asset.name, partition=job.key, tenant=job.tenant,
                                      run_id=str(job.run_id)),
    ) as span:
        result = await _run_job(job, env, executor)
        span.set_attribute("flowstone.status", result.record.status.value)
        span.set_attribute("flowstone.materialization_id", str(result.record.id))
        return result


async def _run_job(job: Job, env: Env, executor: Handle) -> JobResult:
    state = _State()
    try:
        if env.limiter is not None:
            async with env.limiter:
                return await _attempt(job, env, executor, state)
        return await _attempt(job, env, executor, state)
    except LeaseLost:
        raise
    except Exception as error:
        # Not the user's function (its errors are results): the store, an IO
        # manager or the runtime broke. Record it if we can, then report it.
        await _close(job, env, state, Status.FAILED, describe(error))
        if state.record is not None and state.record.status is Status.FAILED:
            return JobResult(state.record, error)
        raise
    except BaseException:
        # The runtime's cancellation, or Ctrl-C: stopped, not failed. (What the
        # function raises, BaseExceptions included, _attempt records as its failure.)
        await _close(job, env, state, Status.CANCELLED, "cancelled")
        raise
    finally:
        if state.lease is not None:
            env.leases.drop(state.lease)


@attrs.define
class _State:
    record: Materialization | None = None
    lease: Lease | None = None


Report = Callable[[int, "JobResult | Exception"], Awaitable[None]]
"""Told each job's outcome (by its index) as soon as it is known."""


async def run_jobs(jobs: Sequence[Job], env: Env, report: Report) -> None:
    """Run ``jobs`` one after another as a batch whose records begin in one store
    call (ADR 0032): for jobs that need no approval and that no tracer follows.
    Their last writes go in one call at the end, and every ``BATCH_SECONDS`` in
    between, so a job's end waits for no slow job after it. ``report`` hears each
    job's outcome once: its result, or what kept it from being recorded
    (``LeaseHeld``, ``FinishedElsewhere``, ``LeaseLost``, a store error). A
    cancellation records what was computed as computed (reported) and the rest as
    ``cancelled`` (not reported: those jobs stopped), then goes on."""
    if env.limiter is not None:
        async with env.limiter:
            await _Batch(jobs, env, report).run()
    else:
        await _Batch(jobs, env, report).run()


BATCH_SECONDS = 0.01
"""A batch keeps a computed job's last write waiting at most this long (see
``run_jobs``), and a backfill sizes its batches to compute in about this long
(ADR 0032): a record says ``running`` at most about this long before its function
starts, unless a partition before it in the batch turns out slow."""


class BatchWriter:
    """The runtime's one write-behind task for every batch (``run_jobs``): a batch
    that has computed ends waiting while it computes more is registered here, and
    ``BATCH_SECONDS`` after the first registration the task writes what each one
    registered has waiting (in that batch's tenant), and so on while any is.

    A task of each batch's own did that before, in a task group the batch left at
    its end: leaving it was a checkpoint, so every backfill worker's batch stayed
    alive until all of them had run, and the garbage collector's young passes,
    which that pile kept triggering, cost about a tenth of a partition's time."""

    __slots__ = ("batches", "stopped", "wake")

    def __init__(self) -> None:
        self.batches: dict[_Batch, None] = {}
        self.wake = anyio.Event()
        self.stopped = anyio.Event()

    def add(self, batch: _Batch) -> None:
        self.batches[batch] = None
        self.wake.set()

    @internal  # Ctrl-C goes to the caller's task, not into this loop
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.wake.wait()
            # Stopped while waiting (a runtime closing, this writer idle): return now.
            # Waiting on ``stopped`` when it is set is a checkpoint, where the
            # runtime's cancellation, right behind ``stop``, would land: a cancelled
            # task's exception holds its frames in a reference cycle.
            if not self.stopped.is_set():
                with anyio.move_on_after(BATCH_SECONDS):
                    await self.stopped.wait()
            if self.stopped.is_set():
                return
            self.wake = anyio.Event()
            async with anyio.create_task_group() as writes:  # each batch's store call at once
                for batch in list(self.batches):
                    if batch.claim():
                        writes.start_soon(batch.write_behind)
            if self.batches:  # still computing: write again in BATCH_SECONDS
                self.wake.set()

    def stop(self) -> None:
        """End ``run`` by returning, unless it is writing now (then its runtime's
        cancellation ends it): see ``open_runtime``. A batch still computing writes
        what it has itself when it is cancelled, as it would have had ``run`` been."""
        self.stopped.set()
        self.wake.set()


class _Batch:
    """One ``run_jobs`` call: the records begun, what was computed and not yet written."""

    __slots__ = ("behind_error", "computed", "computing", "current", "env", "jobs", "lost", "registered", "report",
                 "running", "tenant", "waiting", "written")

    def __init__(self, jobs: Sequence[Job], env: Env, report: Report) -> None:
        self.jobs, self.env, self.report = jobs, env, report
        self.tenant = current_tenant()
        self.running: dict[int, tuple[Materialization, Lease]] = {}
        self.computed: dict[int, _Computed] = {}
        self.waiting: list[int] = []
        """Computed, and not handed to the store yet."""
        self.lost: set[int] = set()
        """Taken over by another process while computing: nothing more is written."""
        self.computing = True
        self.registered = False
        """With the runtime's ``BatchWriter``, until the batch has computed every job."""
        self.written: anyio.Event | None = None
        """Set when the writer's write of this batch ends (while it writes: see ``_behind_done``)."""
        self.behind_error: Exception | None = None
        self.current: int | None = None
        """The job computing now."""

    async def run(self) -> None:
        env = self.env
        asked, now = env.leases.clock(), utcnow()
        begun = await env.store.begin_many(
            env.node, env.leases.seconds, [new_start((_start(job, env, now), job.unless_done)) for job in self.jobs])
        for index, got in enumerate(begun):
            if isinstance(got, Exception):
                await self.report(index, got)
                continue
            self.running[index] = got
            env.leases.hold(got[1], asked)
            if env.events.subscribers:
                _announce(env, got[0])
        try:
            try:
                last = len(self.running) - 1
                for at, (index, (record, lease)) in enumerate(self.running.items()):
                    self.current = index
                    try:
                        self.computed[index] = await _compute(self.jobs[index], env, record, lease)
                    except LeaseLost as lost:  # taken over: that process writes this partition now
                        self.lost.add(index)
                        await self.report(index, lost)
                        continue
                    self.waiting.append(index)
                    if at < last and not self.registered and env.writer is not None:
                        self.registered = True  # ends wait while the next jobs compute: written behind
                        env.writer.add(self)
            finally:
                self.computing = False
                if self.registered:
                    assert env.writer is not None
                    env.writer.batches.pop(self, None)
            await self._behind_done()
            if self.behind_error is not None:
                raise self.behind_error
            await self._write()
        except BaseException:
            # Cancelled (or the runtime broke): what was computed is recorded as it
            # came out, the rest as cancelled, shielded and bounded, as one job would.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
                await self._behind_done()
                for index, (record, _lease) in self.running.items():
                    if index not in self.computed and index not in self.lost:
                        message = "cancelled" if index == self.current else "cancelled before it started"
                        self.computed[index] = _Computed(
                            Status.CANCELLED, {"error_message": message, **_timing(record)})
                        self.waiting.append(index)
                await self._write()
            raise
        finally:
            for _record, lease in self.running.values():
                env.leases.drop(lease)

    def claim(self) -> bool:
        """Whether the writer is to write this batch's waiting ends now (then it
        must: ``write_behind``); the batch waits for that write before its own."""
        if not (self.computing and self.waiting) or self.written is not None:
            return False
        self.written = anyio.Event()
        return True

    async def write_behind(self) -> None:
        """The writer's write of the ends waiting, shielded, in the batch's tenant; an
        error is kept for the batch to raise once it has computed every job."""
        try:
            with anyio.CancelScope(shield=True), (
                tenant_scope(self.tenant) if self.tenant is not None else contextlib.nullcontext()
            ):
                await self._write()
        except Exception as error:
            self.behind_error = error
        finally:
            assert self.written is not None
            self.written.set()
            self.written = None

    async def _behind_done(self) -> None:
        """Wait for the writer's write of this batch, if it is writing now: the
        batch's own writes come after it, and its leases are dropped after both."""
        if self.written is not None:
            await self.written.wait()

    async def _write(self) -> None:
        """The last writes of the jobs computed and waiting, in one store call; then
        each job's end (``_ended``). A job whose write failed is recorded failed if
        it can be, as ``run_job`` does."""
        ending, self.waiting = self.waiting, []
        if not ending:
            return
        env, running, computed = self.env, self.running, self.computed
        for index in ending:
            env.leases.ending(running[index][1])
        written = await env.store.complete_many([
            new_end((running[index][0], computed[index].status, running[index][1], computed[index].fields))
            for index in ending
        ])
        for index, record in zip(ending, written, strict=True):
            job = self.jobs[index]
            outcome: JobResult | Exception
            if isinstance(record, LeaseLost):
                outcome = record
            elif isinstance(record, Exception):
                state = _State(*running[index])
                await _close(job, env, state, Status.FAILED, describe(record))
                failed = state.record is not None and state.record.status is Status.FAILED
                outcome = JobResult(state.record, record) if failed and state.record is not None else record
            else:
                try:
                    if job.marks_stale:
                        outcome = await _ended(job, env, record, computed[index])
                    else:
                        outcome = _ended_now(job, env, record, computed[index])
                except Exception as error:  # recorded; what follows the write failed (as run_job raises it)
                    outcome = error
                if record.status is Status.CANCELLED:
                    continue  # stopped, not ended: the cancellation goes on, as from run_job
            await self.report(index, outcome)


async def _close(job: Job, env: Env, state: _State, status: Status, message: str) -> None:
    record = state.record
    if record is None or record.status not in ACTIVE:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
        try:
            state.record = closed = await _last_write(
                env, record, status, state.lease, error_message=message, **_timing(record)
            )
            if env.events.subscribers:
                _announce(env, closed)
        except FlowstoneError as error:
            logging.getLogger("flowstone.runtime").error(
                "could not record %s as %s: %s", job.asset.name, status.value, error
            )


async def _attempt(job: Job, env: Env, executor: Handle, state: _State) -> JobResult:
    asset, store = job.asset, env.store
    asked = env.leases.clock()
    state.record, state.lease = record, lease = await store.begin(
        env.node, env.leases.seconds, unless_done=job.unless_done, **_start(job, env, utcnow())
    )
    env.leases.hold(lease, asked)
    if asset.requires_approval:
        approved, reason = await _wait_for_approval(record, executor, store)
        if not approved:
            state.record = record = await _last_write(
                env, record, Status.FAILED, lease, error_message=f"rejected: {reason or 'no reason given'}",
                **_timing(record),
            )
            if env.events.subscribers:
                _announce(env, record)
            return JobResult(record)
        state.record = record = await store.complete(record, Status.RUNNING, lease=lease, started_at=utcnow())
    if env.events.subscribers:
        _announce(env, record)
    computed = await _compute(job, env, record, lease)
    env.leases.ending(lease)  # _last_write, inline: one coroutine and one copy of the fields fewer a job
    state.record = record = await store.complete(record, computed.status, lease=lease, **computed.fields)
    if job.marks_stale:
        return await _ended(job, env, record, computed)
    return _ended_now(job, env, record, computed)  # without a coroutine: most jobs mark nothing stale


def _start(job: Job, env: Env, now: datetime) -> dict[str, Any]:
    """The fields of the record a job begins with, begun at ``now`` (one time for all
    the jobs of a batch: they begin in one write)."""
    # A loop, not comprehensions (a call each): most reads are of one record.
    lineage: dict[str, tuple[str | None, ...]] = {}
    for read in job.reads:
        records = read.records
        lineage[read.asset] = (records[0].partition,) if len(records) == 1 else tuple([m.partition for m in records])
    return {
        "asset_name": job.asset.name,
        "partition": job.key,
        "run_id": job.run_id,
        "status": Status.WAITING_APPROVAL if job.asset.requires_approval else RUNNING,
        "started_at": now,
        "upstream_assets": tuple(lineage),  # a run reads each input asset once
        "upstream_partitions": lineage,
        "dependency_hash": job.dependency_hash,
        "executor_node": _executor_node(env.node, job.asset.name),
    }


_context = builder(Context)
"""``Context(...)`` from its fields in order, made once for each job (see ``builder``)."""


class _Computed(NamedTuple):
    """What a job computed: the status and fields of its last write, and the value
    stored (a success) or the error (a failure)."""

    status: Status
    fields: dict[str, Any]
    value: Any = None
    error: BaseException | None = None


_new_computed = tuple_maker(_Computed)


async def _compute(job: Job, env: Env, record: Materialization, lease: Lease) -> _Computed:
    """Load the inputs, call the function, store the value. A failure of any of that
    is the job's result (``failed``); ``LeaseLost`` and the runtime's cancellation are
    raised."""
    asset = job.asset
    started = time.perf_counter()
    ctx = _context(  # Context's fields in order: asset, partition, its key, run, tenant, log, resources, metadata
        asset, job.partition, job.key, job.run_id, job.tenant, _asset_logger(asset.name),
        {name: env.resources[name] for name in asset.requires} if asset.requires else {}, {},
    )
    manager = env.io_managers[job.io_key]
    try:
        if asset.retry is None:  # the common case, without the retrying layers
            deps = _inputs_in_hand(job) if job.reads else {}
            if deps is None:
                deps = await _load_inputs(job, env)
            value = await _call(asset, ctx, deps, env, job)
            env.leases.check(lease)  # a process that took this partition over writes its value, not us
            await manager.store(asset.name, value, job.partition, job.io_config)
        else:
            deps = await _retry_transient(asset, ctx, "loading inputs", _load_inputs, job, env)
            value = await _call_with_retry(asset, ctx, deps, env, job)
            env.leases.check(lease)
            await _retry_transient(
                asset, ctx, "storing the value", manager.store, asset.name, value, job.partition, job.io_config
            )
    except LeaseLost:
        raise
    except BaseException as error:
        if stopped(error):
            raise
        return _Computed(Status.FAILED, {
            "error_message": describe(error), "error_traceback": traceback_of(error),
            "metadata": _io_metadata(ctx.metadata, job), **_timing(record, started),
        }, error=error)
    return _new_computed((SUCCESS, {
        "metadata": _io_metadata(ctx.metadata, job), "completed_at": utcnow(),
        "duration_ms": (time.perf_counter() - started) * 1000,
    }, value, None))  # _timing's fields, without its dict to merge; the value; no error


async def _ended(job: Job, env: Env, record: Materialization, computed: _Computed) -> JobResult:
    """What follows a job's last write: tell the watchers, log a failure, mark what
    was built on the previous success stale."""
    result = _ended_now(job, env, record, computed)
    if job.marks_stale and record.status is Status.SUCCESS:
        await env.store.mark_stale(job.asset.name, job.key)
    return result


def _ended_now(job: Job, env: Env, record: Materialization, computed: _Computed) -> JobResult:
    """``_ended`` without marking anything stale: a batch's jobs that mark nothing
    stale end here, without a coroutine each."""
    if computed.error is not None:
        _log_failure(record, computed.error)
    if env.events.subscribers:
        _announce(env, record)
    if record.status is not SUCCESS:
        return JobResult(record, computed.error)
    if returns_stored_object(env.io_managers[job.io_key]):
        return new_job_result((record, None, computed.value, True, False))  # the value, in hand; not reused
    return JobResult(record)


async def _last_write(
    env: Env, record: Materialization, status: Status, lease: Lease | None, **fields: Any
) -> Materialization:
    """The record's terminal write, which releases ``lease`` in the store; the lease
    keeper hears of it first, so a renewal that no longer finds the lease there is
    not taken for a takeover."""
    if lease is not None:
        env.leases.ending(lease)
    return await env.store.complete(record, status, lease=lease, **fields)


def _announce(env: Env, record: Materialization) -> None:
    """Tell the runtime's watchers what ``record`` says now: running (started),
    success, failed or cancelled. Callers check for watchers first."""
    fields: dict[str, Any] = {
        "at": utcnow(), "tenant": record.tenant_id, "run_id": record.run_id, "asset": record.asset_name,
        "partition": record.partition, "materialization_id": record.id,
    }
    event: ev.Event
    if record.status is Status.SUCCESS:
        event = ev.MaterializationSucceeded(**fields, duration_ms=record.duration_ms)
    elif record.status is Status.FAILED:
        event = ev.MaterializationFailed(**fields, error=record.error_message or "")
    elif record.status is Status.CANCELLED:
        event = ev.MaterializationCancelled(**fields)
    else:
        event = ev.MaterializationStarted(**fields)
    env.events.publish(event)


@functools.lru_cache(maxsize=4096)
def _asset_logger(name: str) -> logging.Logger:
    """The asset's logger (``logging`` keeps each for good; asking it took its lock a job)."""
    return logging.getLogger(f"flowstone.asset.{name}")


@functools.lru_cache(maxsize=4096)
def _executor_node(node: str, asset: str) -> str:
    """One string per executor, shared by all its records (not one per record)."""
    return f"{node}/executor:{asset}"


APPROVAL_POLL = 1.0
"""Seconds between two looks in the store for a decision made in another process."""


async def _wait_for_approval(record: Materialization, executor: Handle, store: Any) -> tuple[bool, str | None]:
    """The decision: from this process's runtime at once (through the executor), or
    from another process's, found in the store within ``APPROVAL_POLL`` seconds."""
    send, receive = anyio.create_memory_object_stream[tuple[bool, str | None]](1)
    with receive:
        try:
            await executor.cast(AwaitApproval(tenant=record.tenant_id, record_id=record.id, decisions=send))
        except BaseException:
            send.close()
            raise
        try:
            while True:
                with anyio.move_on_after(APPROVAL_POLL):
                    return await receive.receive()
                decided: tuple[bool, str | None] | None = await store.decision(record.id)
                if decided is not None:
                    return decided
        except anyio.EndOfStream:
            raise ActorCrashed(
                executor.name, detail="it restarted while this materialization waited for approval",
                asset=record.asset_name, partition=record.partition, tenant=record.tenant_id,
            ) from None


def _inputs_in_hand(job: Job) -> dict[str, Any] | None:
    """The inputs when every one was handed over in this run (a chain's, mostly):
    each reader's own copy, without loading; None when one must be loaded
    (``_load_inputs``). A plain function: no coroutine for a job that loads nothing."""
    reads = job.reads
    for read in reads:
        if read.values is None:
            return None  # before any copy: _load_inputs copies the rest
    deps: dict[str, Any] = {}
    for read in reads:
        values = read.values
        assert values is not None  # looked at above
        deps[read.asset] = _shaped(read, _copies(read, values))
    return deps


async def _load_inputs(job: Job, env: Env) -> dict[str, Any]:
    deps: dict[str, Any] = {}
    for read in job.reads:
        values = read.values
        if values is None and read.all_partitions and (many := await _load_many(read, env)) is not None:
            deps[read.asset] = many
            continue
        if values is None:
            values = tuple([await load_value(record, env) for record in read.records])
        else:
            values = _copies(read, values)
        deps[read.asset] = _shaped(read, values)
    return deps


def _copies(read: Read, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Values handed over in this run, not loaded: each reader still gets its own copy."""
    if len(values) == 1:
        return (private_copy(values[0], asset=read.asset),)
    return tuple([private_copy(v, asset=read.asset) for v in values])


def _shaped(read: Read, values: tuple[Any, ...]) -> Any:
    """What the function gets for ``read``: its one value, or a dict by partition."""
    if read.all_partitions:
        return {m.partition: v for m, v in zip(read.records, values, strict=True)}
    return values[0]


async def _load_many(read: Read, env: Env) -> Any:
    """Every partition through the manager's ``load_many`` (one call, concurrent loads,
    and for Parquet one dataset), when they were all stored by one manager with one
    configuration and it offers that; else ``None``."""
    if not read.records:
        return None
    first = read.records[0].metadata
    key, config = first.get(IO_KEY, env.default_io), first.get(IO_CONFIG, {})
    manager = env.io_managers.get(key)
    if not isinstance(manager, LoadsMany) or any(
        r.metadata.get(IO_KEY, env.default_io) != key or r.metadata.get(IO_CONFIG, {}) != config
        for r in read.records
    ):
        return None
    return await manager.load_many(read.asset, [r.partition for r in read.records], config)


async def load_value(record: Materialization, env: Env) -> Any:
    """Load the value a record points at, from the IO manager that stored it."""
    key = record.metadata.get(IO_KEY, env.default_io)
    manager = env.io_managers.get(key)
    if manager is None:
        raise NotFound(
            f"the IO manager {key!r} that stored this value is not configured in this runtime",
            asset=record.asset_name, partition=record.partition, tenant=record.tenant_id,
        )
    return await manager.load(record.asset_name, record.partition, record.metadata.get(IO_CONFIG, {}))


async def _call_with_retry(asset: Asset, ctx: Context, deps: dict[str, Any], env: Env, job: Job) -> Any:
    policy = asset.retry
    attempts = policy.max_attempts if policy is not None else 1
    for attempt in range(1, attempts + 1):
        try:
            return await _call(asset, ctx, deps, env, job)
        except BaseException as error:
            if attempt == attempts or stopped(error):
                raise
            assert policy is not None
            delay = policy.delay(attempt)
            ctx.log.warning("attempt %d/%d failed (%s); retrying in %.3fs", attempt, attempts, describe(error), delay)
            ctx.metadata["attempts"] = attempt + 1
            if delay > 0:
                await anyio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def stopped(error: BaseException) -> bool:
    """Whether ``error`` stops the work rather than fails it: a ``BaseException`` (a
    cancellation, a ``KeyboardInterrupt``) while the runtime is cancelling this task,
    or Ctrl-C itself. Anything else, ``BaseException`` subclasses included, is the
    function's failure: a cancellation exception a function raised with nobody
    cancelling it too."""
    return not isinstance(error, Exception) and (cancelling() or _from_ctrl_c(error))


def _from_ctrl_c(error: BaseException) -> bool:
    """A ``KeyboardInterrupt`` that trio delivered for Ctrl-C (its innermost frame is
    trio's signal handling, not the function's own ``raise``). asyncio turns Ctrl-C
    into a cancellation of the main task, which ``cancelling()`` sees."""
    if not isinstance(error, KeyboardInterrupt) or error.__traceback__ is None:
        return False
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("trio.")


def cancelling() -> bool:
    """Whether the current task is being cancelled: a cancelled scope encloses it (on
    either backend), or, on asyncio, something called ``task.cancel()`` on it."""
    deadline = anyio.current_effective_deadline()
    if deadline == -math.inf or deadline <= anyio.current_time():
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop: trio, where the deadline said it all
        return False
    return task is not None and task.cancelling() > 0


def is_transient(error: BaseException) -> bool:
    """A failure that may pass: unreachable storage or database, or one its adapter
    marked ``transient`` (the adapter knows its backend's codes; the runtime does not)."""
    if isinstance(error, DatabaseUnavailable):
        return True
    return isinstance(error, StorageError) and error.transient


async def _retry_transient(asset: Asset, ctx: Context, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``fn(*args)`` retried per the asset's retry policy while it fails transiently
    (storage unreachable, a server restarting); without a policy, or for any other
    error, the first failure stands. The value is not computed again."""
    policy = asset.retry
    attempts = policy.max_attempts if policy is not None else 1
    for attempt in range(1, attempts + 1):
        try:
            return await fn(*args)
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            assert policy is not None
            delay = policy.delay(attempt)
            ctx.log.warning(
                "%s failed (%s), attempt %d/%d; retrying in %.3fs", what, describe(error), attempt, attempts, delay
            )
            await anyio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _call(asset: Asset, ctx: Context, deps: dict[str, Any], env: Env, job: Job) -> Awaitable[Any]:
    """One call of the asset's function where its executor says, within its timeout.
    Without a timeout, an ``async def`` function's own coroutine: the caller awaits
    it with no frame of ours in between (each was a coroutine made and run a job)."""
    if asset.timeout is None:
        return _run_function(asset, ctx, deps, env, job)
    return _call_within_timeout(asset, asset.timeout, ctx, deps, env, job)


async def _call_within_timeout(
    asset: Asset, timeout: float, ctx: Context, deps: dict[str, Any], env: Env, job: Job
) -> Any:
    with anyio.move_on_after(timeout):
        return await _run_function(asset, ctx, deps, env, job)
    raise AssetTimeout(
        timeout, executor=executor_of(asset), asset=asset.name, partition=job.partition, tenant=job.tenant
    )


def _run_function(asset: Asset, ctx: Context, deps: dict[str, Any], env: Env, job: Job) -> Awaitable[Any]:
    fn = asset.execute_fn
    assert fn is not None
    executor = executor_of(asset)
    if executor == "async":
        awaitable: Awaitable[Any] = fn(ctx, deps)
        return awaitable
    return _run_elsewhere(fn, executor, asset, ctx, deps, env, job)


async def _run_elsewhere(
    fn: Callable[..., Any], executor: str, asset: Asset, ctx: Context, deps: dict[str, Any], env: Env, job: Job
) -> Any:
    """The function in a worker process or a thread."""
    if executor == "process":
        every_partition = frozenset(read.asset for read in job.reads if read.all_partitions)
        return await run_in_process(env.processes, asset, ctx, deps, every_partition)
    result = await threads.run_sync(fn, ctx, deps, limiter=env.thread_limiter)
    if inspect.isawaitable(result):  # a plain callable that returned a coroutine
        result = await result
    return result


def _timing(record: Materialization, started: float | None = None) -> dict[str, Any]:
    now = utcnow()
    if started is not None:
        duration: float | None = (time.perf_counter() - started) * 1000
    elif record.started_at is not None:
        duration = (now - record.started_at).total_seconds() * 1000
    else:
        duration = None
    return {"completed_at": now, "duration_ms": duration}


def _io_metadata(metadata: dict[str, Any], job: Job) -> Mapping[str, Any]:
    """A record's metadata: what the function added, and the IO manager (and its
    configuration) that holds the value."""
    if not metadata and not job.io_config:
        return _only_io(job.io_key)
    out: dict[str, Any] = {**metadata, IO_KEY: job.io_key} if metadata else {IO_KEY: job.io_key}
    if job.io_config:
        out[IO_CONFIG] = dict(job.io_config)
    return out


@functools.lru_cache(maxsize=256)
def _only_io(io_key: str) -> Mapping[str, Any]:
    """The metadata of records that say only which IO manager holds the value: one
    read-only mapping for all of them, which records keep as it is."""
    return MappingProxyType({IO_KEY: io_key})


TRACEBACK_LIMIT = 8_000
"""Characters of a failure's traceback kept on its record: its start (the frames,
outermost first) and its end (where it was raised, and the error)."""

_failures = logging.getLogger("flowstone.runtime")


def traceback_of(error: BaseException) -> str:
    """The error's traceback as text, at most ``TRACEBACK_LIMIT`` characters (and the
    five of the cut): the middle goes when it is longer."""
    text = "".join(traceback.format_exception(error))
    if len(text) <= TRACEBACK_LIMIT:
        return text
    half = TRACEBACK_LIMIT // 2
    return f"{text[:half]}\n...\n{text[-half:]}"


def _log_failure(record: Materialization, error: BaseException) -> None:
    """One WARNING on the ``flowstone`` logger hierarchy per failed materialization,
    naming the asset, partition, tenant and run (also as ``extra`` fields)."""
    _failures.warning(
        "materialization failed: %s [asset=%r, partition=%r, tenant=%r, run_id=%s]",
        record.error_message, record.asset_name, record.partition, record.tenant_id, record.run_id,
        extra={"asset": record.asset_name, "partition": record.partition, "tenant": record.tenant_id,
               "run_id": str(record.run_id)},
    )


def describe(error: BaseException) -> str:
    """``"ExcType: message"``, the form error messages are recorded in."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
