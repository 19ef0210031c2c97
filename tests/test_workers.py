"""Work on other machines: materializations and whole backfills sent through
procrastinate to real ``flowstone worker`` processes over one PostgreSQL; records stay
the truth, and a worker killed mid-job loses nothing."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest
from backends import ASYNCIO
from followed import Followed
from pgfixtures import APP_ROLE, run_sync
from waiting import until

import flowstone as fs
from flowstone.store import PostgresStore, Status
from flowstone.workers import Queue
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


class Command(Followed):
    """``flowstone *args`` on ``dsn``, for the ``queued`` pipeline."""

    def __init__(self, folder: Path, dsn: str, *args: str, stdout: int = subprocess.DEVNULL) -> None:
        env = {k: v for k, v in os.environ.items() if k != "FLOWSTONE_PIPELINE"}
        env.update(FLOWSTONE_DSN=dsn, FLOWSTONE_PIPELINE="queued:pipeline")
        super().__init__(folder, env, *args, stdout=stdout)


class Worker(Command):
    """A ``flowstone worker`` process."""

    def __init__(self, folder: Path, dsn: str, *args: str) -> None:
        super().__init__(folder, dsn, "worker", *args)


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


def _load(path: Path) -> fs.Pipeline:
    """The pipeline the workers run, loaded here too (under a name of its own)."""
    spec = importlib.util.spec_from_file_location(f"queued_{os.getpid()}_{id(path)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pipeline


async def test_a_backfill_on_workers_runs_there_and_reports_as_a_local_one(anyio_backend, pg_database, tmp_path):
    """The Python API, from asyncio and from trio (the queue through the bridge)."""
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    workers = [Worker(tmp_path, pg_database.dsn, "--concurrency", "2") for _ in range(2)]
    try:
        for worker in workers:
            worker.wait_for(r"taking jobs")
        async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue, \
                fs.open_runtime(_load(tmp_path / "queued.py"), store=store, queue=queue) as rt:
            async with rt.events(kinds=["BackfillProgress", "BackfillFinished"]) as events:
                backfill = await rt.backfill("events", max_parallel=4)  # on the workers: the runtime has a queue
                progress = []
                async for event in events:
                    progress.append(event)
                    if isinstance(event, fs.events.BackfillFinished):
                        break
            status = await rt.wait_backfill(backfill)
            successes = await store.list_by_status(Status.SUCCESS, limit=100)
            [failure] = await store.list_by_status(Status.FAILED, limit=100)
            [saved] = await store.list_backfills()
        for worker in workers:
            assert worker.stop() == 0, worker.seen
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
    assert (status.state, status.total, status.succeeded, status.failed) == ("failed", 31, 30, 1)
    [(key, message)] = status.errors
    assert key == "2026-01-13" and "bad data on the 13th" in message  # the worker's record, read back here
    assert failure.partition == "2026-01-13"
    assert sorted(r.partition for r in successes) == [f"2026-01-{d:02d}" for d in range(1, 32) if d != 13]
    pids = {str(worker.process.pid) for worker in workers}
    assert {r.executor_node.split(":")[1] for r in successes} <= pids  # computed by the workers, not here
    running = [e.running for e in progress if isinstance(e, fs.events.BackfillProgress)]
    assert max(running) <= 4  # at most max_parallel enqueued
    assert progress[-1].succeeded == 30 and saved.status.succeeded == 30  # the same status, events and store
    assert await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn) == []


async def _queue_rows(dsn: str) -> list:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await connection.fetch("SELECT id, status FROM flowstone_queue.procrastinate_jobs")]
    finally:
        await connection.close()


async def test_a_backfill_goes_to_workers_only_through_a_queue_and_with_the_assets_own_io(anyio_backend):
    pipeline = fs.Pipeline("p")

    @pipeline.asset(partitioned_by=fs.StaticPartitions(["a", "b"]))
    def letters(ctx, deps):
        return ctx.partition_key

    async with fs.open_runtime(pipeline) as rt:
        with pytest.raises(fs.DefinitionError, match="no queue"):
            await rt.backfill("letters", workers=True)
    async with Queue("postgresql://nobody@127.0.0.1:1/none") as queue, fs.open_runtime(pipeline, queue=queue) as rt:
        with pytest.raises(fs.DefinitionError, match="IO manager overrides stay in this process"):
            await rt.backfill("letters", io={"letters": "memory"})
        local = await rt.backfill("letters", workers=False)  # nothing reaches the queue (nobody listens there)
        assert (await rt.wait_backfill(local)).succeeded == 2


KILLED = '''
import fcntl
import os
import sys
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2020, 1, 1), end=date(2025, 6, 22))  # 2,000 days
pipeline = fs.Pipeline("queued")

@pipeline.asset(partitioned_by=days, code_version="1")
def daily(ctx, deps):
    if ctx.partition_key == "2021-09-01":
        (open(os.path.join(os.environ["STARTED"], str(os.getpid())), "w")).close()  # who runs it
        with open(os.environ["GATE"]) as gate:  # waits while the test holds the gate's lock
            fcntl.flock(gate, fcntl.LOCK_SH)
    return ctx.partition_key
'''


@pytest.mark.parametrize("anyio_backend", [ASYNCIO])  # the sender is a process of its own here
async def test_four_workers_run_2000_partitions_and_one_killed_mid_job_loses_nothing(
    anyio_backend, pg_database, tmp_path,
):
    """``flowstone backfill --workers`` over four workers; the one running a gated
    partition is SIGKILLed inside it. Its jobs go back to the queue once its heartbeat
    is missed, its lease lapses, another worker takes the partition over: every
    partition ends with exactly one success, and no job, lease or worker row is left."""
    import fcntl

    (tmp_path / "queued.py").write_text(KILLED)
    gate, started = tmp_path / "gate", tmp_path / "started"
    gate.touch()
    started.mkdir()
    await _queue(pg_database)
    held = open(gate)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.environ.update(GATE=str(gate), STARTED=str(started))  # copied into every process started here
    processes: list[Followed] = []
    try:
        workers = [Worker(tmp_path, pg_database.dsn, "--concurrency", "4", "--lease-seconds", "3") for _ in range(4)]
        processes += workers
        for worker in workers:
            worker.wait_for(r"taking jobs")
        sender = Command(tmp_path, pg_database.dsn, "backfill", "daily", "--workers", "--max-parallel", "16",
                         "--json", stdout=subprocess.PIPE)
        processes.append(sender)

        async def gated() -> bool:
            await anyio.sleep(0)
            return any(started.iterdir())

        await until(gated, limit=SECONDS)  # a worker is inside the gated partition
        [victim] = [w for w in workers if str(w.process.pid) == next(started.iterdir()).name]
        victim.stop(signal.SIGKILL)
        fcntl.flock(held, fcntl.LOCK_UN)  # the next worker to take that partition may finish it
        sender.process.wait(timeout=300)
        assert sender.process.stdout is not None
        summary = json.loads(sender.process.stdout.read())
        assert sender.stop() == 0, (summary, sender.seen)
        for worker in workers:
            if worker is not victim:
                assert worker.stop() == 0, worker.seen
    finally:
        held.close()
        for name in ("GATE", "STARTED"):
            del os.environ[name]
        for process in processes:
            if process.process.poll() is None:
                process.process.kill()
    assert (summary["state"], summary["total"], summary["succeeded"], summary["failed"]) == ("succeeded", 2000, 2000, 0)
    rows = await anyio.to_thread.run_sync(run_sync, _after_the_kill, pg_database.admin_dsn)
    assert rows["successes"] == {1: 2000}  # partitions by their number of successes: each has one
    assert rows["orphaned"] >= 1  # the gated partition's record, closed when its lease was taken over
    assert rows["left"] == {"leases": 0, "jobs": 0, "workers": 0}


async def _after_the_kill(dsn: str) -> dict:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        per_partition = await connection.fetch(
            "SELECT partition, count(*) AS n FROM flowstone_materializations WHERE asset_name = 'daily' "
            "AND status IN ('success', 'superseded') GROUP BY partition")
        orphaned = await connection.fetchval(
            "SELECT count(*) FROM flowstone_materializations WHERE status = 'failed' "
            "AND error_message LIKE 'orphaned%'")
        left = {name: await connection.fetchval(f"SELECT count(*) FROM {rows}") for name, rows in (
            ("leases", "flowstone_leases WHERE owner <> ''"),  # a released lease keeps its row, with no owner
            ("jobs", "flowstone_queue.procrastinate_jobs"), ("workers", "flowstone_queue.procrastinate_workers"))}
    finally:
        await connection.close()
    counts: dict[int, int] = {}
    for row in per_partition:
        counts[row["n"]] = counts.get(row["n"], 0) + 1
    return {"successes": counts, "orphaned": orphaned, "left": left}


async def test_cancelling_a_backfill_on_workers_takes_back_its_waiting_jobs(anyio_backend, pg_database, tmp_path):
    """No worker runs: the jobs wait in the queue, max_parallel of them; a
    cancel withdraws them, and the backfill ends cancelled with nothing left queued."""
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue, \
            fs.open_runtime(_load(tmp_path / "queued.py"), store=store, queue=queue) as rt:
        backfill = await rt.backfill("events", max_parallel=3)

        async def three_waiting() -> bool:
            await anyio.sleep(0)
            return len(await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn)) == 3

        await until(three_waiting, limit=SECONDS)
        status = await rt.cancel_backfill(backfill)
    assert (status.state, status.succeeded, status.cancelled) == ("cancelled", 0, 31)
    assert await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn) == []


async def test_the_daemon_hands_the_jobs_of_a_dead_worker_back_to_the_queue(anyio_backend, pg_database, tmp_path):
    """The state a worker killed mid-job leaves: its job ``doing``, its heartbeat old.
    The active daemon of a runtime with a queue puts the job back to ``todo``."""
    from flowstone.runtime.daemon import run_daemon

    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue, \
            fs.open_runtime(_load(tmp_path / "queued.py"), store=store, queue=queue) as rt:
        job = (await queue.enqueue(None, "events", "2026-01-07")).job
        await anyio.to_thread.run_sync(run_sync, functools.partial(_died_doing, pg_database.admin_dsn, job))
        assert await queue.states([job]) == {job: "doing"}
        stop = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_daemon(rt, stop=stop, owner="d"))

            async def handed_back() -> bool:
                await anyio.sleep(0)
                return await queue.states([job]) == {job: "todo"}

            await until(handed_back, limit=SECONDS)
            stop.set()


async def _died_doing(dsn: str, job: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, server_settings={"search_path": "flowstone_queue"})
    try:
        worker = await connection.fetchval(
            "INSERT INTO flowstone_queue.procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') "
            "RETURNING id")
        await connection.execute(
            "UPDATE flowstone_queue.procrastinate_jobs SET status = 'doing', worker_id = $1 "
            "WHERE id = $2", worker, job)
    finally:
        await connection.close()


async def _interrupted_on_workers(pg_database, pipeline, store, queue) -> Any:
    """A backfill on workers whose process stopped while no worker ran: saved
    interrupted, its waiting jobs taken back."""
    async with fs.open_runtime(pipeline, store=store, queue=queue) as rt:
        backfill = await rt.backfill("events", [date(2026, 1, d) for d in (1, 2, 3)], max_parallel=2)

        async def two_waiting() -> bool:
            await anyio.sleep(0)
            return len(await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn)) == 2

        await until(two_waiting, limit=SECONDS)
    assert (await store.load_backfill(backfill)).status.interrupted
    assert await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn) == []
    return backfill


async def test_a_backfill_saved_as_on_workers_is_resumed_on_the_workers(anyio_backend, pg_database, tmp_path):
    """Resumed by a runtime with a queue, it goes to the workers again: the spec keeps
    where it runs."""
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    pipeline = _load(tmp_path / "queued.py")
    async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue:
        backfill = await _interrupted_on_workers(pg_database, pipeline, store, queue)
        worker = Worker(tmp_path, pg_database.dsn)
        try:
            worker.wait_for(r"taking jobs")
            async with fs.open_runtime(pipeline, store=store, queue=queue) as rt:
                await rt.resume_backfill(backfill)
                status = await rt.wait_backfill(backfill)
            assert worker.stop() == 0, worker.seen
        finally:
            if worker.process.poll() is None:
                worker.process.kill()
        successes = await store.list_by_status(Status.SUCCESS, limit=10)
    assert (status.state, status.succeeded) == ("succeeded", 3)
    assert {r.executor_node.split(":")[1] for r in successes} == {str(worker.process.pid)}


async def test_a_runtime_without_a_queue_resumes_a_backfill_on_workers_here(anyio_backend, pg_database, tmp_path,
                                                                              caplog):
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    pipeline = _load(tmp_path / "queued.py")
    async with PostgresStore(pg_database.dsn) as store:
        async with Queue(pg_database.dsn) as queue:
            backfill = await _interrupted_on_workers(pg_database, pipeline, store, queue)
        async with fs.open_runtime(pipeline, store=store) as rt:
            await rt.resume_backfill(backfill)
            status = await rt.wait_backfill(backfill)
        successes = await store.list_by_status(Status.SUCCESS, limit=10)
    assert (status.state, status.succeeded) == ("succeeded", 3)
    assert {r.executor_node.split(":")[1] for r in successes} == {str(os.getpid())}
    assert "this runtime has no queue: running it here" in caplog.text


UPSTREAM = PIPELINE + '''
import os

@pipeline.asset(partitioned_by=days, code_version="1")
def raw(ctx, deps):
    if os.path.exists("broken"):  # in the worker's folder
        raise ValueError("the source is broken")
    return 1

@pipeline.asset(depends_on=["raw"], partitioned_by=days, code_version="1")
def clean(ctx, deps):
    return deps["raw"] + 1
'''


async def test_an_upstream_failure_on_a_worker_fails_the_partition_though_it_succeeded_before(
    anyio_backend, pg_database, tmp_path,
):
    """The outcome comes from the records of the job's own run, not from the
    partition's latest record (still the earlier success when an upstream fails)."""
    (tmp_path / "queued.py").write_text(UPSTREAM)
    await _queue(pg_database)
    days = [date(2026, 1, d) for d in (1, 2, 3)]
    worker = Worker(tmp_path, pg_database.dsn)
    try:
        worker.wait_for(r"taking jobs")
        async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue, \
                fs.open_runtime(_load(tmp_path / "queued.py"), store=store, queue=queue) as rt:
            first = await rt.wait_backfill(await rt.backfill("clean", days))
            (tmp_path / "broken").touch()
            second = await rt.wait_backfill(await rt.backfill("clean", days, upstream="all"))
        assert worker.stop() == 0, worker.seen
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
    assert (first.state, first.succeeded) == ("succeeded", 3)
    assert (second.state, second.failed) == ("failed", 3)
    assert all("raw @ 2026-01-0" in message and "the source is broken" in message for _, message in second.errors)


async def test_a_job_lost_from_the_queue_is_sent_again(anyio_backend, pg_database, tmp_path):
    """A waiting job deleted behind the backfill's back (no record, no success): the
    backfill sends its partition again, and a worker started later finishes them all."""
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue, \
            fs.open_runtime(_load(tmp_path / "queued.py"), store=store, queue=queue) as rt:
        backfill = await rt.backfill("events", [date(2026, 1, d) for d in (1, 2, 3)], max_parallel=3)

        async def waiting() -> list:
            await anyio.sleep(0)
            return await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn)

        async def three_waiting() -> bool:
            return len(await waiting()) == 3

        await until(three_waiting, limit=SECONDS)
        lost = min(job for job, _ in await waiting())
        await anyio.to_thread.run_sync(run_sync, functools.partial(_delete_job, pg_database.admin_dsn, lost))

        async def sent_again() -> bool:
            jobs = [job for job, _ in await waiting()]
            return len(jobs) == 3 and lost not in jobs

        await until(sent_again, limit=SECONDS)
        worker = Worker(tmp_path, pg_database.dsn)
        try:
            status = await rt.wait_backfill(backfill)
            assert worker.stop() == 0, worker.seen
        finally:
            if worker.process.poll() is None:
                worker.process.kill()
    assert (status.state, status.succeeded) == ("succeeded", 3)


async def _delete_job(dsn: str, job: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, server_settings={"search_path": "flowstone_queue"})  # its triggers'
    try:
        await connection.execute("DELETE FROM procrastinate_jobs WHERE id = $1", job)
    finally:
        await connection.close()


async def test_a_job_refused_by_every_worker_fails_its_partition_after_three_tries(
    anyio_backend, pg_database, tmp_path,
):
    (tmp_path / "queued.py").write_text(PIPELINE)
    await _queue(pg_database)
    worker = Worker(tmp_path, pg_database.dsn, "--serve-tenant", "acme")
    try:
        worker.wait_for(r"taking jobs")
        async with PostgresStore(pg_database.dsn) as store, Queue(pg_database.dsn) as queue, \
                fs.open_runtime(_load(tmp_path / "queued.py"), store=store, queue=queue) as rt:
            with fs.tenant_scope("globex"):
                status = await rt.wait_backfill(await rt.backfill("events", [date(2026, 1, 2)]))
                assert await store.partition_states("events") == {}  # nothing ran for globex
        refusals = worker.wait_for(r"job events @ 2026-01-02 \(tenant globex\) refused", count=3)
        assert worker.stop() == 0, worker.seen
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
    assert (status.state, status.failed) == ("failed", 1) and len(refusals) == 3
    [(key, message)] = status.errors
    assert key == "2026-01-02" and "failed or was lost in the queue 3 times" in message
    assert await anyio.to_thread.run_sync(run_sync, _queue_rows, pg_database.admin_dsn) == []  # withdrawn


async def test_a_queue_never_made_is_a_clear_error(anyio_backend, pg_database):
    async with Queue(pg_database.dsn) as queue:
        with pytest.raises(fs.DatabaseError, match="migrate_queue"):
            await queue.states([1])
