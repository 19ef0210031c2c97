"""Materializations sent to ``flowstone worker`` processes through procrastinate.

The queue is procrastinate's tables in a PostgreSQL schema of their own
(``flowstone_queue``), outside row-level security: a job holds ids only, as JSON
(tenant, asset, partition key, backfill id, attempt, and the run's ``upstream`` and
``force``). FlowStone's records and leases stay the source of truth; procrastinate
delivers "try to materialize this" at least once, and a queueing lock per (tenant,
asset, partition) keeps one such job waiting at a time.

``migrate_queue(dsn)`` creates the schema. ``Queue(dsn)`` is the sending side: given
to ``open_runtime(queue=...)``, backfills run on the workers (``Queue.runner``), and
``Queue.reconcile`` hands the jobs of dead workers back. ``run_worker(...)`` executes
jobs until stopped, each under its job's tenant, through an ordinary runtime (the
same leases, guards and records as a local run). Workers run on asyncio (procrastinate
does); a ``Queue`` works from asyncio or trio (through the bridge, as the PostgreSQL
store does).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Collection, Iterable
from contextlib import nullcontext
from typing import Any

import anyio
import attrs

from ..errors import DatabaseError, DatabaseUnavailable, FlowstoneError, MaterializationFailed, WorkerJobFailed
from ..partitions import serialize_partition
from ..plumbing.bridge import Bridge, LoopBound
from ..runtime.backfill import BackfillSpec, Runner
from ..store.records import Status

__all__ = [
    "ATTEMPTS", "HEARTBEAT_SECONDS", "POLL_SECONDS", "QUEUE", "RECONCILE_SECONDS", "SCHEMA", "STALLED_SECONDS",
    "TASK", "Queue", "Sent", "migrate_queue", "run_worker", "send", "send_all",
]

log = logging.getLogger("flowstone.workers")

SCHEMA = "flowstone_queue"
QUEUE = "flowstone"
TASK = "flowstone.materialize"

POLL_SECONDS = 0.05
"""How often a backfill on workers looks at the jobs it waits for (one query for all)."""

HEARTBEAT_SECONDS = 2.0
"""How often a worker tells the queue it is alive."""

STALLED_SECONDS = 10.0
"""A worker silent this long is taken for dead: its jobs go back to the queue, and
the partition's lease (expired by then, or soon) lets the next worker take it over."""

RECONCILE_SECONDS = 5.0
"""How often a backfill on workers, and the daemon, hand back the jobs of dead workers."""

ATTEMPTS = 3
"""Times a partition is sent when its job fails in the queue, or disappears without
having run (not when the asset fails on the worker: that is recorded, and final)."""

POOL_SIZE = 4
"""Connections a sending process keeps to the queue (one poll serves every wait)."""

_ENDED = frozenset({"succeeded", "failed", "cancelled", "aborted"})
"""A job's states in which no worker will touch it again."""


def _app(dsn: str, **pool: Any) -> Any:
    """A procrastinate App on ``dsn`` whose connections see the queue's schema only."""
    import procrastinate

    _see_trio_asyncio()
    connector = procrastinate.PsycopgConnector(
        conninfo=dsn, kwargs={"options": f"-c search_path={SCHEMA}"}, **pool)
    return procrastinate.App(connector=connector)


def _see_trio_asyncio() -> None:
    """psycopg binds ``asyncio.get_running_loop`` when it is imported. trio-asyncio
    (the bridge, on trio) replaces that function with one that also finds the asyncio
    loop trio hosts; a psycopg imported before it keeps the plain one and finds "no
    running event loop" there. Give it the current one (on plain asyncio they do the same)."""
    import asyncio
    import sys

    waiting: Any = sys.modules.get("psycopg.waiting")
    if waiting is not None and "trio_asyncio" in sys.modules:
        waiting.get_running_loop = asyncio.get_running_loop


def _declare(app: Any, run: Any) -> Any:
    """The one task: ``run(tenant, asset, partition, ...)``, as procrastinate knows it."""
    return app.task(name=TASK, queue=QUEUE, pass_context=False)(run)


def _lock(tenant: str | None, asset: str, partition: str | None) -> str:
    return f"{tenant or ''}\x1f{asset}\x1f{partition or ''}"


async def migrate_queue(dsn: str, *, grant_to: Iterable[str] = ()) -> bool:
    """Create the queue's schema and procrastinate's tables in it (as a role that may
    create a schema), and let ``grant_to`` roles use them; False when they were there."""
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        found = await (await connection.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'procrastinate_jobs'", (SCHEMA,)
        )).fetchone()
        if found is None:
            await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            app = _app(dsn)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()
        for role in grant_to:
            for grant in (
                "GRANT USAGE ON SCHEMA {schema} TO {role}",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
                "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}",
            ):
                await connection.execute(sql.SQL(grant).format(schema=sql.Identifier(SCHEMA),
                                                               role=sql.Identifier(role)))
    return found is None


class Queue:
    """The queue in ``dsn``'s database, seen from the processes that send work: give it
    to ``open_runtime(queue=...)`` and backfills run on ``flowstone worker`` processes.
    Connects on first use, from asyncio or trio; ``close()`` it (or use ``async with``).
    Errors reaching the queue are ``DatabaseUnavailable``; a queue never migrated is
    ``DatabaseError``."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._app: LoopBound[Any] = LoopBound(self._open, _close, _abort)
        self._bridge = Bridge(on_close=self._app.close)

    async def __aenter__(self) -> Queue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._bridge.close()

    async def _open(self) -> Any:
        app = _app(self.dsn, min_size=1, max_size=POOL_SIZE)
        _declare(app, _never_here)
        await app.open_async()
        return app

    async def _call(self, fn: Any, *args: Any) -> Any:
        """``fn(app, *args)`` on the queue's asyncio side, its errors as FlowStone's."""
        return await self._bridge.run(self._on_asyncio, fn, args)

    async def _on_asyncio(self, fn: Any, args: tuple[Any, ...]) -> Any:
        import psycopg
        from procrastinate.exceptions import ConnectorException

        try:
            return await fn(await self._app.get(), *args)
        except ConnectorException as error:
            cause = error.__cause__
            if isinstance(cause, psycopg.errors.UndefinedTable):
                raise DatabaseError(f"the work queue ({SCHEMA}) is not there: create it with "
                                    "flowstone.workers.queue.migrate_queue(owner_dsn, grant_to=[role])") from error
            raise DatabaseUnavailable(f"the work queue: {cause or error}") from error
        except (OSError, psycopg.Error) as error:  # the pool could not connect at all
            raise DatabaseUnavailable(f"the work queue: {error}") from error

    # ---------------------------------------------------------------- sending

    async def enqueue(
        self, tenant: str | None, asset: str, partition: str | None, *, upstream: str = "missing",
        force: bool = False, backfill: str | None = None, attempt: int = 1,
    ) -> Sent:
        """Enqueue one materialization of ``asset`` at ``partition`` (its key) for
        ``tenant``, under a new run id; or find the job already waiting for that
        partition (the queueing lock keeps one waiting), and its run id."""
        job = {"tenant": tenant, "asset": asset, "partition": partition, "upstream": upstream, "force": force,
               "run": str(uuid.uuid4()), "backfill": backfill, "attempt": attempt}
        sent: Sent = await self._call(_enqueue, job)
        return sent

    async def states(self, jobs: Collection[int]) -> dict[int, str]:
        """The state of each of ``jobs`` still in the queue (todo, doing, failed, ...);
        a job done is deleted, so absent."""
        found: dict[int, str] = await self._call(_states, list(jobs))
        return found

    async def withdraw(self, jobs: Collection[int]) -> int:
        """Delete those of ``jobs`` no worker is running (waiting, or ended); how many."""
        count: int = await self._call(_withdraw, list(jobs))
        return count

    async def reconcile(self) -> int:
        """Take workers silent for ``STALLED_SECONDS`` for dead and hand their jobs back
        to the queue (each runs again elsewhere; the partition's lease keeps one
        computation at a time); how many jobs. Safe to call from several processes."""
        count: int = await self._call(_reconcile)
        return count

    def runner(self, spec: BackfillSpec, store: Any) -> Runner:
        """How a backfill runs on workers: each partition sent as a job and waited for
        (so at most ``max_parallel`` are enqueued at once), its outcome read from ``store``."""
        sending = _Sending(self, spec, store)
        return Runner(prefetch=sending.prefetch, run=sending.run)


async def _close(app: Any) -> None:
    await app.close_async()


def _abort(app: Any) -> None:
    """Nothing to do synchronously: the pool's connections went with their loop."""


@attrs.frozen
class Sent:
    """A job in the queue: its id, the run id its records will carry, and whether this
    call enqueued it (False: it was waiting already, sent by someone else)."""

    job: int
    run: str
    fresh: bool


async def _enqueue(app: Any, job: dict[str, Any]) -> Sent:
    from procrastinate.exceptions import AlreadyEnqueued

    task = app.tasks[TASK]
    lock = _lock(job["tenant"], job["asset"], job["partition"])
    while True:
        try:
            return Sent(await task.configure(queueing_lock=lock).defer_async(**job), job["run"], True)
        except AlreadyEnqueued:
            rows = await app.connector.execute_query_all_async(
                "SELECT id, args->>'run' AS run FROM procrastinate_jobs "
                "WHERE queueing_lock = %(lock)s AND status = 'todo'", lock=lock)
            if rows:
                return Sent(rows[0]["id"], rows[0]["run"], False)
            # taken by a worker in between: a new one may wait now


async def _states(app: Any, jobs: list[int]) -> dict[int, str]:
    if not jobs:
        return {}
    rows = await app.connector.execute_query_all_async(
        "SELECT id, status::text AS status FROM procrastinate_jobs WHERE id = ANY(%(ids)s)", ids=jobs)
    return {row["id"]: row["status"] for row in rows}


async def _withdraw(app: Any, jobs: list[int]) -> int:
    if not jobs:
        return 0
    rows = await app.connector.execute_query_all_async(
        "DELETE FROM procrastinate_jobs WHERE id = ANY(%(ids)s) AND status <> 'doing' RETURNING id", ids=jobs)
    return len(rows)


async def _reconcile(app: Any) -> int:
    from procrastinate.exceptions import ConnectorException

    manager = app.job_manager
    handed = 0
    for job in await manager.get_stalled_jobs(queue=QUEUE, task_name=TASK, seconds_since_heartbeat=STALLED_SECONDS):
        try:
            await manager.retry_job(job)
            handed += 1
            log.warning("job %s (%s): its worker stopped answering; back in the queue", job.id, job.task_kwargs)
        except ConnectorException:
            # Another process handed it back first, or a new job for the same
            # partition waits already (the queueing lock): this one goes.
            await _withdraw_stalled(app, job.id)
    # After the jobs, not before: each statement reads its own now(), and a worker
    # that crossed the threshold between the two had its job handed back but its
    # row kept until the next reconcile (a backfill could end first). Pruned now,
    # every worker whose jobs were just found stalled goes; a worker pruned here
    # whose job was not found yet leaves that job without a worker, which the
    # next reconcile finds.
    await manager.prune_stalled_workers(STALLED_SECONDS)
    return handed


async def _withdraw_stalled(app: Any, job: int) -> None:
    await app.connector.execute_query_async(
        "DELETE FROM procrastinate_jobs j WHERE id = %(id)s AND status = 'doing' AND EXISTS ("
        " SELECT 1 FROM procrastinate_jobs w WHERE w.queueing_lock = j.queueing_lock AND w.status = 'todo')",
        id=job)


class _Sending:
    """One backfill's partitions on the workers. Each of its ``max_parallel`` tasks
    sends a partition and waits; whichever task finds no poll under way polls the
    queue for every job waited for (one query per ``POLL_SECONDS``), and hands back
    the jobs of dead workers every ``RECONCILE_SECONDS``."""

    def __init__(self, queue: Queue, spec: BackfillSpec, store: Any) -> None:
        self.queue, self.spec, self.store = queue, spec, store
        self.waiting: dict[int, anyio.Event] = {}
        self.ended: dict[int, str] = {}
        self.polling: anyio.Event | None = None
        self.polled = -math.inf
        self.reconciled = -math.inf

    async def prefetch(self, requests: list[Any]) -> None:
        """Nothing to look up here: the worker does, for itself."""

    async def run(self, request: Any, ahead: Any) -> None:
        spec = self.spec
        key = serialize_partition(request.partition) if request.partition is not None else None
        for attempt in range(1, ATTEMPTS + 1):
            sent = await self.queue.enqueue(spec.tenant, spec.asset, key, upstream=spec.upstream, force=spec.force,
                                            backfill=str(spec.id), attempt=attempt)
            try:
                state = await self._wait(sent.job)
            except BaseException:  # cancelled: take back what no worker has started
                with anyio.CancelScope(shield=True), anyio.move_on_after(POLL_SECONDS * 100):
                    try:
                        await self.queue.withdraw([sent.job])
                    except FlowstoneError as error:
                        log.warning("backfill %s: job %s not withdrawn: %s", spec.id, sent.job, error)
                raise
            if state == "succeeded" and await self._outcome(key, sent.run):
                return
            if state == "succeeded":
                state = "gone without a trace (deleted by hand?)"
            else:
                await self.queue.withdraw([sent.job])  # accounted for here
            log.warning("backfill %s: job %s (%s @ %s) %s in the queue, attempt %d/%d", spec.id, sent.job,
                        spec.asset, key, state, attempt, ATTEMPTS)
        raise WorkerJobFailed(f"its job failed or was lost in the queue {ATTEMPTS} times (see the workers' logs)",
                              asset=spec.asset, partition=key, tenant=spec.tenant)

    async def _wait(self, job: int) -> str:
        """Until ``job`` has ended: ``succeeded`` (it is deleted then) or how it ended."""
        event = self.waiting[job] = anyio.Event()
        try:
            while not event.is_set():
                if self.polling is not None:
                    await self.polling.wait()
                    continue
                self.polling = polled = anyio.Event()
                try:
                    await anyio.sleep(max(0.0, self.polled + POLL_SECONDS - anyio.current_time()))
                    await self._poll()
                finally:
                    self.polling = None
                    polled.set()
            return self.ended.pop(job)
        finally:
            self.waiting.pop(job, None)

    async def _poll(self) -> None:
        jobs = list(self.waiting)
        states = await self.queue.states(jobs)
        self.polled = anyio.current_time()
        for job in jobs:
            state = states.get(job, "succeeded")  # a job done is deleted
            if state in _ENDED:
                self.ended[job] = state
                self.waiting[job].set()
        if self.polled - self.reconciled >= RECONCILE_SECONDS:
            self.reconciled = self.polled
            try:
                await self.queue.reconcile()
            except FlowstoneError as error:
                log.warning("backfill %s: the queue was not reconciled: %s", self.spec.id, error)

    async def _outcome(self, key: str | None, run: str) -> bool:
        """What the records of the job's run say: a success of the partition (made by
        the job, or by its retry after a dead worker) returns; a failure of it or of an
        upstream asset it needed raises, with that record's error. A run that left no
        record (but orphans) found everything up to date; without a current success
        either, the job never ran (it was lost): False, to send it again."""
        spec = self.spec
        records = await self.store.get_by_run_id(run)
        mine = [r for r in records if r.asset_name == spec.asset and r.partition == key]
        if any(r.status in (Status.SUCCESS, Status.STALE, Status.SUPERSEDED) for r in mine):
            return True
        # A record closed as "orphaned" was a dead worker's attempt; the job's retry
        # (same run) has the last word, and may have found the partition done.
        ended = [r for r in records if not (r.error_message or "").startswith("orphaned:")]
        failed = [r for r in ended if r in mine and r.status in (Status.FAILED, Status.CANCELLED)] or [
            r for r in ended if r.status is Status.FAILED]
        if failed:
            last = failed[-1]
            where = "" if last in mine else f"{last.asset_name} @ {last.partition}: "
            raise MaterializationFailed(spec.asset, key, tenant=spec.tenant,
                                        error=f"{where}{last.error_message or last.status}")
        return (spec.asset, key) in await self.store.latest_successes([(spec.asset, key)])


async def send(dsn: str, asset: str, partition: str | None = None) -> int | None:
    """Enqueue one materialization of ``asset`` at ``partition`` (its key) in the caller's
    tenant; the job's id, or None when the same one is already waiting."""
    [job] = await send_all(dsn, asset, [partition])
    return job


async def send_all(dsn: str, asset: str, partitions: Iterable[str | None]) -> list[int | None]:
    """``send`` for each of ``partitions``, over one connection."""
    from ..tenancy import current_tenant

    tenant = current_tenant()
    async with Queue(dsn) as queue:
        sent = [await queue.enqueue(tenant, asset, partition) for partition in partitions]
    return [s.job if s.fresh else None for s in sent]


async def _never_here(**job: Any) -> None:
    raise RuntimeError("materialization jobs run in flowstone worker processes")


async def run_worker(
    dsn: str, rt: Any, *, concurrency: int = 4, tenants: Collection[str | None] | None = None,
    name: str | None = None,
) -> None:
    """Execute materialization jobs on ``rt`` until SIGTERM/SIGINT (procrastinate's own
    graceful stop: jobs in flight finish). ``tenants``: the only tenants whose jobs this
    worker takes (None: any); a job of another is refused, and fails."""
    from ..errors import AccessDenied
    from ..tenancy import tenant_scope

    app = _app(dsn)
    definitions = {asset.name: asset.partitioned_by for asset in await rt.assets()}

    async def materialize(
        tenant: str | None, asset: str, partition: str | None, upstream: str = "missing", force: bool = False,
        run: str | None = None, backfill: str | None = None, attempt: int = 1,
    ) -> None:
        job = f"job {asset} @ {partition} (tenant {tenant})"
        if tenants is not None and tenant not in tenants:
            refused = AccessDenied(asset, "materialize", tenant, reason="this worker does not serve that tenant")
            log.error("%s refused: %s", job, refused)
            raise refused
        definition = definitions.get(asset)
        value = definition.validate(partition) if definition is not None and partition is not None else partition
        with tenant_scope(tenant) if tenant else nullcontext():
            try:
                result = await rt.materialize(asset, value, upstream=upstream, force=force, run_id=run)
            except MaterializationFailed as failure:  # the asset's failure: recorded, not the queue's
                log.warning("%s failed: %s", job, failure)
                return
        log.info("%s: %s", job, "up to date" if asset in result.skipped else "materialized")

    _declare(app, materialize)
    async with app.open_async():
        log.info("worker %s: taking jobs from %s.%s (%d at a time)", name or "worker", SCHEMA, QUEUE, concurrency)
        await app.run_worker_async(
            queues=[QUEUE], concurrency=concurrency, name=name, wait=True, install_signal_handlers=True,
            delete_jobs="successful", update_heartbeat_interval=HEARTBEAT_SECONDS,
            stalled_worker_timeout=STALLED_SECONDS,
        )
