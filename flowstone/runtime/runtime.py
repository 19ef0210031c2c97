"""``open_runtime``: the supervisor nursery, and ``Runtime``: what callers hold.

Two task groups, nested, give an orderly shutdown: the inner one holds the
executors and backfills, the outer one the memory-store and registry actors.
Leaving the block cancels the inner group first, so cancelled jobs can still
record ``cancelled`` in the store, then the outer one. Nothing outlives the block.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any

import anyio
import attrs
from anyio.abc import TaskGroup

from .. import events as ev
from ..actors.mailbox import CLEANUP_SECONDS, Handle
from ..actors.supervisor import RestartPolicy, supervise
from ..actors.supervisor import spawn_on_demand as supervised
from ..definitions import Asset, FieldError, Retention
from ..errors import (
    AccessDenied,
    BackfillNotFound,
    DefinitionError,
    InvalidPartition,
    NotFound,
    RuntimeClosed,
    single_error,
)
from ..guards import Guard, authorize
from ..io.memory import MemoryIO
from ..io.protocol import IOManager
from ..partitions import PartitionRange, serialize_partition
from ..pipeline import Pipeline
from ..plumbing.interrupts import protect_on_trio
from ..store.memory import MemoryStore
from ..store.memory_client import MemoryActorClient, stop_gracefully
from ..store.protocol import MaterializationStore
from ..store.records import Materialization, check_decidable, parse_id
from ..tenancy import current_tenant
from . import backfill as bf
from . import registry as reg
from . import retention, tracing
from .executor import Decide, Door, Env, ExecutorStatistics, Stats, executor_actor
from .job import BatchWriter, load_value
from .leases import LEASE_SECONDS, LeaseKeeper
from .processes import ProcessPool
from .run import (
    Planner,
    Prefetched,
    RunRequest,
    RunResult,
    carries_partitions,
    check_request,
    execute_batch,
    execute_run,
    lookup_pairs,
    target_partition,
)
from .watch import DEFAULT_BUFFER, EventBus, Subscription

__all__ = ["Runtime", "materialize", "open_runtime"]

log = logging.getLogger("flowstone.runtime")

DEFAULT_THREADS = 40
DEFAULT_RESTART_POLICY = RestartPolicy()


class Runtime:
    """A running FlowStone: materialize, load, backfill, register.

    Obtained from ``async with fs.open_runtime(pipeline) as rt:``; every method
    is scoped to the caller's ``current_tenant()``.
    """

    def __init__(
        self,
        *,
        registry: Handle,
        env: Env,
        guard: Guard | None,
        workers: TaskGroup,
        queue: bf.Dispatcher | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._registry = registry
        self._env = env
        self._guard = guard
        self._workers = workers
        self._queue = queue
        self._retention = retention

    @property
    def queue(self) -> bf.Dispatcher | None:
        """Where backfills on workers go (``open_runtime(queue=...)``), else None."""
        return self._queue

    @property
    def store(self) -> MaterializationStore:
        """The materialization store in use."""
        return self._env.store

    @property
    def io_managers(self) -> Mapping[str, IOManager]:
        """The IO managers in use, by key (the caller's and the built-in ones)."""
        return MappingProxyType(dict(self._env.io_managers))

    async def _snapshot(self) -> reg.Snapshot:
        return await self._registry.call(reg.GetSnapshot)

    # ---------------------------------------------------------------- events

    @asynccontextmanager
    async def events(
        self,
        asset: str | None = None,
        kinds: Iterable[type[ev.Event] | str] | None = None,
        *,
        buffer: int = DEFAULT_BUFFER,
        context: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Subscription]:
        """Watch the runtime: ``async with rt.events() as events: async for event in events``.

        Yields the caller's tenant's events (``flowstone.events``) from the moment the
        block is entered, of ``asset`` only when given, of the ``kinds`` given (event
        classes or their names) when given. At most ``buffer`` events wait for the
        subscriber; what does not fit arrives as one ``EventsDropped(count)``. With a
        guard, events of an asset the caller may not access (``can_access`` with
        ``context``) are left out. Iteration ends when the runtime closes.

        Raises ``DefinitionError`` for an unknown kind or a bad ``buffer``, and
        ``NotFound`` for an unknown asset.
        """
        wanted = _event_kinds(kinds)
        if type(buffer) is not int or buffer < 1:
            raise DefinitionError([FieldError("buffer", f"must be an int >= 1, got {buffer!r}")])
        tenant = current_tenant()
        if asset is not None:
            (await self._snapshot()).graph.get(asset)  # NotFound for a name nobody defined
        allowed = None
        if self._guard is not None:
            guard, snapshot_of = self._guard, self._snapshot
            guard_context = {**(context or {}), "tenant": tenant}

            async def allowed(name: str) -> bool:
                try:
                    await authorize(guard, "access", (await snapshot_of()).graph.get(name), guard_context)
                except (AccessDenied, NotFound):
                    return False
                return True

        subscription = Subscription(self._env.events, tenant, asset, wanted, buffer, allowed)
        self._env.events.subscribers.append(subscription)
        try:
            yield subscription
        finally:
            subscription.close()

    # ---------------------------------------------------------------- assets

    async def assets(self) -> list[Asset]:
        """Every registered asset, in registration order."""
        return list((await self._snapshot()).graph.assets)

    async def register(self, asset: Asset) -> None:
        """Add an asset while running; a name clash, cycle or bad field is a DefinitionError."""
        if not isinstance(asset, Asset):
            raise DefinitionError([FieldError("asset", f"expected an fs.Asset, got {type(asset).__name__}")])
        await self._registry.call(reg.Register, asset=asset)

    # ----------------------------------------------------------- materialize

    async def materialize(
        self,
        name: str,
        partition: Any = None,
        *,
        upstream: str = "missing",
        force: bool = False,
        io: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        run_id: uuid.UUID | str | None = None,
    ) -> RunResult:
        """Compute ``name`` and what it needs for one partition, skipping what is up to
        date, and return the run's records.

        ``upstream``: ``"missing"`` (compute upstream assets that are missing, stale or
        changed), ``"all"`` or ``"none"`` (read what is stored). ``force`` recomputes
        the target. ``io`` overrides the target's IO manager for this run. ``run_id``:
        the id its records carry (default: a new one), so a caller that named the run
        beforehand (a job in a queue) finds them with ``store.get_by_run_id``.

        Raises ``MaterializationFailed`` (an asset failed; the partial result and the
        asset's exception as ``__cause__``), ``NotFound`` (an unknown asset, or with
        ``upstream="none"`` an input never materialized), ``InvalidPartition``,
        ``DefinitionError`` (bad options), ``AccessDenied`` (the guard refused, asked
        with ``context``) or ``RuntimeClosed``.
        """
        request = RunRequest(name, partition, upstream, force, io, context)
        check_request(request, self._env.io_managers)
        run = None
        if run_id is not None:
            try:
                run = run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id))
            except ValueError:
                raise DefinitionError([FieldError("run_id", f"must be a UUID, got {run_id!r}")], asset=name) from None
        snapshot = await self._snapshot()
        return await execute_run(snapshot, self._env, self._guard, request, current_tenant(), run_id=run)

    async def load(self, name: str, partition: Any = None, *, context: Mapping[str, Any] | None = None) -> Any:
        """The value of the latest successful materialization of ``name`` at ``partition``
        (a private copy for ``MemoryIO``). Raises ``NotFound`` (no such asset, or no
        success to load), ``InvalidPartition`` or ``AccessDenied`` (the guard's
        ``can_access``, asked with ``context``)."""
        snapshot = await self._snapshot()
        asset = snapshot.graph.get(name)
        key = serialize_partition(
            target_partition(asset, partition, carries=carries_partitions(snapshot.graph, name))
        )
        tenant = current_tenant()
        await authorize(self._guard, "access", asset, {**(context or {}), "tenant": tenant})
        found = await self._env.store.latest_successes([(name, key)])
        record = found.get((name, key))
        if record is None:
            raise NotFound("no successful materialization to load", asset=name, partition=key, tenant=tenant)
        return await load_value(record, self._env)

    # ------------------------------------------------------- observability

    async def statistics(self) -> dict[str, ExecutorStatistics]:
        """A snapshot of every executor, by asset name (see ``ExecutorStatistics``)."""
        snapshot = await self._snapshot()
        executors = snapshot.executors
        asked = {
            name: await handle.request(Stats) for name in executors if (handle := executors.running(name)) is not None
        }
        try:
            answers = {name: await pending.result() for name, pending in asked.items()}
        finally:
            for pending in asked.values():
                pending.discard()  # those not read because one failed
        # An executor not started yet (its asset never ran here) has nothing going on.
        return {name: answers.get(name) or ExecutorStatistics(name, 0, 0, 0, 0) for name in executors}

    # The chaos tools' seam (``flowstone.testing.kill_actor``): not part of the API.

    async def _actor_names(self) -> list[str]:
        """``registry``, ``memory-store`` (when a memory store or IO runs) and
        ``executor:<asset>`` for every asset."""
        names = ["registry"]
        clients = (self._env.store, *self._env.io_managers.values())
        if any(isinstance(c, MemoryActorClient) and c.started for c in clients):
            names.append("memory-store")
        snapshot = await self._snapshot()
        return names + sorted(f"executor:{name}" for name in snapshot.executors)

    async def _actor(self, name: str) -> Handle:
        if name == "registry":
            return self._registry
        if name == "memory-store":
            for client in (self._env.store, *self._env.io_managers.values()):
                if isinstance(client, MemoryActorClient) and client.started:
                    return client.handle
        elif name.startswith("executor:"):
            snapshot = await self._snapshot()
            handle = snapshot.executors.get(name.partition(":")[2])
            if handle is not None:
                return handle
        raise NotFound(f"no actor named {name!r}; try 'registry', 'memory-store' or 'executor:<asset>'")

    # ------------------------------------------------------------- approvals

    async def approve(
        self, materialization_id: uuid.UUID | str, *, context: Mapping[str, Any] | None = None
    ) -> None:
        """Let a materialization waiting for approval run, in this process or any other
        sharing the store (the decision is kept there; a process that waits looks
        every second).

        Raises ``NotFound`` (no such record in the caller's tenant),
        ``InvalidTransition`` (not waiting for approval, or decided already) or
        ``AccessDenied`` (the guard's ``can_materialize`` refused, asked with ``context``)."""
        await self._decide(materialization_id, True, None, context)

    async def reject(
        self, materialization_id: uuid.UUID | str, reason: str | None = None, *,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Fail a materialization waiting for approval, with ``reason`` as its error.
        Raises as :meth:`approve` does."""
        await self._decide(materialization_id, False, reason, context)

    async def _decide(
        self, materialization_id: uuid.UUID | str, approve: bool, reason: str | None,
        context: Mapping[str, Any] | None,
    ) -> None:
        tenant = current_tenant()
        record: Materialization = await self._env.store.get_by_id(parse_id(materialization_id))
        snapshot = await self._snapshot()
        await authorize(
            self._guard, "materialize", snapshot.graph.get(record.asset_name), {**(context or {}), "tenant": tenant}
        )
        check_decidable(record, approve, decided=False)
        # Kept in the store first: the process that runs it, this one or another, acts on it.
        await self._env.store.decide(record.id, approve, reason)
        executor = snapshot.executors.running(record.asset_name)  # one that never started waits for nothing
        if executor is not None:
            try:  # waiting here: it goes on at once instead of at its next look in the store
                await executor.call(Decide, tenant=tenant, record_id=record.id, approve=approve, reason=reason)
            except NotFound:
                pass  # waiting in another process: it finds the decision in the store

    # ------------------------------------------------------------- retention

    async def prune(self, *, context: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Delete, in the caller's tenant, the history records (superseded, failed,
        cancelled) that the assets' retention (``fs.asset(retention=...)``, else the
        runtime's ``retention``) no longer keeps; records deleted per asset whose
        retention limits anything. A current success, the latest record of a partition,
        unfinished records and what a stale record was built from stay. Raises
        ``AccessDenied`` (the guard refuses ``materialize`` on one of those assets)
        before anything is deleted."""
        chosen = retention.limited((await self._snapshot()).graph.assets, self._retention)
        for asset, _policy in chosen:
            await authorize(self._guard, "materialize", asset, {**(context or {}), "tenant": current_tenant()})
        return await retention.prune(self._env.store, chosen)

    async def prune_finished(self) -> int:
        """Delete, in the caller's tenant, the finished backfills and schedule ticks
        older than the runtime's ``retention.max_age`` (each schedule's newest tick
        stays: the scheduler goes on from it); how many. 0 when the runtime has no
        ``retention`` with a ``max_age``."""
        return await retention.prune_finished(self._env.store, self._retention)

    # ------------------------------------------------------------- backfills

    async def backfill(
        self,
        name: str,
        partitions: Iterable[Any] | None = None,
        *,
        max_parallel: int = 10,
        upstream: str = "missing",
        force: bool = False,
        io: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        workers: bool | None = None,
    ) -> uuid.UUID:
        """Start materializing ``name`` over ``partitions`` (default: all) and return its id at once.

        ``partitions`` is a list of partitions or a lazy ``fs.partition_range``; at most
        ``max_parallel`` run at once. ``workers``: send the partitions to ``flowstone
        worker`` processes through the runtime's queue (at most ``max_parallel``
        enqueued at once) instead of computing them here; default: when the runtime
        was opened with a ``queue``. Raises, before anything runs: ``DefinitionError``
        (bad options, or a tuple of partitions), ``InvalidPartition``, ``NotFound``
        (unknown asset), ``AccessDenied``, or a storage error when the backfill cannot be
        saved. Failures of partitions are in ``backfill_status``, not raised.
        """
        if type(max_parallel) is not int or max_parallel < 1:
            raise DefinitionError(
                [FieldError("max_parallel", f"must be an int >= 1, got {max_parallel!r}")], asset=name)
        on_workers = self._queue is not None if workers is None else workers
        if on_workers and self._queue is None:
            raise DefinitionError([FieldError(
                "workers",
                "this runtime has no queue: open it with open_runtime(..., queue=flowstone.workers.Queue(dsn))",
            )], asset=name)
        if on_workers and io:
            raise DefinitionError([FieldError(
                "io", "IO manager overrides stay in this process: a backfill on workers uses each asset's own"
            )], asset=name)
        check_request(RunRequest(name, None, upstream, force, io, context), self._env.io_managers)
        snapshot = await self._snapshot()
        asset = snapshot.graph.get(name)
        if partitions is None:
            values: Iterable[Any] = asset.partitioned_by.keys() if asset.partitioned_by is not None else [None]
        elif isinstance(partitions, (str, bytes)) or not isinstance(partitions, Iterable):
            raise DefinitionError(
                [FieldError("partitions", f"must be a list of partitions, got {partitions!r}")], asset=name)
        elif isinstance(partitions, tuple):
            # backfill(partitions=(start, end)) reads like a range but would run two
            # partitions; a tuple is also how one composite key is written.
            raise DefinitionError([FieldError(
                "partitions",
                f"a tuple is ambiguous (two partitions, or a range's two ends?), got {partitions!r}: pass a "
                "list of partitions, or fs.partition_range(start, end, step) for every partition in between",
            )], asset=name)
        else:
            values = partitions
        carries = carries_partitions(snapshot.graph, name)
        checked: Sequence[Any] | None = _lazy(asset, values)
        if checked is None:
            checked = tuple(dict.fromkeys(target_partition(asset, p, carries=carries) for p in values))
        tenant = current_tenant()
        await authorize(self._guard, "materialize", asset, {**(context or {}), "tenant": tenant})
        spec = bf.BackfillSpec(
            id=uuid.uuid4(), asset=name, partitions=checked, max_parallel=max_parallel,
            upstream=upstream, force=force, io=io, context=context, tenant=tenant, workers=on_workers,
        )
        await self._start_backfill(spec, snapshot, checked=True)
        return spec.id

    async def _start_backfill(self, spec: bf.BackfillSpec, snapshot: reg.Snapshot, *, checked: bool = False) -> None:
        """Run ``spec`` on ``snapshot``; ``checked``: its partitions are the asset's
        canonical ones, made by ``backfill`` against this snapshot (a resumed
        backfill's are checked again, against the definitions of now)."""
        env, guard, store, registry = self._env, self._guard, self._env.store, self._registry
        planner: Planner | None = None

        async def prefetch(requests: list[RunRequest]) -> list[tuple[Any, Prefetched]]:
            """One store round trip for the "latest success" lookups of a chunk of
            partitions, instead of one per partition (only the pairs a single
            partition reads: see ``Prefetched``); with each partition's plan, made
            once for both. An asset that cannot be planned (a resumed backfill's,
            since redefined) raises here, for each run to report."""
            nonlocal planner
            if planner is None:
                planner = Planner(snapshot, spec.asset)
            plans = [planner.plan(request, checked=checked) for request in requests]
            alone: dict[tuple[str, str | None], bool] = {}  # pair -> read by one plan only so far
            for nodes in plans:
                pairs = lookup_pairs(nodes)
                for pair in pairs if len(pairs) == 1 else set(pairs):
                    alone[pair] = pair not in alone
            own = [pair for pair, only in alone.items() if only]
            found = Prefetched(frozenset(own), await env.store.latest_successes(own))
            return [(nodes, found) for nodes in plans]

        async def run(request: RunRequest, ahead: tuple[Any, Prefetched] | None) -> RunResult:
            nodes, found = ahead if ahead is not None else (None, None)
            return await execute_run(snapshot, env, guard, request, spec.tenant, nodes=nodes, prefetched=found)

        async def batch(
            requests: list[RunRequest], ahead: list[tuple[Any, Prefetched]],
            report: Callable[[int, RunResult | Exception], None],
        ) -> list[int]:
            """The chunk's one-asset plans as one batch (ADR 0032); a run that a tracer
            follows has spans of its own, so it runs alone."""
            if env.tracing is not None and env.tracing.tracer() is not None:
                return list(range(len(requests)))
            return await execute_batch(snapshot, env, guard, requests, [nodes for nodes, _ in ahead], spec.tenant,
                                       ahead[0][1], report)

        runner = bf.Runner(prefetch=prefetch, run=run, batch=batch, most=getattr(store, "backfill_chunk", bf.MAX_CHUNK))
        if spec.workers and self._queue is not None:
            runner = self._queue.runner(spec, store)
        elif spec.workers:
            log.warning("backfill %s was sent to workers, but this runtime has no queue: running it here", spec.id)

        async def save(saved: bf.Saved) -> None:
            await store.save_backfill(spec.id, saved, owner=env.node)

        async def on_exit(handle: Handle, unsaved: bf.BackfillStatus | None) -> None:
            with anyio.move_on_after(CLEANUP_SECONDS):
                try:
                    await registry.call(
                        reg.DropBackfill, tenant=spec.tenant, id=spec.id, handle=handle, unsaved=unsaved)
                except RuntimeClosed:
                    pass  # the runtime is shutting down: nothing left to deregister from

        async def on_enter(handle: Handle) -> None:
            await registry.call(reg.AddBackfill, tenant=spec.tenant, id=spec.id, handle=handle)

        try:
            await self._workers.start(
                functools.partial(bf.run_backfill, bus=env.events), spec, runner, save, on_enter, on_exit
            )
        except RuntimeError as error:  # the worker group is closed
            raise RuntimeClosed("the runtime is closed") from error

    async def _backfill_call(
        self, backfill_id: uuid.UUID | str, message: type[Any], context: Mapping[str, Any] | None = None,
        *, guarded: bool = False,
    ) -> bf.BackfillStatus:
        """Ask the running backfill (in the caller's tenant), else read what the store
        saved. ``guarded``: the guard must allow materializing its asset first."""
        bid, tenant = parse_id(backfill_id, "backfill"), current_tenant()
        found = await self._registry.call(reg.GetBackfill, tenant=tenant, id=bid)
        if guarded:
            if isinstance(found, Handle):
                asset = (await found.call(bf.Status)).asset
            else:
                asset = found.asset if found is not None else (await self._saved_status(bid)).asset
            await self._authorize_asset(asset, context)
        if isinstance(found, Handle):
            try:
                return await found.call(message)
            except RuntimeClosed:
                pass  # it finished between the two questions; the store has its final state
            found = await self._registry.call(reg.GetBackfill, tenant=tenant, id=bid)
        if found is not None and not isinstance(found, Handle):
            return found  # finished, but the store could not save it
        return await self._saved_status(bid)

    async def _saved_backfill(self, bid: uuid.UUID) -> bf.Saved:
        tenant = current_tenant()
        saved = await self._env.store.load_backfill(bid)
        if saved is None or saved.spec.tenant != tenant:
            raise BackfillNotFound(bid, tenant=tenant)
        return saved

    async def _saved_status(self, bid: uuid.UUID) -> bf.BackfillStatus:
        """What the store saved of a backfill's status, its spec unread (a list of a
        million partitions is a second to parse, and a progress view asks twice a second)."""
        tenant = current_tenant()
        status = await self._env.store.load_backfill_status(bid)
        if status is None:
            raise BackfillNotFound(bid, tenant=tenant)
        return status

    async def _authorize_asset(self, name: str, context: Mapping[str, Any] | None) -> None:
        snapshot = await self._snapshot()
        guard_context = {**(context or {}), "tenant": current_tenant()}
        await authorize(self._guard, "materialize", snapshot.graph.get(name), guard_context)

    async def backfill_status(self, backfill_id: uuid.UUID | str) -> bf.BackfillStatus:
        """Progress counts and state of a backfill; ``BackfillNotFound`` when the
        caller's tenant has no backfill with that id."""
        return await self._backfill_call(backfill_id, bf.Status)

    async def wait_backfill(self, backfill_id: uuid.UUID | str) -> bf.BackfillStatus:
        """Wait until the backfill has finished; its final status. Raises as
        :meth:`backfill_status` does."""
        return await self._backfill_call(backfill_id, bf.Wait)

    async def cancel_backfill(
        self, backfill_id: uuid.UUID | str, *, context: Mapping[str, Any] | None = None
    ) -> bf.BackfillStatus:
        """Stop new work, cancel work in flight, and return once every record is terminal.

        Raises ``BackfillNotFound`` (no such backfill in the caller's tenant) or
        ``AccessDenied`` (the guard's ``can_materialize`` refused, asked with ``context``)."""
        return await self._backfill_call(backfill_id, bf.Cancel, context, guarded=True)

    async def resume_backfill(
        self, backfill_id: uuid.UUID | str, *, context: Mapping[str, Any] | None = None
    ) -> uuid.UUID:
        """Run again, here, what a stopped backfill did not finish (finished partitions
        are skipped), under the caller's tenant and ``context``.

        A backfill still saved as ``running`` belongs to the process that ran it. While
        that owner's heartbeat is recent it is refused with ``BackfillOwned`` (naming
        the owner and when it was last seen); once the heartbeat is stale the owner is
        taken to be dead: this runtime becomes the owner and closes every record the
        dead one left unfinished, in every asset (``failed`` when started, else
        ``cancelled``, "orphaned: ..."). Raises ``BackfillNotFound`` (no such backfill
        in the caller's tenant) or ``AccessDenied``.
        """
        bid, tenant = parse_id(backfill_id, "backfill"), current_tenant()
        if isinstance(await self._registry.call(reg.GetBackfill, tenant=tenant, id=bid), Handle):
            await self._authorize_asset((await self._backfill_call(bid, bf.Status)).asset, context)
            return bid  # still running here
        saved = await self._saved_backfill(bid)
        snapshot = await self._snapshot()
        await self._authorize_asset(saved.spec.asset, context)
        store = self._env.store
        claim = await store.claim_backfill(bid, self._env.node, stale_after=bf.STALE_SECONDS)
        if claim.previous_owner is not None:
            seen = claim.last_seen.isoformat(timespec="seconds") if claim.last_seen else "never"
            closed = await store.close_orphans(
                claim.previous_owner,
                f"orphaned: {claim.previous_owner} stopped (last seen {seen}) without finishing it",
            )
            log.warning("backfill %s: took it over from %s (last seen %s); closed %d orphaned records",
                        bid, claim.previous_owner, seen, closed)
        spec = attrs.evolve(claim.saved.spec, tenant=tenant, context=context)  # type: ignore[attr-defined]
        await self._start_backfill(spec, snapshot)
        return bid


@asynccontextmanager
async def open_runtime(
    pipeline: Pipeline | Iterable[Asset],
    store: MaterializationStore | None = None,
    io_managers: Mapping[str, IOManager] | None = None,
    default_io_manager: str = "memory",
    guard: Guard | None = None,
    max_concurrency: int | None = None,
    resources: Mapping[str, Any] | None = None,
    *,
    restart_policy: RestartPolicy = DEFAULT_RESTART_POLICY,
    lease_seconds: float = LEASE_SECONDS,
    queue: bf.Dispatcher | None = None,
    retention: Retention | None = None,
) -> AsyncIterator[Runtime]:
    """Start a runtime for ``pipeline``; every task it starts stops when the block exits.

    The pipeline is validated first (with this runtime's IO manager and resource
    keys), so a bad definition fails here, before anything runs. ``lease_seconds``:
    how long this runtime's leases last unless renewed (renewed every third of it),
    so how long other processes wait before taking over work of one that died.
    ``queue``: where backfills go to run on ``flowstone worker`` processes
    (``flowstone.workers.Queue``); the caller closes it.
    ``retention``: what ``rt.prune()`` (and the daemon) keep of the history of assets
    without a retention of their own (default: everything).

    Raises ``DefinitionError`` (an invalid pipeline or option, an unknown IO manager
    or resource key) or ``CycleError`` before anything starts; a store or IO manager
    that cannot connect raises its storage error when first used.
    """
    protect_on_trio()
    assets = pipeline if isinstance(pipeline, Pipeline) else Pipeline("runtime", assets=pipeline)
    managers: dict[str, IOManager] = dict(io_managers or {})
    built_in = {key: make() for key, make in default_io_managers().items() if key not in managers}
    managers.update(built_in)
    resources = dict(resources or {})
    if max_concurrency is not None and (type(max_concurrency) is not int or max_concurrency < 1):
        raise DefinitionError([FieldError("max_concurrency", f"must be an int >= 1 or None, got {max_concurrency!r}")])
    if retention is not None and not isinstance(retention, Retention):
        raise DefinitionError([FieldError("retention", f"must be an fs.Retention or None, got {retention!r}")])
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) or not 0 < lease_seconds < 86400:
        raise DefinitionError([FieldError("lease_seconds", f"must be a number of seconds > 0, got {lease_seconds!r}")])
    keys = set(managers) | {"memory"}
    if default_io_manager not in keys:
        raise DefinitionError(
            [FieldError("default_io_manager", f"unknown IO manager {default_io_manager!r}; known: {sorted(keys)}")]
        )
    graph = assets.checked_graph(io_managers=keys, resources=set(resources))
    store = MemoryStore() if store is None else store
    managers.setdefault("memory", MemoryIO())
    bound = [c for c in _unwrapped(store, *managers.values()) if isinstance(c, MemoryActorClient) and not c.started]
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    keeper = LeaseKeeper(store, owner, lease_seconds)
    processes = ProcessPool()
    bus = EventBus()
    executors: list[Handle] = []  # their tasks start with their first message, if one ever comes
    closed = False
    try:
        async with anyio.create_task_group() as services:
            await _start_memory_clients(services, bound, restart_policy)
            async with anyio.create_task_group() as workers:
                await workers.start(keeper.run)  # cancelled with the jobs whose leases it renews
                writer = BatchWriter()
                await workers.start(writer.run)
                env = Env(
                    store=store,
                    io_managers=managers,
                    default_io=default_io_manager,
                    resources=resources,
                    limiter=anyio.CapacityLimiter(max_concurrency) if max_concurrency else None,
                    thread_limiter=anyio.CapacityLimiter(max_concurrency or DEFAULT_THREADS),
                    node=owner,
                    leases=keeper,
                    processes=processes,
                    events=bus,
                    tracing=tracing.tracing(),
                    writer=writer,
                )

                def spawn(asset: Asset) -> Handle:
                    if closed:
                        raise RuntimeClosed("the runtime is closed")
                    door = Door(asset)
                    handle = supervised(
                        workers, f"executor:{asset.name}", executor_actor(asset, door), restart_policy, shared=door
                    )
                    executors.append(handle)
                    return handle

                state = reg.RegistryState(reg.initial_snapshot(graph, spawn))
                registry = await services.start(
                    supervise, "registry", reg.registry_actor(state, keys, set(resources)), restart_policy
                )
                runtime = Runtime(registry=registry, env=env, guard=guard, workers=workers, queue=queue,
                                  retention=retention)
                try:
                    yield runtime
                finally:
                    # The two service tasks return rather than be cancelled: anyio keeps a
                    # cancelled task's exception in a reference cycle with the task's frames
                    # and, on trio, the canceller's (this frame: the store, the pipeline),
                    # which a closed runtime then left for the garbage collector to free.
                    keeper.stop()
                    writer.stop()
                    workers.cancel_scope.cancel()  # jobs record "cancelled" while the store still runs
            # The store and the registry drain their mailboxes (write-behind
            # casts included) before they stop.
            memory = [c.handle for c in bound[:1]]
            await stop_gracefully(services, [*memory, registry])
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    finally:
        closed = True
        keeper.close()
        for handle in executors:
            handle.close()  # the mailboxes of those whose task never started
        for client in bound:
            client.unbind()  # reusable by the next runtime; its data stays with it
        bus.close()
        await processes.aclose()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
            for manager in built_in.values():  # the ones this runtime made; the caller closes its own
                await manager.close()


def _event_kinds(kinds: Iterable[type[ev.Event] | str] | None) -> tuple[type[ev.Event], ...] | None:
    if kinds is None:
        return None
    if isinstance(kinds, (str, type)):
        kinds = [kinds]
    found = []
    for kind in kinds:
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", None)
        if name not in ev.KINDS or (not isinstance(kind, str) and ev.KINDS[name] is not kind):
            raise DefinitionError([FieldError(
                "kinds", f"unknown event kind {kind!r}; known: {', '.join(ev.KINDS)}"
            )])
        found.append(ev.KINDS[name])
    return tuple(found)


def _lazy(asset: Asset, values: Iterable[Any]) -> PartitionRange | None:
    """A range of the asset's own partitions, checked at its ends and step and kept
    lazy (ten million hours are never listed); None to check item by item."""
    if not isinstance(values, PartitionRange) or asset.partitioned_by is None:
        return None
    try:
        return asset.partitioned_by.validate_range(values)
    except InvalidPartition as error:
        raise InvalidPartition(error.message, asset=asset.name) from None


def default_io_managers() -> dict[str, Any]:
    """The built-in IO managers every runtime registers under their documented keys unless
    the caller passes its own: ``filesystem`` (``.flowstone/storage``), ``parquet``
    (``.flowstone/parquet``), ``s3`` (credentials from the AWS chain, bucket per
    asset) and, when ``FLOWSTONE_DSN`` is set, ``postgres``. Each connects or writes
    only when an asset uses it; the runtime closes them when it stops."""
    from ..io.filesystem import FilesystemIO
    from ..io.parquet import ParquetIO
    from ..io.s3 import S3IO

    makers: dict[str, Any] = {"filesystem": FilesystemIO, "parquet": ParquetIO, "s3": S3IO}
    if os.environ.get("FLOWSTONE_DSN"):
        from ..io.postgres import PostgresIO

        makers["postgres"] = PostgresIO
    return makers


def _unwrapped(*clients: Any) -> list[Any]:
    """``clients`` and whatever they wrap (``.inner``, as ``FaultyIO`` has), once each."""
    found: list[Any] = []
    for client in clients:
        while client is not None and not any(client is seen for seen in found):
            found.append(client)
            client = getattr(client, "inner", None)
    return found


async def _start_memory_clients(services: TaskGroup, clients: list[MemoryActorClient], policy: RestartPolicy) -> None:
    """Start the memory-store actor once and bind every unstarted memory client to it."""
    if clients:
        handle = await clients[0].start(services, policy)
        for client in clients[1:]:
            client.bind(handle)


def materialize(
    pipeline: Pipeline | Iterable[Asset],
    name: str,
    partition: Any = None,
    *,
    upstream: str = "missing",
    force: bool = False,
    io: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    backend: str = "asyncio",
    **runtime_options: Any,
) -> RunResult:
    """Synchronous convenience for scripts: open a runtime, materialize, close it.

    ``runtime_options`` go to :func:`open_runtime`. With the default in-memory
    store nothing is kept between calls; pass the same ``store`` and
    ``io_managers`` objects to keep records and values.

    Raises what :func:`open_runtime` and :meth:`Runtime.materialize` raise.
    """

    async def main() -> RunResult:
        async with open_runtime(pipeline, **runtime_options) as rt:
            return await rt.materialize(name, partition, upstream=upstream, force=force, io=io, context=context)

    return anyio.run(main, backend=backend)
