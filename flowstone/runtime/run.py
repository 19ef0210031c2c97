"""One run: plan a target partition, decide what to skip, execute the rest.

The coordinator runs in the caller's task. It plans from a registry snapshot
(which asset reads which partition), asks the guard about every planned asset
before anything runs (so a denial leaves no record), fetches every "latest
success" it needs in one store round trip, then runs the plan as a dataflow:
one task per asset, each waiting for its inputs, so independent branches run
concurrently and a failure stops only what depends on it.

Mappings between partitioned assets are those of ADR 0002; the run-level
decisions (what ``upstream=`` and ``force=`` mean, what is skipped) are ADR 0005.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import anyio
import attrs

from .. import events as ev
from ..actors.mailbox import CLEANUP_SECONDS, PendingCall, Reply
from ..definitions import Asset, FieldError
from ..errors import DefinitionError, FlowstoneError, InvalidPartition, MaterializationFailed, NotFound, RuntimeClosed
from ..guards import Guard, authorize
from ..partitions import serialize_partition
from ..plumbing.clock import utcnow
from ..plumbing.frozen import builder, tuple_maker
from ..plumbing.ids import new_uuid
from ..store.leases import FinishedElsewhere, LeaseHeld
from ..store.records import SUCCESS, Materialization, Status
from . import tracing
from .executor import Detach, Env, Finished, Granted, JobResult, Lease, ask, finish, lease_now
from .hashing import dependency_hash
from .job import Job, Read, describe, run_job, run_jobs
from .registry import Snapshot

__all__ = ["RunRequest", "RunResult", "execute_run"]

log = logging.getLogger("flowstone.runtime")

UPSTREAM_MODES = ("missing", "none", "all")


@attrs.frozen(weakref_slot=False)  # built by a builder (see flowstone.plumbing.frozen)
class RunResult:
    """What one ``materialize`` produced or reused, by asset name."""

    run_id: uuid.UUID
    materializations: Mapping[str, Materialization]
    skipped: tuple[str, ...] = ()


_run_result_of = builder(RunResult)
"""``RunResult``: run id, materializations, skipped; a backfill makes one a partition (see ``builder``)."""


class RunRequest(NamedTuple):
    """What to run (``materialize``'s arguments, or one of a backfill's partitions)."""

    target: str
    partition: Any = None
    upstream: str = "missing"
    force: bool = False
    io: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    defer_held: bool = False
    """Raise ``LeaseHeld`` instead of waiting when another process computes one of
    this run's partitions (a backfill does other partitions first)."""


class _Input:
    """What a node reads from one upstream asset: ``kind`` is "node" (planned in this
    run), "latest" (read as stored) or "all" (every partition). Slotted, as ``_Node``."""

    __slots__ = ("asset", "key", "kind")

    def __init__(self, asset: str, key: str | None, kind: str) -> None:
        self.asset, self.key, self.kind = asset, key, kind

    def __repr__(self) -> str:
        return f"_Input({self.asset!r}, {self.key!r}, {self.kind!r})"


class _Node:
    """One asset of a run's plan: the asset, its partition (value and key), what it reads."""

    # Slotted, not a named tuple: a chain's asset reads its node's fields ~30 times,
    # and CPython 3.11 specializes the read of a slot but not of a named tuple's field
    # (a descriptor of its own kind, read through the generic lookup: ~130
    # instructions more a read, counted with valgrind).
    __slots__ = ("asset", "inputs", "key", "partition")

    def __init__(self, asset: Asset, partition: Any, key: str | None, inputs: tuple[_Input, ...]) -> None:
        self.asset, self.partition, self.key, self.inputs = asset, partition, key, inputs

    def __repr__(self) -> str:
        return f"_Node({self.asset.name!r}, {self.key!r}, inputs={self.inputs!r})"


class _Ready:
    """``run_all``'s queue: nodes whose inputs are done, what each node still waits
    for, who reads each node, and how many spare workers are waiting to start."""

    __slots__ = ("readers", "ready", "spare", "waiting")

    def __init__(self, ready: deque[_Node], waiting: dict[str, int], readers: dict[str, list[_Node]]) -> None:
        self.ready, self.waiting, self.readers = ready, waiting, readers
        self.spare = 0


class _Outcome(NamedTuple):
    """What came of one asset of a run: a ``JobResult``'s fields, in its order."""

    record: Materialization | None = None
    error: BaseException | None = None
    value: Any = None
    has_value: bool = False
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.record is not None and self.record.status is SUCCESS


_outcome_of: Callable[[JobResult], _Outcome] = tuple_maker(_Outcome)
"""The outcome of a job's result: the same fields, copied in one step (no keywords
for a named tuple to unpack, on every job's path)."""
new_request = tuple_maker(RunRequest)
"""A ``RunRequest`` from every field in order: a backfill makes one a partition."""


def check_request(request: RunRequest, io_keys: Mapping[str, Any]) -> None:
    """Argument checks that need no snapshot; bad arguments are DefinitionErrors."""
    problems = []
    if request.upstream not in UPSTREAM_MODES:
        problems.append(FieldError("upstream", f"must be one of {UPSTREAM_MODES}, got {request.upstream!r}"))
    if not isinstance(request.force, bool):
        problems.append(FieldError("force", f"must be a bool, got {request.force!r}"))
    if request.context is not None and not isinstance(request.context, Mapping):
        problems.append(FieldError("context", f"must be a mapping, got {request.context!r}"))
    io = request.io
    if io is not None:
        if not isinstance(io, Mapping) or not isinstance(io.get("io_manager"), str):
            problems.append(FieldError("io", 'must look like {"io_manager": key, "config": {...}}'))
        elif io["io_manager"] not in io_keys:
            problems.append(FieldError("io", f"unknown IO manager {io['io_manager']!r}; known: {sorted(io_keys)}"))
        elif not isinstance(io.get("config", {}), Mapping):
            problems.append(FieldError("io", "config must be a mapping"))
    if problems:
        raise DefinitionError(problems, asset=request.target)


def carries_partitions(graph: Any, name: str) -> bool:
    """Whether ``name`` is partitioned or reads a partitioned asset, directly or not."""
    if graph.get(name).partitioned_by is not None:
        return True
    return any(graph.get(dep).partitioned_by is not None for dep in graph.dependencies(name))


def target_partition(asset: Asset, partition: Any, *, carries: bool = False) -> Any:
    """The canonical partition value for ``asset``, or InvalidPartition saying why not.

    An unpartitioned asset that reads partitioned ones (``carries``) takes any
    partition: it flows to what the asset reads, which checks it (ADR 0002).
    """
    if asset.partitioned_by is None:
        if partition is None:
            return None
        if carries:
            serialize_partition(partition)  # a value that has a key, at least
            return partition
        raise InvalidPartition(
            "asset is not partitioned and reads nothing partitioned; call it without partition=",
            asset=asset.name, partition=partition,
        )
    if partition is None:
        raise InvalidPartition(
            f"asset is partitioned ({type(asset.partitioned_by).__name__}); pass partition=",
            asset=asset.name,
        )
    try:
        return asset.partitioned_by.validate(partition)
    except InvalidPartition as error:
        raise InvalidPartition(error.message, asset=asset.name, partition=partition) from None


def plan(snapshot: Snapshot, request: RunRequest) -> list[_Node]:
    """The assets this run computes (dependencies first) and what each one reads.

    A partition flows from the target to what it reads: a partitioned upstream
    asset reads the same partition, as does an unpartitioned one that itself
    reads partitioned assets; other unpartitioned assets are read whole. An
    asset computed without a partition reads every existing partition of a
    partitioned upstream asset.
    """
    return Planner(snapshot, request.target).plan(request)


class Planner:
    """``plan`` for any number of requests of one target (a backfill's partitions):
    the graph's part (the order, each asset, which carry a partition) is looked up
    once, and each request only maps its partition through it."""

    __slots__ = ("assets", "carries", "order", "root")

    def __init__(self, snapshot: Snapshot, target: str) -> None:
        graph = snapshot.graph
        self.root = root = graph.get(target)
        self.order = order = graph.execution_order(root.name)
        self.assets: dict[str, Asset] = graph.named(order)
        self.carries: dict[str, bool] = {}
        for name in order:  # dependencies first: whether each carries a partition is known
            asset = self.assets[name]
            carries = asset.partitioned_by is not None
            for dep in asset.depends_on:
                carries = carries or self.carries[dep]
            self.carries[name] = carries

    def plan(self, request: RunRequest, *, checked: bool = False) -> list[_Node]:
        """``plan(snapshot, request)``; ``checked``: the request's partition is already
        the root's canonical partition (``target_partition`` made it, against the same
        graph), so it is not checked again."""
        root, assets, carries = self.root, self.assets, self.carries
        value = request.partition if checked else target_partition(
            root, request.partition, carries=carries[root.name])
        partitions: dict[str, Any] = {root.name: value}
        nodes: dict[str, _Node] = {}
        for name in reversed(self.order):
            if name not in partitions:
                continue  # only read through an all-partitions input
            asset = assets[name]
            value = partitions[name]
            inputs = []
            for dep_name in asset.depends_on:
                dep = assets[dep_name]
                if value is None and dep.partitioned_by is not None:
                    inputs.append(_Input(dep_name, None, "all"))
                    continue
                if dep.partitioned_by is not None:
                    dep_value = target_partition(dep, value)
                else:
                    dep_value = value if carries[dep_name] else None
                dep_key = None if dep_value is None else serialize_partition(dep_value)
                if request.upstream == "none":
                    inputs.append(_Input(dep_name, dep_key, "latest"))
                else:
                    partitions[dep_name] = dep_value
                    inputs.append(_Input(dep_name, dep_key, "node"))
            key = None if value is None else serialize_partition(value)
            nodes[name] = _Node(asset, value, key, tuple(inputs))
        if len(nodes) == 1:  # a root asset's partition (a backfill plans one a partition)
            return list(nodes.values())
        return [nodes[name] for name in self.order if name in nodes]


def lookup_pairs(nodes: list[_Node]) -> list[tuple[str, str | None]]:
    """The (asset, partition key) pairs whose latest success a run must know."""
    # Loops, not comprehensions: each comprehension is a call of its own (CPython
    # 3.11), and a backfill asks this twice a partition, mostly of one node.
    pairs = []
    for node in nodes:
        pairs.append((node.asset.name, node.key))
        for read in node.inputs:
            if read.kind == "latest":
                pairs.append((read.asset, read.key))
    return pairs


@attrs.frozen
class Prefetched:
    """Latest successes fetched ahead for several runs (a backfill's chunk):
    ``asked`` is every pair looked up, ``found`` those that have one.

    Only pairs that a single run of the chunk reads may be prefetched: a pair
    several runs share (an unpartitioned upstream asset) can be materialized by
    the first of them, and the others must see that, so they look it up fresh.
    """

    asked: frozenset[tuple[str, str | None]]
    found: Mapping[tuple[str, str | None], Materialization]


async def execute_run(
    snapshot: Snapshot,
    env: Env,
    guard: Guard | None,
    request: RunRequest,
    tenant: str | None,
    run_id: uuid.UUID | None = None,
    *,
    nodes: list[_Node] | None = None,
    prefetched: Prefetched | None = None,
) -> RunResult:
    """Run ``request`` to the end; raise MaterializationFailed if any asset failed.

    ``nodes`` is the plan when the caller made it already; ``prefetched`` saves
    the store round trip for the pairs it covers.
    """
    tracer = env.tracing.tracer() if env.tracing is not None else None
    run_id = run_id or new_uuid()
    if tracer is None:
        return await _execute_run(snapshot, env, guard, request, tenant, run_id, nodes, prefetched)
    with tracer.start_as_current_span(
        "flowstone.run",
        attributes=tracing.attributes(asset=request.target, partition=serialize_partition(request.partition),
                                      tenant=tenant, run_id=str(run_id)),
    ) as span:
        try:
            result = await _execute_run(snapshot, env, guard, request, tenant, run_id, nodes, prefetched)
        except MaterializationFailed:
            span.set_attribute("flowstone.status", "failed")
            raise
        span.set_attribute("flowstone.status", "success")
        return result


async def _execute_run(
    snapshot: Snapshot, env: Env, guard: Guard | None, request: RunRequest, tenant: str | None, run_id: uuid.UUID,
    nodes: list[_Node] | None, prefetched: Prefetched | None,
) -> RunResult:
    nodes = plan(snapshot, request) if nodes is None else nodes
    if guard is not None:
        await _authorize(snapshot, guard, nodes, {**(request.context or {}), "tenant": tenant})

    store = env.store
    pairs = lookup_pairs(nodes)
    if prefetched is None:
        latest: Mapping[tuple[str, str | None], Materialization] = await store.latest_successes(pairs)
    else:
        fresh = [pair for pair in pairs if pair not in prefetched.asked]
        latest = {pair: prefetched.found[pair] for pair in pairs if pair in prefetched.found}
        if fresh:
            latest.update(await store.latest_successes(fresh))
    every: dict[str, dict[str | None, Materialization]] = {}
    for node in nodes:
        for read in node.inputs:
            if read.kind == "all" and read.asset not in every:
                every[read.asset] = await store.partitions_of(read.asset)
            elif read.kind == "latest" and (read.asset, read.key) not in latest:
                raise _never_materialized(read, tenant)

    run = _Run(nodes, snapshot, env, request, run_id, tenant, latest, every)
    await run.execute()
    outcomes = run.outcomes
    if env.events.subscribers:
        now = utcnow()
        for node in nodes:
            outcome = outcomes[node.asset.name]
            if outcome.reused and outcome.record is not None:
                env.events.publish(ev.MaterializationSkipped(
                    at=now, tenant=tenant, run_id=run_id, asset=node.asset.name, partition=node.key,
                    materialization_id=outcome.record.id,
                ))

    result = RunResult(
        run_id=run_id,
        materializations={name: o.record for name, o in outcomes.items() if o.record is not None},
        skipped=tuple(n.asset.name for n in nodes if outcomes[n.asset.name].reused),
    )
    for node in nodes:
        outcome = outcomes[node.asset.name]
        if outcome.record is None and outcome.error is not None:
            raise outcome.error  # the runtime failed (actor crashed, closed), not the asset
    for node in nodes:
        outcome = outcomes[node.asset.name]
        if not outcome.ok and outcome.record is not None:
            record = outcome.record
            failed = MaterializationFailed(
                node.asset.name, record.partition, result, tenant=tenant, error=record.error_message
            )
            raise failed from outcome.error
    return result


def make_job(
    snapshot: Snapshot, env: Env, request: RunRequest, node: _Node, reads: list[Read], digest: str,
    run_id: uuid.UUID, tenant: str | None, previous: Materialization | None, may_reuse: bool,
) -> Job:
    """The job of ``node`` in a run of ``request``; ``previous`` is the partition's
    latest success, if any; ``may_reuse``: whether a success with the same hash that
    another process finishes meanwhile may be taken instead of computing."""
    name = node.asset.name
    if name == request.target and request.io is not None:
        io_key, io_config = request.io["io_manager"], request.io.get("config", {})
    else:
        io_key, io_config = node.asset.io_manager or env.default_io, node.asset.io_config
    return Job(  # every field, in its order
        node.asset, run_id, node.partition, node.key, tenant, tuple(reads), digest, io_key, io_config,
        # marks_stale: nothing in the graph reads a leaf, so nothing can be built on
        # its old value here (records of other pipelines sharing the store are still
        # rebuilt when they run: their dependency hash names the old record).
        previous is not None and snapshot.graph.has_readers(name),
        # unless_done
        (previous.id if previous is not None else None, digest) if may_reuse else None,
    )


def hand_back(executor: Any, tenant: str | None, key: str | None) -> Any:
    """What tells ``executor`` that a run will not use its answer for ``key``: a
    lease that came is handed back, a wait is withdrawn."""

    async def give_back(waiter: Reply, late: Any) -> None:
        try:
            if late is not None and isinstance(late.value, Lease):
                await executor.cast(Finished(tenant=tenant, key=key, token=late.value.token, result=None))
            else:
                await executor.cast(Detach(tenant=tenant, key=key, waiter=waiter))
        except RuntimeClosed:
            waiter.close()  # the executor is gone; nothing to tell it

    return give_back


async def hand_over(executor: Any, job: Job, lease: Lease, result: JobResult | None) -> None:
    """Give ``executor`` its lease back with the job's result (None: it did not end)."""
    finished = handed_over(executor, job, lease, result)
    if finished is not None:
        await deliver(executor, finished)


async def deliver(executor: Any, finished: Finished) -> None:
    """Cast ``finished`` to an executor whose mailbox was full: wait, even if cancelled."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
        try:
            await executor.cast(finished)
        except RuntimeClosed:
            pass  # the runtime closed under us: no lease left to hand back


def handed_over(executor: Any, job: Job, lease: Lease, result: JobResult | None) -> Finished | None:
    """``hand_over`` without waiting: None once done, else the message to cast
    (the executor's mailbox was full)."""
    try:
        return finish(executor, job.tenant, job.key, lease.token, result)
    except RuntimeClosed:
        return None  # the runtime closed under us: no lease left to hand back


def batchable(nodes: list[_Node]) -> bool:
    """Whether a plan may run in a batch (``execute_batch``): one asset (a root, or
    ``upstream="none"``) that waits for no approval and reads no partition it does
    not have stored. A plan of several assets runs alone: its batch would compute
    every partition's first asset before any partition's second, so one slow
    partition would hold back the whole batch's runs (ADR 0032). Unless only its
    last asset runs (``collapsed``)."""
    return (
        len(nodes) == 1
        and not nodes[0].asset.requires_approval
        and all(read.kind == "latest" for read in nodes[0].inputs)
    )


def collapsible(nodes: list[_Node]) -> bool:
    """Whether a plan of several assets may run in a batch should its upstream assets
    all turn out up to date (``collapsed``): none waits for approval, and none reads
    every partition of an asset."""
    return len(nodes) > 1 and all(
        not node.asset.requires_approval and all(read.kind != "all" for read in node.inputs) for node in nodes)


def collapsed(run: _Run) -> bool:
    """Make ``run`` a run of its last asset alone, reading its upstream assets as
    stored, when the stored successes (``run.latest``) say that at most that asset
    must run: every other is reused, as ``execute_run`` would decide. The reused ones
    stay in ``run.outcomes`` for its result. A downstream asset's backfill (the
    default ``upstream="missing"``) then runs in batches, not a partition at a time."""
    running = run.decide()
    target = run.nodes[-1]
    if not running <= {target.asset.name}:
        return False
    reused = {node.asset.name: _Outcome(record=run.latest[(node.asset.name, node.key)], reused=True)
              for node in run.nodes[:-1]}
    inputs = tuple(_Input(read.asset, read.key, "latest") if read.kind == "node" else read for read in target.inputs)
    run.nodes = [_Node(target.asset, target.partition, target.key, inputs)]
    run.outcomes.update(reused)
    return True


async def execute_batch(
    snapshot: Snapshot, env: Env, guard: Guard | None, requests: Sequence[RunRequest], plans: Sequence[list[_Node]],
    tenant: str | None, prefetched: Prefetched, report: Callable[[int, RunResult | Exception], None],
) -> list[int]:
    """Run the ``batchable`` plans of a backfill's chunk together (ADR 0032): each
    decided (skip or compute) as ``execute_run`` decides, those to compute as one
    batch of jobs (``run_jobs``). Each request stays its own run, and ``report``
    hears its outcome (by index) as soon as it is known: its result, or the error
    ``execute_run`` would raise. Answers the requests to run on their own instead
    (``execute_run``): plans that are not ``batchable`` or are of another asset than
    the first, several of one partition, and those whose partition another run in
    this process holds."""
    asset = None
    keys = [(nodes[-1].asset.name, nodes[-1].key) for nodes in plans]
    shared = Counter(keys) if len(set(keys)) < len(keys) else None  # usually every key once
    runs: dict[int, _Run] = {}
    alone: list[int] = []
    several: list[int] = []  # plans of several assets, batched if only their last one runs (collapsed)
    for index, nodes in enumerate(plans):
        fits = batchable(nodes) or collapsible(nodes)
        if asset is None and fits:
            asset = nodes[-1].asset.name
        if not fits or nodes[-1].asset.name != asset or (shared and shared[keys[index]] > 1):
            alone.append(index)
        else:
            runs[index] = _Run(nodes, snapshot, env, requests[index], new_uuid(), tenant, {}, {})
            if len(nodes) > 1:
                several.append(index)
    if not runs:
        return alone
    if guard is not None:  # the same assets and context for every request
        first = next(iter(runs.values()))
        try:
            await _authorize(snapshot, guard, first.nodes, {**(first.request.context or {}), "tenant": tenant})
        except FlowstoneError as error:
            for index in runs:
                report(index, error)
            return alone
    pairs = {pair for run in runs.values() for pair in lookup_pairs(run.nodes)}
    latest = {pair: prefetched.found[pair] for pair in pairs if pair in prefetched.found}
    fresh = [pair for pair in pairs if pair not in prefetched.asked]
    if fresh:
        latest.update(await env.store.latest_successes(fresh))
    for index, run in list(runs.items()):
        run.latest = latest
        missing = _missing_input(run)
        if missing is not None:
            del runs[index]
            report(index, missing)
    for index in several:
        if index in runs and not collapsed(runs[index]):  # an upstream asset must run: the whole plan, alone
            del runs[index]
            alone.append(index)
    await _execute_together(snapshot, env, tenant, runs, alone, report)
    return sorted(alone)


def _missing_input(run: _Run) -> NotFound | None:
    """What ``execute_run`` raises before anything runs when an input read as stored
    has no success."""
    for node in run.nodes:
        for read in node.inputs:
            if read.kind == "latest" and (read.asset, read.key) not in run.latest:
                return _never_materialized(read, run.tenant)
    return None


def _never_materialized(read: _Input, tenant: str | None) -> NotFound:
    return NotFound(
        "upstream has no successful materialization to read; materialize it first or use upstream='missing'",
        asset=read.asset, partition=read.key, tenant=tenant,
    )


async def _execute_together(
    snapshot: Snapshot, env: Env, tenant: str | None, runs: dict[int, _Run], alone: list[int],
    report: Callable[[int, RunResult | Exception], None],
) -> None:
    """Decide the asset of each one-asset run, and compute those that must run as
    one batch; a run whose partition another run here holds goes to ``alone``. Each
    run is reported as soon as it is done."""
    jobs: list[Job] = []
    leases: list[Lease | None] = []
    owners: list[int] = []
    executor: Any = None  # the asset's (every run here is of one asset: ``execute_batch``)

    def done(index: int) -> None:
        run = runs.pop(index)
        report(index, run.stopped if run.stopped is not None else _run_result(env, run))

    for index, run in list(runs.items()):
        node = run.nodes[0]
        name = node.asset.name
        reads = run.reads(node, run.outcomes)
        assert reads is not None, "a batchable plan reads only what is stored, and _missing_input checked it"
        digest = run.digests.get(name) or run.digest(node, reads)  # a collapsed run's decide() made it
        previous = run.reusable(node, digest)
        if previous is not None:
            run.outcomes[name] = _Outcome(record=previous, reused=True)
            done(index)
            continue
        if executor is None:
            executor = snapshot.executors[name]
        lease = lease_now(executor, tenant, node.key)
        if lease is None:  # another run here computes it, or the gate is down: ask
            pending = await ask(executor, tenant, node.key)
            answer = await pending.result() if pending.ready else None
            if not isinstance(answer, Lease):  # another run here computes it: this run follows, alone
                await pending.abandon(hand_back(executor, tenant, node.key))
                del runs[index]
                alone.append(index)
                continue
            lease = answer
        jobs.append(make_job(snapshot, env, run.request, node, reads, digest, run.run_id, tenant,
                             run.latest.get((name, node.key)), run.may_reuse(name)))
        leases.append(lease)
        owners.append(index)

    async def ended(at: int, result: JobResult | Exception) -> None:
        job, lease, index = jobs[at], leases[at], owners[at]
        if isinstance(result, FinishedElsewhere):  # another process finished it since we looked: take it
            result = JobResult(result.record, reused=True)  # type: ignore[arg-type]
        if lease is not None:
            leases[at] = None
            finished = handed_over(executor, job, lease, result if isinstance(result, JobResult) else None)
            if finished is not None:
                await deliver(executor, finished)
        runs[index].settle(job, result)
        done(index)

    try:
        if jobs:
            await run_jobs(jobs, env, ended)
    finally:
        for job, lease in zip(jobs, leases, strict=True):
            if lease is not None:  # the batch stopped before this job's end
                await hand_over(executor, job, lease, None)


def _run_result(env: Env, run: _Run) -> RunResult | Exception:
    """What ``execute_run`` ends with, once the one asset of ``run`` is done (and
    the upstream assets it reused, when it was ``collapsed``)."""
    name = run.nodes[0].asset.name
    outcome = run.outcomes[name]
    record = outcome.record
    if record is None:  # the runtime failed (actor crashed, closed), not the asset
        assert isinstance(outcome.error, Exception), "a one-asset run ends with a record or an error"
        return outcome.error
    if len(run.outcomes) == 1:
        if outcome.reused and env.events.subscribers:
            env.events.publish(ev.MaterializationSkipped(
                at=utcnow(), tenant=run.tenant, run_id=run.run_id, asset=name, partition=run.nodes[0].key,
                materialization_id=record.id,
            ))
        result = _run_result_of(run.run_id, {name: record}, (name,) if outcome.reused else ())
    else:
        outcomes = {**{other: o for other, o in run.outcomes.items() if other != name}, name: outcome}
        if env.events.subscribers:
            for other, done in outcomes.items():
                if done.reused and done.record is not None:
                    env.events.publish(ev.MaterializationSkipped(
                        at=utcnow(), tenant=run.tenant, run_id=run.run_id, asset=other,
                        partition=done.record.partition, materialization_id=done.record.id,
                    ))
        result = RunResult(
            run_id=run.run_id, materializations={other: o.record for other, o in outcomes.items() if o.record},
            skipped=tuple(other for other, o in outcomes.items() if o.reused))
    if record.status is Status.SUCCESS:
        return result
    failed = MaterializationFailed(name, record.partition, result, tenant=run.tenant, error=record.error_message)
    failed.__cause__ = outcome.error
    return failed


async def _authorize(snapshot: Snapshot, guard: Guard, nodes: list[_Node], context: dict[str, Any]) -> None:
    checked: set[tuple[str, str]] = set()
    for node in nodes:
        for action, name in [("materialize", node.asset.name), *(("access", i.asset) for i in node.inputs)]:
            if (action, name) not in checked:
                checked.add((action, name))
                await authorize(guard, action, snapshot.graph.get(name), context)  # type: ignore[arg-type]


class _Run:
    """The execution of one plan: what to run, leases, and each asset's outcome.

    Which assets must run is decided before any of them runs (an asset whose
    inputs are all reused keeps its result when its dependency hash matches; an
    asset reading one that runs must run too). Leases for all of them are then
    requested at once, from the executors' gates directly (an answer at once, no
    event-loop turn, when the partition is free), and an asset whose inputs are
    done runs straight away on its lease. A chain of fast assets then runs without
    yielding at all, and the store applies its writes in one batch. Requesting
    leases early cannot deadlock: a lease only waits for its own asset's inputs,
    and inputs never need a reader's slot.
    """

    __slots__ = ("digests", "env", "every", "latest", "leases", "nodes", "outcomes", "request", "run_id", "snapshot",
                 "stopped", "tenant")

    def __init__(
        self,
        nodes: list[_Node],
        snapshot: Snapshot,
        env: Env,
        request: RunRequest,
        run_id: uuid.UUID,
        tenant: str | None,
        latest: Mapping[tuple[str, str | None], Materialization],
        every: Mapping[str, Mapping[str | None, Materialization]],
    ) -> None:
        self.nodes = nodes
        self.snapshot = snapshot
        self.env = env
        self.request = request
        self.run_id = run_id
        self.tenant = tenant
        self.latest = latest
        self.every = every
        self.outcomes: dict[str, _Outcome] = {}
        self.leases: dict[str, PendingCall | Lease] = {}
        """Each node's answer from its executor: a lease granted at once, or the call to wait on."""
        self.digests: dict[str, str] = {}
        self.stopped: LeaseHeld | None = None
        """In a batch: another process computes one of this run's partitions now, so
        the run stops there and its backfill runs it again later."""

    # ------------------------------------------------------------ deciding

    def reads(self, node: _Node, outcomes: Mapping[str, _Outcome]) -> list[Read] | None:
        """The inputs of ``node`` given upstream outcomes; None if one failed or is unknown."""
        reads = []
        for read in node.inputs:
            values = None
            if read.kind == "node":
                upstream = outcomes.get(read.asset)
                if upstream is None:
                    return None
                record = upstream.record
                if record is None or record.status is not SUCCESS:  # not upstream.ok (inline: a call)
                    return None
                records: tuple[Materialization, ...] = (record,)
                if upstream.has_value:
                    values = (upstream.value,)
            elif read.kind == "latest":
                records = (self.latest[(read.asset, read.key)],)
            else:
                records = tuple(r for _k, r in sorted(self.every[read.asset].items(), key=lambda kv: str(kv[0])))
            reads.append(Read(read.asset, records, read.kind == "all", values))
        return reads

    def digest(self, node: _Node, reads: list[Read]) -> str:
        upstream: dict[str, list[uuid.UUID]] = {}
        for read in reads:  # a loop, not comprehensions (a call each): mostly one record a read
            records = read.records
            upstream[read.asset] = [records[0].id] if len(records) == 1 else [m.id for m in records]
        return dependency_hash(self.snapshot.versions[node.asset.name], node.key, upstream)

    def may_reuse(self, name: str) -> bool:
        """False when the request says ``name`` must run whatever is stored."""
        is_target = name == self.request.target
        return not ((self.request.force and is_target) or (self.request.upstream == "all" and not is_target))

    def reusable(self, node: _Node, digest: str) -> Materialization | None:
        """The latest success to reuse instead of running ``node``, if any."""
        name = node.asset.name
        previous = self.latest.get((name, node.key))
        if (
            not self.may_reuse(name)
            or previous is None
            or previous.status is not Status.SUCCESS
            or previous.dependency_hash != digest
        ):
            return None
        return previous

    def decide(self) -> set[str]:
        """The assets that will run (unless an input fails): the same rule as
        ``run_node`` applies, evaluated before anything runs."""
        known: dict[str, _Outcome] = {}
        running: set[str] = set()
        for node in self.nodes:
            reads = self.reads(node, known)
            if reads is not None:
                # Inputs already known here are the ones run_node will see: keep the hash.
                digest = self.digests[node.asset.name] = self.digest(node, reads)
                previous = self.reusable(node, digest)
                if previous is not None:
                    known[node.asset.name] = _Outcome(record=previous, reused=True)
                    continue
            running.add(node.asset.name)
        return running

    # ------------------------------------------------------------ running

    async def execute(self) -> None:
        running = self.decide()
        try:
            for node in self.nodes:
                if node.asset.name in running:
                    # submit(), inline: the gate's lease when it grants one at once (a
                    # chain's every asset), without a coroutine and a Granted to hold it.
                    executor = self.snapshot.executors[node.asset.name]
                    lease = lease_now(executor, self.tenant, node.key)
                    self.leases[node.asset.name] = (
                        lease if lease is not None else await ask(executor, self.tenant, node.key))
            await self.run_all()
        finally:
            for name, pending in self.leases.items():  # inputs failed, or we were cancelled
                if isinstance(pending, Lease):
                    pending = Granted(self.snapshot.executors[name].name, pending)
                await pending.abandon(self.hand_back(name))
            self.leases.clear()

    def hand_back(self, name: str) -> Any:
        """What tells ``name``'s executor that this run will not use its answer."""
        key = next(node.key for node in self.nodes if node.asset.name == name)
        return hand_back(self.snapshot.executors[name], self.tenant, key)

    async def run_all(self) -> None:
        """Run every node once its inputs are done, starting as few tasks as possible.

        Ready nodes wait in a queue. A worker about to run a node makes sure one
        spare worker exists while other nodes are ready: if this node blocks, the
        spare takes the next one (and makes its own spare), so independent
        branches run concurrently; if nothing blocks, the first worker drains the
        queue itself and the spare finds nothing to do. Starting a task costs
        more than a trivial materialization (ADR 0005), so a chain or a fan of
        fast assets starts one or two tasks instead of one per branch.
        """
        if len(self.nodes) == 1:  # a backfill's partition, mostly: nothing to order
            name = self.nodes[0].asset.name
            await self._work(_Ready(deque(self.nodes), {name: 0}, {name: []}), None, False)
            return
        waiting: dict[str, int] = {}
        readers: dict[str, list[_Node]] = {n.asset.name: [] for n in self.nodes}
        for node in self.nodes:
            waiting[node.asset.name] = 0
            for read in node.inputs:
                if read.kind == "node":
                    waiting[node.asset.name] += 1
                    readers[read.asset].append(node)
        queue = _Ready(deque(n for n in self.nodes if waiting[n.asset.name] == 0), waiting, readers)
        async with anyio.create_task_group() as tasks:
            await self._work(queue, tasks, False)

    async def _work(self, queue: _Ready, tasks: Any, helper: bool) -> None:
        """A worker of ``run_all``. A method, not a closure: a closure that starts
        copies of itself refers to itself, and that cycle kept each run (its
        records, outcomes and ids) alive until the collector's next pass."""
        if helper:
            queue.spare -= 1
        ready = queue.ready
        while ready:
            node = ready.popleft()
            if ready and queue.spare == 0 and tasks is not None:
                queue.spare += 1
                tasks.start_soon(self._work, queue, tasks, True)
            name = node.asset.name
            try:
                self.outcomes[name] = await self.run_node(node)
            except FlowstoneError as error:
                self.outcomes[name] = _Outcome(error=error)
            except Exception as error:
                # A store or IO manager broke its contract (raised something that
                # is not a FlowstoneError): wrapped here, once, for the caller.
                wrapped = MaterializationFailed(name, node.key, tenant=self.tenant, error=describe(error))
                wrapped.__cause__ = error
                self.outcomes[name] = _Outcome(error=wrapped)
            for reader in queue.readers[name]:
                queue.waiting[reader.asset.name] -= 1
                if queue.waiting[reader.asset.name] == 0:
                    ready.append(reader)

    async def run_node(self, node: _Node) -> _Outcome:
        name = node.asset.name
        reads = self.reads(node, self.outcomes)
        if reads is None:
            return _Outcome()  # not run: an input failed (its lease is handed back)
        digest = self.digests.get(name) or self.digest(node, reads)
        pending = self.leases.pop(name, None)
        if pending is None:
            previous = self.reusable(node, digest)
            assert previous is not None, "decide() and run_node() disagree"
            return _Outcome(record=previous, reused=True)
        job = make_job(self.snapshot, self.env, self.request, node, reads, digest, self.run_id, self.tenant,
                       self.latest.get((name, node.key)), self.may_reuse(name))
        done = await self.lead_or_follow(job, pending)
        return _outcome_of(done)

    def settle(self, job: Job, result: JobResult | Exception) -> None:
        """A job of this run that ran in a batch ended: its outcome, as ``run_node``
        and ``_work`` make it from the same result (a success another process
        finished comes as a reused ``JobResult``; a batch's runs defer a partition
        another process holds, as a backfill's runs do)."""
        name = job.asset.name
        if isinstance(result, JobResult):
            self.outcomes[name] = _outcome_of(result)
        elif isinstance(result, LeaseHeld):
            self.stopped = result
        elif isinstance(result, FlowstoneError):
            self.outcomes[name] = _Outcome(error=result)
        else:  # a store or IO manager broke its contract: wrapped, as _work wraps it
            wrapped = MaterializationFailed(name, job.key, tenant=self.tenant, error=describe(result))
            wrapped.__cause__ = result
            self.outcomes[name] = _Outcome(error=wrapped)

    async def after_lease_held(self, job: Job, executor: Any, held: LeaseHeld) -> JobResult:
        """Another process holds the store's lease of this partition: wait for it to
        finish, then take its success when it is what this run would compute (single
        flight across processes), else ask for the lease again."""
        if self.request.defer_held:
            raise held
        store = self.env.store
        while True:
            log.info("%s", held)
            await store.wait_lease(job.asset.name, job.key, held.fence or 0, self.env.leases.seconds)
            pair = (job.asset.name, job.key)
            done = (await store.latest_successes([pair])).get(pair)
            if (
                done is not None
                and done.status is Status.SUCCESS
                and done.dependency_hash == job.dependency_hash
                and self.may_reuse(job.asset.name)
            ):
                return JobResult(done, reused=True)
            try:
                return await run_job(job, self.env, executor)
            except LeaseHeld as again:
                held = again
            except FinishedElsewhere as done:
                return JobResult(done.record, reused=True)  # type: ignore[arg-type]

    async def lead_or_follow(self, job: Job, pending: PendingCall | Lease) -> JobResult:
        """Run the job under the lease the executor granted, or take the leader's result."""
        executor = self.snapshot.executors[job.asset.name]
        if isinstance(pending, Lease):  # the gate's lease, granted at once (execute)
            answer: Any = pending
        else:
            # An answer that came at once needs no hook for a cancelled wait.
            hook = None if pending.ready else hand_back(executor, self.tenant, job.key)
            answer = await pending.result(hook)
        if not isinstance(answer, Lease):
            return answer  # another caller computed it (single flight)
        result: JobResult | None = None
        try:
            try:
                result = await run_job(job, self.env, executor)
            except LeaseHeld as held:  # another process computes it now
                result = await self.after_lease_held(job, executor, held)
            except FinishedElsewhere as done:  # another caller did, since we looked
                result = JobResult(done.record, reused=True)  # type: ignore[arg-type]
            return result
        finally:
            finished = handed_over(executor, job, answer, result)  # hand_over, without its coroutine
            if finished is not None:
                await deliver(executor, finished)
