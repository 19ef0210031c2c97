"""Watching the runtime (SPEC 11): typed, immutable, tenant-scoped events, bounded per
subscriber. On asyncio and trio."""

from __future__ import annotations

from datetime import date

import anyio
import attrs
import pytest

import flowstone as fs
from flowstone import events as ev

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 31))


def chain() -> list[fs.Asset]:
    async def raw(ctx, deps):
        return 1

    async def clean(ctx, deps):
        return deps["raw"] + 1

    return [fs.Asset(name="raw", execute_fn=raw), fs.Asset(name="clean", execute_fn=clean, depends_on=["raw"])]


def drain(events) -> list[ev.Event]:
    """What the subscription holds now (events are delivered as they happen, in the
    publisher's task, so after an awaited call they are all there)."""
    held = []
    while events.pending:
        held.append(events._queue.popleft())
    return held


async def test_a_materialization_is_started_then_succeeded_and_a_second_run_skipped(anyio_backend):
    async with fs.open_runtime(chain()) as rt:
        async with rt.events() as events:
            first = await rt.materialize("clean")
            second = await rt.materialize("clean")
            seen = drain(events)
    kinds = [(type(e).__name__, getattr(e, "asset", None)) for e in seen]
    assert kinds == [
        ("MaterializationStarted", "raw"), ("MaterializationSucceeded", "raw"),
        ("MaterializationStarted", "clean"), ("MaterializationSucceeded", "clean"),
        ("MaterializationSkipped", "raw"), ("MaterializationSkipped", "clean"),
    ]
    started, succeeded = seen[0], seen[1]
    assert started.run_id == first.run_id and started.tenant is None and started.partition is None
    assert succeeded.materialization_id == first.materializations["raw"].id and succeeded.duration_ms >= 0
    assert seen[4].run_id == second.run_id and seen[4].materialization_id == first.materializations["raw"].id
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        started.asset = "other"


async def test_iterating_yields_events_as_they_happen_and_ends_with_the_runtime(anyio_backend):
    received: list[ev.Event] = []

    async def watch(rt, ready):
        async with rt.events(kinds=["MaterializationSucceeded"]) as events:
            ready.set()
            async for event in events:
                received.append(event)

    async with anyio.create_task_group() as tasks:
        async with fs.open_runtime(chain()) as rt:
            ready = anyio.Event()
            tasks.start_soon(watch, rt, ready)
            await ready.wait()
            await rt.materialize("clean")
    assert [e.asset for e in received] == ["raw", "clean"]  # and the loop ended when the runtime closed


async def test_failures_carry_the_records_error_and_only_the_asked_asset_is_seen(anyio_backend):
    async def broken(ctx, deps):
        raise ValueError("no data")

    assets = [*chain(), fs.Asset(name="broken", execute_fn=broken)]
    async with fs.open_runtime(assets) as rt:
        async with rt.events(asset="broken") as events:
            await rt.materialize("clean")
            with pytest.raises(fs.MaterializationFailed):
                await rt.materialize("broken")
            seen = drain(events)
    assert [type(e) for e in seen] == [ev.MaterializationStarted, ev.MaterializationFailed]
    assert seen[1].error == "ValueError: no data" and seen[1].asset == "broken"


async def test_a_subscriber_sees_only_its_own_tenants_events(anyio_backend):
    async with fs.open_runtime(chain()) as rt:
        with fs.tenant_scope("a"):
            async with rt.events() as events_a:
                with fs.tenant_scope("b"):
                    await rt.materialize("clean")
                await rt.materialize("raw")
                seen = drain(events_a)
    assert {e.tenant for e in seen} == {"a"} and [e.asset for e in seen] == ["raw", "raw"]


async def test_a_backfill_reports_progress_per_partition_and_its_end(anyio_backend):
    async def day(ctx, deps):
        return ctx.partition.day

    async with fs.open_runtime([fs.Asset(name="day", execute_fn=day, partitioned_by=DAILY)]) as rt:
        async with rt.events(kinds=[ev.BackfillProgress, ev.BackfillFinished]) as events:
            backfill = await rt.backfill("day", fs.partition_range(date(2025, 1, 1), date(2025, 1, 10), "day"))
            await rt.wait_backfill(backfill)
            seen = drain(events)
    progress, end = seen[:-1], seen[-1]
    assert len(progress) == 10 and [p.succeeded for p in progress] == list(range(1, 11))
    assert all(p.backfill_id == backfill and p.total == 10 and p.run_id is None for p in progress)
    assert isinstance(end, ev.BackfillFinished)
    assert (end.state, end.succeeded, end.failed, end.cancelled) == ("succeeded", 10, 0, 0)


async def test_a_slow_subscriber_loses_events_it_is_told_about_and_never_slows_the_runtime(anyio_backend):
    async def day(ctx, deps):
        return 1

    async with fs.open_runtime([fs.Asset(name="day", execute_fn=day, partitioned_by=DAILY)]) as rt:
        async with rt.events(kinds=["MaterializationSucceeded"], buffer=5) as events:
            status = await rt.wait_backfill(await rt.backfill("day"))  # 31 partitions, nobody reading
            assert status.succeeded == 31
            first_five = [await events.__anext__() for _ in range(5)]
            gap = await events.__anext__()
            await rt.materialize("day", date(2025, 1, 1), force=True)
            after = await events.__anext__()
    assert all(isinstance(e, ev.MaterializationSucceeded) for e in first_five)
    assert isinstance(gap, ev.EventsDropped) and gap.count == 26
    assert isinstance(after, ev.MaterializationSucceeded) and after.partition == "2025-01-01"


async def test_a_cancelled_materialization_is_announced(anyio_backend):
    started = anyio.Event()

    async def slow(ctx, deps):
        started.set()
        await anyio.sleep_forever()

    async with fs.open_runtime([fs.Asset(name="slow", execute_fn=slow)]) as rt:
        async with rt.events() as events:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(rt.materialize, "slow")
                await started.wait()
                tasks.cancel_scope.cancel()
            seen = drain(events)
    assert [type(e) for e in seen] == [ev.MaterializationStarted, ev.MaterializationCancelled]


async def test_a_guard_hides_the_assets_the_caller_may_not_access(anyio_backend):
    class OnlyRaw:
        def can_access(self, asset, context):
            return asset.name == "raw" or context.get("role") == "admin"

        def can_materialize(self, asset, context):
            return True

    async with fs.open_runtime(chain(), guard=OnlyRaw()) as rt:
        async with rt.events() as events, rt.events(context={"role": "admin"}) as admin:
            await rt.materialize("clean")
        # closed: iterating gives what each subscriber may see of what it holds, then ends
        assert {e.asset async for e in events} == {"raw"}
        assert {e.asset async for e in admin} == {"raw", "clean"}


async def test_bad_subscriptions_are_refused(anyio_backend):
    async with fs.open_runtime(chain()) as rt:
        with pytest.raises(fs.DefinitionError, match="unknown event kind"):
            async with rt.events(kinds=["Nope"]):
                pass
        with pytest.raises(fs.DefinitionError, match="buffer"):
            async with rt.events(buffer=0):
                pass
        with pytest.raises(fs.NotFound):
            async with rt.events(asset="missing"):
                pass


def test_every_event_carries_when_tenant_and_run():
    for kind in (*ev.KINDS.values(), ev.EventsDropped):
        names = {f.name for f in attrs.fields(kind)}
        assert {"at", "tenant", "run_id"} <= names, kind
    event = ev.EventsDropped(at=None, tenant=None, run_id=None, count=1)
    assert not hasattr(event, "__dict__")  # slotted: small, and nothing can be added
