"""Retention: ``fs.Retention`` per asset or per runtime, ``rt.prune()``; what a current
record is and was built from is never deleted (examples, and a property test)."""

from __future__ import annotations

import tempfile
from datetime import date, timedelta
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowstone as fs
from flowstone.store import Status

pytestmark = pytest.mark.anyio

DAYS = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 1, 3))


def _pipeline(retention: fs.Retention | None = None, failing: set[tuple[str, str]] | None = None) -> fs.Pipeline:
    failing = failing if failing is not None else set()
    pipeline = fs.Pipeline("kept")

    @pipeline.asset(partitioned_by=DAYS, retention=retention)
    def raw(ctx, deps):
        if ("raw", ctx.partition_key) in failing:
            raise ValueError("raw broke")
        return 1

    @pipeline.asset(depends_on=["raw"], partitioned_by=DAYS)
    def clean(ctx, deps):
        if ("clean", ctx.partition_key) in failing:
            raise ValueError("clean broke")
        return deps["raw"] + 1

    return pipeline


def test_a_retention_is_checked_and_takes_seconds_or_a_timedelta():
    assert fs.Retention(max_age=60).max_age == timedelta(minutes=1)
    assert fs.Retention(keep_last=0, max_age=timedelta(days=7)).limited
    assert not fs.Retention().limited
    for bad in ({"keep_last": -1}, {"keep_last": 1.5}, {"max_age": 0}, {"max_age": "7d"}, {"max_age": True}):
        with pytest.raises(fs.DefinitionError, match="retention"):
            fs.Retention(**bad)
    with pytest.raises(fs.DefinitionError, match="retention"):
        fs.asset(lambda ctx, deps: 1, name="x", retention=3)


async def _history(rt, asset, day, times, **options):
    for _ in range(times):
        await rt.materialize(asset, day, force=True, **options)


async def test_prune_applies_each_assets_retention_else_the_runtimes(anyio_backend):
    day = date(2026, 1, 1)
    async with fs.open_runtime(_pipeline(fs.Retention(keep_last=1)), retention=fs.Retention(keep_last=0)) as rt:
        await _history(rt, "raw", day, 4)  # three superseded
        await _history(rt, "clean", day, 3)  # two superseded (the runtime's default keeps none)
        assert await rt.prune() == {"raw": 2, "clean": 2}
        assert await rt.prune() == {"raw": 0, "clean": 0}
        kept = await rt.store.list_all(limit=100)
    assert sorted((r.asset_name, r.status.value) for r in kept) == [
        ("clean", "success"), ("raw", "success"), ("raw", "superseded")]
    async with fs.open_runtime(_pipeline()) as rt:  # no retention anywhere: nothing to do
        await _history(rt, "raw", day, 2)
        assert await rt.prune() == {}


async def test_what_a_stale_record_was_built_from_stays_until_it_is_rebuilt(anyio_backend):
    day = date(2026, 1, 1)
    async with fs.open_runtime(_pipeline(fs.Retention(keep_last=0))) as rt:
        first = (await rt.materialize("clean", day)).materializations["raw"]  # clean is built on this raw
        await rt.materialize("raw", day, force=True)  # raw again: clean is stale, the first raw superseded
        assert (await rt.store.get("clean", day)).status is Status.STALE
        assert await rt.prune() == {"raw": 0}
        assert (await rt.store.get_by_id(first.id)).status is Status.SUPERSEDED  # kept: clean was built from it
        await rt.materialize("clean", day)  # rebuilt on the new raw
        assert await rt.prune() == {"raw": 1}
        with pytest.raises(fs.NotFound):
            await rt.store.get_by_id(first.id)


async def test_prune_by_age_and_under_a_guard(anyio_backend):
    day = date(2026, 1, 1)

    class NoPruning(fs.Guard):
        def can_materialize(self, asset, context):
            return context.get("role") == "admin"

    async with fs.open_runtime(_pipeline(fs.Retention(max_age=timedelta(days=1))), guard=NoPruning()) as rt:
        await _history(rt, "raw", day, 3, context={"role": "admin"})
        assert await rt.prune(context={"role": "admin"}) == {"raw": 0}  # nothing a day old yet
        with pytest.raises(fs.AccessDenied):
            await rt.prune()


# ---------------------------------------------------------------- property


STEPS = st.lists(
    st.tuples(st.sampled_from(["raw", "clean"]), st.integers(0, 2), st.booleans(), st.booleans()),
    min_size=1, max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(steps=STEPS, keep_last=st.integers(0, 2), more=STEPS)
def test_prune_never_deletes_a_current_or_latest_record_nor_what_a_current_one_was_built_from(
    steps, keep_last, more,
):
    anyio.run(_check_prune, steps, keep_last, more)


@settings(max_examples=40, deadline=None)
@given(steps=STEPS, keep_last=st.integers(0, 2), more=STEPS)
def test_a_prune_one_record_a_call_on_sqlite_keeps_the_same_promises(steps, keep_last, more):
    """The same, on the embedded store, with retention deleting one record a call: the
    store goes through its choice call after call (ADR 0053) and chooses anew when it
    is used up, and what is left is still exactly what the retention keeps."""
    from unittest import mock

    from flowstone.runtime import retention

    async def on_sqlite(path: Path) -> None:
        async with fs.store.SqliteStore(path) as store:
            await _check_prune(steps, keep_last, more, store)

    with tempfile.TemporaryDirectory() as folder, mock.patch.object(retention, "BATCH", 1):
        anyio.run(on_sqlite, Path(folder) / "flowstone.db")


async def _check_prune(steps, keep_last, more, store=None):
    failing: set[tuple[str, str]] = set()
    async with fs.open_runtime(_pipeline(failing=failing), retention=fs.Retention(keep_last=keep_last),
                               store=store) as rt:
        for batch in (steps, more):  # prune, then go on working on what is left, and prune again
            for asset, day, force, fails in batch:
                key = f"2026-01-0{day + 1}"
                (failing.add if fails else failing.discard)((asset, key))
                try:
                    await rt.materialize(asset, date(2026, 1, day + 1), force=force)
                except fs.MaterializationFailed:
                    pass
            before = {r.id: r for r in await rt.store.list_all(limit=10_000)}
            states = {asset: await rt.store.partition_states(asset) for asset in ("raw", "clean")}
            current = [r for r in before.values() if r.status in (Status.SUCCESS, Status.STALE)]
            built_from = set()
            for record in current:
                for upstream, keys in record.upstream_partitions.items():
                    for key in keys:  # the upstream record current when this one ran
                        candidates = [r for r in before.values() if r.asset_name == upstream and r.partition == key
                                      and r.status in (Status.SUCCESS, Status.STALE, Status.SUPERSEDED)
                                      and r.completed_at <= record.started_at]
                        if candidates:
                            built_from.add(max(candidates, key=lambda r: r.completed_at).id)
            await rt.prune()
            after = {r.id for r in await rt.store.list_all(limit=10_000)}
            assert {r.id for r in current} <= after
            assert built_from <= after
            assert {asset: await rt.store.partition_states(asset) for asset in ("raw", "clean")} == states
            history = [r for r in before.values() if r.id in after and r.status in
                       (Status.SUPERSEDED, Status.FAILED, Status.CANCELLED)]
            per_partition: dict[tuple[str, str | None], int] = {}
            for record in history:
                per_partition[(record.asset_name, record.partition)] = per_partition.get(
                    (record.asset_name, record.partition), 0) + 1
            if not any(r.status is Status.STALE for r in current):  # nothing to spare: the retention is exact
                assert all(count <= max(keep_last, 1) for count in per_partition.values())  # the latest may be one


async def test_the_daemon_prunes_on_its_own(anyio_backend):
    from waiting import until

    from flowstone.runtime.daemon import run_daemon

    day = date(2026, 1, 1)
    async with fs.open_runtime(_pipeline(fs.Retention(keep_last=0))) as rt:
        await _history(rt, "raw", day, 3)
        stop = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: run_daemon(rt, stop=stop, owner="d", prune_interval=0.01))

            async def pruned() -> bool:
                return [r.status for r in await rt.store.list_all(asset_name="raw", limit=10)] == [Status.SUCCESS]

            await until(pruned)
            await _history(rt, "raw", day, 2)  # and again, at its next look
            await until(pruned)
            stop.set()


async def test_finished_backfills_and_ticks_follow_the_runtimes_max_age(anyio_backend):
    from datetime import datetime, timezone

    from flowstone.runtime import retention

    later = datetime.now(timezone.utc) + timedelta(days=2)
    async with fs.open_runtime(_pipeline(), retention=fs.Retention(max_age=timedelta(days=1))) as rt:
        done = await rt.backfill("raw", partitions=[date(2026, 1, 1)])
        await rt.wait_backfill(done)
        at = datetime(2026, 1, 1, tzinfo=timezone.utc)
        for tick in (at, at + timedelta(hours=1)):
            assert await rt.store.claim_tick("hourly", tick, "me")
            await rt.store.finish_tick("hourly", tick, "succeeded")
        assert await rt.prune_finished() == 1  # the old tick; the backfill is younger than a day
        assert [t.at for t in (await rt.store.last_ticks()).values()] == [at + timedelta(hours=1)]
        assert await retention.prune_finished(rt.store, fs.Retention(keep_last=1), now=later) == 0  # no age
        assert await retention.prune_finished(rt.store, None, now=later) == 0
        assert await retention.prune_finished(rt.store, fs.Retention(max_age=timedelta(days=1)), now=later) == 1
        assert await rt.store.list_backfills() == []
