"""Approval gates (SPEC 7): requires_approval parks a materialization until approved or rejected."""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.store import Status
from flowstone.testing import kill_actor

pytestmark = pytest.mark.anyio



def gated(calls: list[int]) -> fs.Pipeline:
    async def publish(ctx, deps):
        calls.append(1)
        return "published"

    return fs.Pipeline("p", assets=[fs.Asset(name="publish", execute_fn=publish, requires_approval=True)])


@asynccontextmanager
async def parked(rt):
    """Start materializing 'publish'; yield its record (waiting for approval) and
    the outcome the materialization will leave once decided."""
    outcome: dict = {}

    async def run():
        try:
            outcome["result"] = await rt.materialize("publish")
        except fs.FlowstoneError as error:
            outcome["error"] = error

    async def waiting():
        return bool(await rt.store.list_by_status(Status.WAITING_APPROVAL))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await until(waiting)
        (record,) = await rt.store.list_by_status("waiting_approval")
        yield record, outcome


async def test_approval_lets_the_materialization_run(anyio_backend):
    calls: list[int] = []
    async with fs.open_runtime(gated(calls)) as rt:
        async with parked(rt) as (record, outcome):
            assert calls == []  # nothing runs before approval
            await rt.approve(str(record.id))
        assert calls == [1]
        assert outcome["result"].materializations["publish"].status is Status.SUCCESS


async def test_rejection_fails_it_with_the_reason(anyio_backend):
    calls: list[int] = []
    async with fs.open_runtime(gated(calls)) as rt:
        async with parked(rt) as (record, outcome):
            await rt.reject(record.id, "numbers look wrong")
        assert calls == []
        assert isinstance(outcome["error"], fs.MaterializationFailed)
        assert "rejected: numbers look wrong" in str(outcome["error"])
        assert (await rt.store.get_by_id(record.id)).status is Status.FAILED


async def test_approving_what_is_not_waiting_is_refused(anyio_backend):
    async with fs.open_runtime([fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)]) as rt:
        done = (await rt.materialize("a")).materializations["a"]
        with pytest.raises(fs.InvalidTransition, match="not waiting for approval"):
            await rt.approve(done.id)
        with pytest.raises(fs.NotFound):
            await rt.approve("00000000-0000-0000-0000-000000000000")


async def test_a_crash_of_the_executor_fails_what_waits_for_approval(anyio_backend):
    calls: list[int] = []
    async with fs.open_runtime(gated(calls)) as rt:
        async with parked(rt) as (record, outcome):
            await kill_actor(rt, "executor:publish")
        assert calls == []
        error = outcome["error"]
        assert isinstance(error, fs.MaterializationFailed) and isinstance(error.__cause__, fs.ActorCrashed)
        failed = await rt.store.get_by_id(record.id)
        assert failed.status is Status.FAILED and "ActorCrashed" in failed.error_message
        async with parked(rt) as (again, later):  # the restarted executor gates new runs again
            await rt.approve(again.id)
        assert later["result"].materializations["publish"].status is Status.SUCCESS
        assert calls == [1]


async def test_a_decision_made_by_another_process_reaches_the_waiting_one(anyio_backend, tmp_path):
    """Two runtimes over one SQLite file, as two processes would be: the one that waits
    finds the other's decision in the store."""
    calls: list[int] = []
    path = tmp_path / "flowstone.db"
    async with fs.store.SqliteStore(path) as mine, fs.store.SqliteStore(path) as theirs:
        async with fs.open_runtime(gated(calls), store=mine) as waiting, fs.open_runtime(
            gated([]), store=theirs
        ) as elsewhere:
            async with parked(waiting) as (record, outcome):
                await elsewhere.approve(record.id)
                with pytest.raises(fs.InvalidTransition, match="decided already"):
                    await elsewhere.reject(record.id, "too late")
            assert outcome["result"].materializations["publish"].status is Status.SUCCESS
            assert calls == [1]
