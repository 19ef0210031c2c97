"""Work on other machines (first part): materializations sent through procrastinate to
real ``flowstone worker`` processes over one PostgreSQL; records stay the truth."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import anyio
import pytest
from followed import Followed
from pgfixtures import APP_ROLE, run_sync
from waiting import until

import flowstone as fs
from flowstone.store import PostgresStore, Status
from flowstone.workers.queue import migrate_queue, send

pytestmark = pytest.mark.anyio

PIPELINE = '''
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 1, 31))
pipeline = fs.Pipeline("queued")

@pipeline.asset(partitioned_by=days, code_version="1")
async def events(ctx, deps):
    if ctx.partition_key == "2026-01-13":
        raise ValueError("bad data on the 13th")
    return ctx.partition.day
'''

SECONDS = 60


class Worker(Followed):
    """A ``flowstone worker`` process on ``dsn``, for the ``queued`` pipeline."""

    def __init__(self, folder: Path, dsn: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "FLOWSTONE_PIPELINE"}
        env.update(FLOWSTONE_DSN=dsn, FLOWSTONE_PIPELINE="queued:pipeline")
        super().__init__(folder, env, "worker", *args)


async def _queue(pg_database) -> None:
    """The queue's schema, made by the database's owner, used by the plain role."""
    await anyio.to_thread.run_sync(run_sync, functools.partial(migrate_queue, pg_database.admin_dsn,
                                                               grant_to=[APP_ROLE]))


async def test_a_worker_process_materializes_what_was_sent_once_each(anyio_backend, pg_database, tmp_path):
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    days = [f"2026-01-{d:02d}" for d in range(1, 21)]

    async def enqueue() -> list:
        return [await send(pg_database.dsn, "events", day) for day in days] + [
            await send(pg_database.dsn, "events", days[0])]  # the same job, still waiting: not sent twice

    jobs = await anyio.to_thread.run_sync(run_sync, enqueue)
    assert all(isinstance(job, int) for job in jobs[:-1]) and jobs[-1] is None
    worker = Worker(tmp_path, pg_database.dsn, "--concurrency", "4")
    try:
        worker.wait_for(r"job events @ \S+ \(tenant None\)", count=len(days))  # each job's outcome is logged
        assert worker.stop() == 0, worker.seen  # SIGTERM: a graceful stop
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
    async with PostgresStore(pg_database.dsn) as store:
        states = await store.partition_states("events")
        successes = await store.list_by_status(Status.SUCCESS, limit=100)
    assert states == {day: (Status.FAILED if day == "2026-01-13" else Status.SUCCESS) for day in days}
    assert sorted(r.partition for r in successes) == sorted(d for d in days if d != "2026-01-13")  # one each
    left = await anyio.to_thread.run_sync(run_sync, _jobs_left, pg_database.admin_dsn)
    assert left == []  # done jobs are deleted; nothing waits or runs


async def _jobs_left(dsn: str) -> list:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await connection.fetch(
            "SELECT id, status FROM flowstone_queue.procrastinate_jobs WHERE status IN ('todo', 'doing')")]
    finally:
        await connection.close()


async def test_a_worker_refuses_a_tenant_it_does_not_serve(anyio_backend, pg_database, tmp_path):
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)

    async def enqueue() -> None:
        with fs.tenant_scope("globex"):
            await send(pg_database.dsn, "events", "2026-01-02")
        with fs.tenant_scope("acme"):
            await send(pg_database.dsn, "events", "2026-01-03")

    await anyio.to_thread.run_sync(run_sync, enqueue)
    worker = Worker(tmp_path, pg_database.dsn, "--serve-tenant", "acme")
    try:
        worker.wait_for_all(r"job events @ 2026-01-03 \(tenant acme\): materialized",
                            r"job events @ 2026-01-02 \(tenant globex\) refused: access denied")
        assert worker.stop() == 0, worker.seen
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
    async with PostgresStore(pg_database.dsn) as store:
        with fs.tenant_scope("globex"):
            assert await store.partition_states("events") == {}  # refused: nothing ran for it
        with fs.tenant_scope("acme"):
            assert await store.partition_states("events") == {"2026-01-03": Status.SUCCESS}


GATED = PIPELINE + '''
import fcntl
import os

@pipeline.asset(partitioned_by=days, code_version="1")
def gated(ctx, deps):
    with open(os.environ["GATE"]) as gate:  # waits while the test holds the gate's lock
        fcntl.flock(gate, fcntl.LOCK_SH)
    return 1
'''


async def test_a_worker_stopped_with_sigterm_finishes_its_job_first(anyio_backend, pg_database, tmp_path):
    import fcntl

    (tmp_path / "queued.py").write_text(GATED)
    gate = tmp_path / "gate"
    gate.touch()
    await _queue(pg_database)
    held = open(gate)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.environ["GATE"] = str(gate)  # the worker's environment is copied from this one
    try:
        worker = Worker(tmp_path, pg_database.dsn)
        try:
            worker.wait_for(r"taking jobs")
            await anyio.to_thread.run_sync(run_sync, functools.partial(send, pg_database.dsn, "gated", "2026-01-05"))

            async def running() -> bool:
                async with PostgresStore(pg_database.dsn) as store:
                    return (await store.partition_states("gated")).get("2026-01-05") is Status.RUNNING

            await until(running, limit=SECONDS)  # the job is inside the asset function
            worker.process.send_signal(signal.SIGTERM)
            worker.wait_for(r"Waiting for job to finish")  # stopping, and the job still runs
            fcntl.flock(held, fcntl.LOCK_UN)  # now it may finish
            assert worker.process.wait(timeout=SECONDS) == 0, worker.seen  # no second signal needed
            worker.stop()
        finally:
            if worker.process.poll() is None:
                worker.process.kill()
    finally:
        held.close()
        del os.environ["GATE"]
    async with PostgresStore(pg_database.dsn) as store:
        assert await store.partition_states("gated") == {"2026-01-05": Status.SUCCESS}
    assert await anyio.to_thread.run_sync(run_sync, _jobs_left, pg_database.admin_dsn) == []
