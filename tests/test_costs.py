"""The message budget of a materialization: what the speed figures rest on (ADR 0005).

Not timings (those live in stress/, on a noisy machine): counts. A fresh chain
must cost each asset three writes (create, value, completion), handled in place
(no message: nothing else waits for the memory-store actor, ADR 0038), and no
message for its lease (taken from and handed back to the executor's gate
directly), plus a constant per run, and must start no task.
"""

from __future__ import annotations

import collections

import anyio
import pytest

import flowstone as fs
from flowstone.actors import mailbox
from flowstone.store.memory_actor import InPlace

pytestmark = pytest.mark.anyio

LENGTH = 20


def chain() -> list[fs.Asset]:
    async def step(ctx, deps):
        return 1

    return [
        fs.Asset(name=f"a{i}", depends_on=(f"a{i - 1}",) if i else (), execute_fn=step) for i in range(LENGTH)
    ]


@pytest.fixture
def counted(monkeypatch):
    counts: collections.Counter[str] = collections.Counter()
    request, cast, try_cast = mailbox.Handle.request, mailbox.Handle.cast, mailbox.Handle.try_cast

    async def counting_request(self, message_type, /, **fields):
        counts[f"request {message_type.__name__}"] += 1
        return await request(self, message_type, **fields)

    async def counting_cast(self, message):
        counts[f"cast {type(message).__name__}"] += 1
        return await cast(self, message)

    def counting_try_cast(self, message):
        counts[f"cast {type(message).__name__}"] += 1
        return try_cast(self, message)

    apply = InPlace.apply

    def counting_apply(self, actor, message):
        counts[f"in place {type(message).__name__}"] += 1
        return apply(self, actor, message)

    monkeypatch.setattr(mailbox.Handle, "request", counting_request)
    monkeypatch.setattr(mailbox.Handle, "cast", counting_cast)
    counted_cast = mailbox.CountedHandle.cast

    async def counting_counted_cast(self, message):
        counts[f"cast {type(message).__name__}"] += 1
        return await counted_cast(self, message)

    monkeypatch.setattr(mailbox.CountedHandle, "cast", counting_counted_cast)
    monkeypatch.setattr(mailbox.Handle, "try_cast", counting_try_cast)
    monkeypatch.setattr(InPlace, "apply", counting_apply)
    return counts


async def test_a_fresh_chain_costs_three_writes_in_place_per_asset_and_no_message_for_leases(
    anyio_backend, counted
):
    async with fs.open_runtime(chain()) as rt:
        counted.clear()
        result = await rt.materialize(f"a{LENGTH - 1}")
        assert len(result.materializations) == LENGTH and not result.skipped
        assert dict(counted) == {
            "request GetSnapshot": 1,
            "request LatestSuccesses": 1,
            "in place Create": LENGTH,
            "in place PutValue": LENGTH,
            "in place Replace": LENGTH,
        }
        stats = await rt.statistics()
        assert all(s.in_flight == 0 for s in stats.values())  # every lease was handed back


async def test_a_chain_with_nothing_to_do_costs_two_requests_in_all(anyio_backend, counted):
    async with fs.open_runtime(chain()) as rt:
        await rt.materialize(f"a{LENGTH - 1}")
        counted.clear()
        result = await rt.materialize(f"a{LENGTH - 1}")
        assert len(result.skipped) == LENGTH
        assert dict(counted) == {"request GetSnapshot": 1, "request LatestSuccesses": 1}


async def test_a_chain_of_fast_assets_starts_no_task(anyio_backend, monkeypatch):
    started = []
    original = type(anyio.create_task_group()).start_soon

    def counting_start_soon(self, *args, **kwargs):
        started.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(anyio.create_task_group()), "start_soon", counting_start_soon)
    async with fs.open_runtime(chain()) as rt:
        assert started == []  # executors start on first use, not with the runtime
        await rt.materialize(f"a{LENGTH - 1}")
        # Each executor's gate serves the runs directly: its task waits for a message.
        assert started == []
        result = await rt.materialize(f"a{LENGTH - 1}", upstream="all", force=True)
        assert len(result.materializations) == LENGTH
        assert started == []  # the jobs themselves start no task either
        await rt.statistics()  # a question by message starts the executors asked
        assert [fn.__name__ for fn in started] == ["_supervised"] * LENGTH


async def test_finished_runs_leave_nothing_for_the_cycle_collector(anyio_backend):
    """Each run is freed as soon as it ends, by reference counting: a run kept in a
    reference cycle (its worker, a closure that started copies of itself) held its
    records, outcomes and ids until the collector's next pass, 18 objects per
    backfilled partition, and each pass walked them."""
    import gc
    from datetime import date, timedelta

    async def leaf(ctx, deps):
        return 1

    assets = [
        fs.Asset(name="events", partitioned_by=fs.DailyPartitions(start=date(2024, 1, 1)), execute_fn=leaf),
        *(fs.Asset(name=f"b{i}", execute_fn=leaf) for i in range(3)),
        fs.Asset(name="top", depends_on=("b0", "b1", "b2"), execute_fn=leaf),  # parallel branches: spare workers
    ]
    days = [date(2024, 1, 1) + timedelta(days=i) for i in range(210)]
    async with fs.open_runtime(assets) as rt:
        await rt.wait_backfill(await rt.backfill("events", partitions=days[:10], max_parallel=20))  # warm
        gc.collect()
        gc.disable()
        try:
            await rt.wait_backfill(await rt.backfill("events", partitions=days[10:], max_parallel=20))
            await rt.materialize("top", upstream="all")
            found = gc.collect()
        finally:
            gc.enable()
    assert found < 100, f"{found} objects in reference cycles after 200 partitions and a fan"  # 3,600+ before


async def test_a_closed_runtime_is_freed_by_reference_counting(anyio_backend):
    """What a runtime made (its memory store with every record, its memory IO with
    every value, the graph) is freed as the runtime closes, not at the cycle
    collector's next full pass: a service that opens a runtime per job held each
    closed one's data until then. Cancelled tasks were the cycles (anyio keeps a
    cancelled task's exception, whose frames held the store and, on trio, the
    closing runtime's own frame), then the memory store's table of handlers, the
    graph's note of its newest version and the S3 manager's client opener."""
    import gc
    import weakref
    from datetime import date, timedelta

    async def leaf(ctx, deps):
        return 1

    assets = [
        fs.Asset(name="events", partitioned_by=fs.DailyPartitions(start=date(2024, 1, 1)), execute_fn=leaf),
        *(fs.Asset(name=f"b{i}", execute_fn=leaf) for i in range(3)),
        fs.Asset(name="top", depends_on=("b0", "b1", "b2"), execute_fn=leaf),
    ]
    days = [date(2024, 1, 1) + timedelta(days=i) for i in range(40)]
    async with fs.open_runtime(assets) as rt:  # what is made once a process (imports, caches)
        await rt.materialize("top", upstream="all")
    del rt
    gc.collect()
    gc.disable()
    try:
        async with fs.open_runtime(assets) as rt:
            await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=20))
            await rt.materialize("top", upstream="all")
            made = [weakref.ref(thing) for thing in (rt.store, rt.io_managers["memory"], *rt.io_managers.values())]
        del rt
        alive = [type(ref()).__name__ for ref in made if ref() is not None]
        found = gc.collect()
    finally:
        gc.enable()
    assert alive == []
    assert found == 0, f"{found} objects in reference cycles after the runtime closed"
    # A runtime that never backfilled: its batch writer idle since it started, stopped
    # and returning as the runtime closes (it was cancelled at that moment: 48 objects
    # in cycles on asyncio, 70 on trio).
    gc.collect()
    gc.disable()
    try:
        async with fs.open_runtime(assets) as rt:
            await rt.materialize("top", upstream="all")
        del rt
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0, f"{found} objects in reference cycles after a runtime that only materialized closed"
