"""Supervision (SPEC 7): crashed actors restart, waiters get ActorCrashed, too many crashes fail loudly."""

from __future__ import annotations

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.actors.supervisor import RestartPolicy
from flowstone.store import Status
from flowstone.testing import kill_actor

pytestmark = pytest.mark.anyio



def simple() -> fs.Pipeline:
    return fs.Pipeline("p", assets=[fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)])


async def test_the_caller_whose_request_crashes_the_store_gets_actor_crashed(anyio_backend):
    from flowstone.actors.mailbox import Crash, CrashRequested

    async with fs.open_runtime(simple()) as rt:
        with pytest.raises(fs.ActorCrashed, match="memory-store") as info:
            await rt.store.handle.call(Crash, reason="a bug")
        assert isinstance(info.value.__cause__, CrashRequested)


async def test_a_restarted_store_keeps_every_record_and_value(anyio_backend):
    async with fs.open_runtime(simple()) as rt:
        first = await rt.materialize("a")
        await kill_actor(rt, "memory-store")
        assert (await rt.store.get_by_id(first.materializations["a"].id)).status is Status.SUCCESS
        assert await rt.load("a") == 1
        assert (await rt.materialize("a")).skipped == ("a",)


async def test_a_restarted_registry_still_knows_every_asset(anyio_backend):
    async with fs.open_runtime(simple()) as rt:
        await kill_actor(rt, "registry")
        assert [a.name for a in await rt.assets()] == ["a"]
        await rt.materialize("a")


async def test_callers_waiting_on_a_crashed_executor_get_actor_crashed_and_it_restarts(anyio_backend):
    started, release = anyio.Event(), anyio.Event()

    async def slow(ctx, deps):
        started.set()
        await release.wait()
        return ctx.partition_key

    daily = fs.StaticPartitions(["x", "y"])
    asset = fs.Asset(name="slow", execute_fn=slow, partitioned_by=daily, max_concurrency=1)
    async with fs.open_runtime([asset]) as rt:
        outcomes = {}

        async def run(key):
            try:
                outcomes[key] = (await rt.materialize("slow", key)).materializations["slow"].status
            except fs.ActorCrashed as error:
                outcomes[key] = error

        async def queued():
            return (await rt.statistics())["slow"].queued == 1

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, "x")
            await started.wait()
            tasks.start_soon(run, "y")  # waits for the only slot
            await until(queued)
            await kill_actor(rt, "executor:slow")
            await until(lambda: _has(outcomes, "y"))
            release.set()
        assert isinstance(outcomes["y"], fs.ActorCrashed)  # it was waiting on the executor
        assert outcomes["x"] is Status.SUCCESS  # it was already running in its caller's task
        again = await rt.materialize("slow", "y")  # the executor is back
        assert again.materializations["slow"].status is Status.SUCCESS


async def _has(mapping, key):
    return key in mapping


async def test_too_many_crashes_fail_the_whole_runtime_loudly(anyio_backend):
    with pytest.raises(fs.ActorCrashed, match="giving up"):
        async with fs.open_runtime(simple(), restart_policy=RestartPolicy(max_restarts=2, window=60)) as rt:
            for _ in range(3):
                await kill_actor(rt, "memory-store")
            await anyio.Event().wait()  # the failing runtime cancels this block


async def test_unknown_actor_names_are_not_found(anyio_backend):
    async with fs.open_runtime(simple()) as rt:
        with pytest.raises(fs.NotFound, match="executor:<asset>"):
            await kill_actor(rt, "executor:nope")


async def test_an_actor_spawned_without_waiting_answers_at_once_and_closes_its_mailbox(anyio_backend):
    from flowstone.actors.supervisor import spawn
    from flowstone.runtime.executor import Stats, executor_actor

    asset = fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)
    async with anyio.create_task_group() as tasks:
        handle = spawn(tasks, "executor:a", executor_actor(asset), RestartPolicy())
        assert handle.try_cast(Stats())  # queued before the actor's task has begun
        assert (await handle.call(Stats)).in_flight == 0
        tasks.cancel_scope.cancel()
    with pytest.raises(fs.RuntimeClosed):
        handle.try_cast(Stats())
    # Cancelled before its task could begin: the task still begins, and closes its mailbox.
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            scope.cancel()
            unborn = spawn(tasks, "executor:b", executor_actor(asset), RestartPolicy())
    with pytest.raises(fs.RuntimeClosed):
        unborn.try_cast(Stats())


async def test_an_actor_spawned_on_demand_starts_with_its_first_message(anyio_backend):
    import gc

    from flowstone.actors.supervisor import spawn_on_demand
    from flowstone.runtime.executor import Stats, executor_actor

    asset = fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)
    async with anyio.create_task_group() as tasks:
        handle = spawn_on_demand(tasks, "executor:a", executor_actor(asset), RestartPolicy())
        assert handle.waking.send is None  # nor is its mailbox opened before a message
        await anyio.sleep(0)
        assert [t.name for t in anyio.get_running_tasks() if t.name == "executor:a"] == []
        assert (await handle.call(Stats)).in_flight == 0  # the call started it, and it answered
        assert [t.name for t in anyio.get_running_tasks() if t.name == "executor:a"] == ["executor:a"]
        handle.close()
    with pytest.raises(fs.RuntimeClosed):
        handle.try_cast(Stats())
    # Never asked anything: closing it closes both ends of its mailbox (an unclosed
    # stream would warn when collected, and warnings fail this suite).
    async with anyio.create_task_group() as tasks:
        idle = spawn_on_demand(tasks, "executor:b", executor_actor(asset), RestartPolicy())
    idle.close()
    assert idle.waking.send is None  # not opened just to be closed: a runtime closes one per asset
    with pytest.raises(fs.RuntimeClosed):
        await idle.cast(Stats())  # nothing starts it once closed
    with pytest.raises(fs.RuntimeClosed):
        idle.try_cast(Stats())
    del idle
    gc.collect()
