"""Materializations sent to ``flowstone worker`` processes through procrastinate.

The queue is procrastinate's tables in a PostgreSQL schema of their own
(``flowstone_queue``), outside row-level security: a job holds ids only, as JSON
(tenant, asset, partition key). FlowStone's records and leases stay the source of
truth; procrastinate delivers "try to materialize this" at least once, and a
queueing lock per (tenant, asset, partition) keeps one such job waiting at a time.

``migrate_queue(dsn)`` creates the schema; ``send(dsn, asset, partition)`` enqueues
(in the caller's tenant); ``run_worker(...)`` executes jobs until stopped, each under
its job's tenant, through an ordinary runtime (the same leases, guards and records as
a local run). Workers run on asyncio (procrastinate does).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from contextlib import nullcontext
from typing import Any

__all__ = ["QUEUE", "SCHEMA", "TASK", "migrate_queue", "run_worker", "send", "send_all"]

log = logging.getLogger("flowstone.workers")

SCHEMA = "flowstone_queue"
QUEUE = "flowstone"
TASK = "flowstone.materialize"


def _app(dsn: str) -> Any:
    """A procrastinate App on ``dsn`` whose connections see the queue's schema only."""
    import procrastinate

    connector = procrastinate.PsycopgConnector(conninfo=dsn, kwargs={"options": f"-c search_path={SCHEMA}"})
    return procrastinate.App(connector=connector)


def _declare(app: Any, run: Any) -> Any:
    """The one task: ``run(tenant, asset, partition)``, as procrastinate knows it."""
    return app.task(name=TASK, queue=QUEUE, pass_context=False)(run)


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


async def send(dsn: str, asset: str, partition: str | None = None) -> int | None:
    """Enqueue one materialization of ``asset`` at ``partition`` (its key) in the caller's
    tenant; the job's id, or None when the same one is already waiting."""
    [job] = await send_all(dsn, asset, [partition])
    return job


async def send_all(dsn: str, asset: str, partitions: Iterable[str | None]) -> list[int | None]:
    """``send`` for each of ``partitions``, over one connection pool."""
    from procrastinate.exceptions import AlreadyEnqueued

    from ..tenancy import current_tenant

    tenant = current_tenant()
    app = _app(dsn)
    task = _declare(app, _never_here)
    jobs: list[int | None] = []
    async with app.open_async():
        for partition in partitions:
            lock = f"{tenant or ''}\x1f{asset}\x1f{partition or ''}"
            try:
                jobs.append(await task.configure(queueing_lock=lock).defer_async(
                    tenant=tenant, asset=asset, partition=partition))
            except AlreadyEnqueued:
                jobs.append(None)
    return jobs


async def _never_here(tenant: str | None, asset: str, partition: str | None) -> None:
    raise RuntimeError("materialization jobs run in flowstone worker processes")


async def run_worker(
    dsn: str, rt: Any, *, concurrency: int = 4, tenants: Collection[str | None] | None = None,
    name: str | None = None,
) -> None:
    """Execute materialization jobs on ``rt`` until SIGTERM/SIGINT (procrastinate's own
    graceful stop: jobs in flight finish). ``tenants``: the only tenants whose jobs this
    worker takes (None: any); a job of another is refused, and fails."""
    from ..errors import AccessDenied, MaterializationFailed
    from ..tenancy import tenant_scope

    app = _app(dsn)
    definitions = {asset.name: asset.partitioned_by for asset in await rt.assets()}

    async def materialize(tenant: str | None, asset: str, partition: str | None) -> None:
        if tenants is not None and tenant not in tenants:
            refused = AccessDenied(asset, "materialize", tenant, reason="this worker does not serve that tenant")
            log.error("job %s @ %s (tenant %s) refused: %s", asset, partition, tenant, refused)
            raise refused
        definition = definitions.get(asset)
        value = definition.validate(partition) if definition is not None and partition is not None else partition
        with tenant_scope(tenant) if tenant else nullcontext():
            try:
                result = await rt.materialize(asset, value)
            except MaterializationFailed as failure:  # the asset's failure: recorded, not the queue's
                log.warning("job %s @ %s (tenant %s) failed: %s", asset, partition, tenant, failure)
                return
        log.info("job %s @ %s (tenant %s): %s", asset, partition, tenant,
                 "up to date" if asset in result.skipped else "materialized")

    _declare(app, materialize)
    async with app.open_async():
        log.info("worker %s: taking jobs from %s.%s (%d at a time)", name or "worker", SCHEMA, QUEUE, concurrency)
        await app.run_worker_async(queues=[QUEUE], concurrency=concurrency, name=name, wait=True,
                                   install_signal_handlers=True, delete_jobs="successful")

