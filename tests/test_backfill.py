"""Backfills (SPEC 7): bounded parallelism, failures recorded, cancel leaves everything terminal, resume."""

from __future__ import annotations

import contextlib
import tracemalloc
import uuid
from datetime import date, datetime, timedelta, timezone

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.partitions import PartitionRange
from flowstone.store import TERMINAL, Status

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 3, 31))
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(30)]



def asset_of(fn, **options) -> fs.Asset:
    return fs.Asset(name="events", execute_fn=fn, partitioned_by=DAILY, **options)


def raw_and_doubled() -> list[fs.Asset]:
    """``raw`` (the day of the month) and ``doubled``, which reads it."""
    return [
        fs.Asset(name="raw", execute_fn=lambda ctx, deps: ctx.partition.day, partitioned_by=DAILY),
        fs.Asset(name="doubled", execute_fn=lambda ctx, deps: deps["raw"] * 2, partitioned_by=DAILY,
                 depends_on=("raw",)),
    ]


async def test_a_backfill_runs_every_partition_with_at_most_max_parallel_in_flight(anyio_backend):
    inside, peak = [], []
    four_inside = anyio.Event()

    async def work(ctx, deps):
        inside.append(ctx.partition_key)
        peak.append(len(inside))
        if len(inside) == 4:
            four_inside.set()
        await four_inside.wait()  # the first four meet here: four really run at once
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        inside.remove(ctx.partition_key)
        return ctx.partition_key

    async with fs.open_runtime([asset_of(work)]) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=4)
        status = await rt.wait_backfill(backfill)
        assert (status.state, status.total, status.succeeded, status.failed) == ("succeeded", 30, 30, 0)
        assert (status.queued, status.running, status.cancelled) == (0, 0, 0)
        assert max(peak) == 4
        records = await rt.store.list_all()
        assert len(records) == 30 and {r.status for r in records} == {Status.SUCCESS}
        assert await rt.load("events", DAYS[7]) == "2025-01-08"


async def test_backfill_returns_its_id_at_once_and_reports_progress(anyio_backend):
    release = anyio.Event()

    async def gated(ctx, deps):
        await release.wait()

    async with fs.open_runtime([asset_of(gated)]) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=5)

        async def five_running():
            return (await rt.backfill_status(backfill)).running == 5

        await until(five_running)
        status = await rt.backfill_status(str(backfill))
        assert (status.state, status.running, status.queued, status.succeeded) == ("running", 5, 25, 0)
        release.set()
        assert (await rt.wait_backfill(backfill)).succeeded == 30


async def test_failed_partitions_are_recorded_and_the_rest_continue(anyio_backend):
    async def picky(ctx, deps):
        if ctx.partition.day % 10 == 0:
            raise ValueError(f"bad day {ctx.partition_key}")
        return 1

    async with fs.open_runtime([asset_of(picky)]) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=3))
        assert (status.state, status.succeeded, status.failed) == ("failed", 27, 3)
        assert sorted(key for key, _ in status.errors) == ["2025-01-10", "2025-01-20", "2025-01-30"]
        assert all("bad day" in message for _, message in status.errors)
        assert len(await rt.store.list_by_status("failed")) == 3


async def test_cancel_stops_new_work_and_leaves_every_record_terminal(anyio_backend):
    async def forever(ctx, deps):
        await anyio.Event().wait()

    async with fs.open_runtime([asset_of(forever)]) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=3)

        async def three_running():
            return len(await rt.store.list_by_status("running")) == 3

        await until(three_running)
        with anyio.fail_after(5):
            status = await rt.cancel_backfill(backfill)
        assert (status.state, status.succeeded, status.failed, status.cancelled) == ("cancelled", 0, 0, 30)
        assert not status.interrupted  # asked for: a daemon does not resume it
        records = await rt.store.list_all()
        assert len(records) == 3 and all(r.status in TERMINAL for r in records)
        assert {r.status for r in records} == {Status.CANCELLED}
        assert (await rt.wait_backfill(backfill)).state == "cancelled"


async def test_cancel_stops_a_backfill_whose_partitions_never_block(anyio_backend):
    # Partitions that wait on nothing never yield; on asyncio, anyio cancels only a
    # task whose wait is not over, and each chunk's lookup was always answered
    # before the cancellation came: such a backfill ran on after cancel_backfill.
    async def instant(ctx, deps):
        return 1

    many = [date(2000, 1, 1) + timedelta(days=i) for i in range(100_000)]
    async with fs.open_runtime([
        fs.Asset(name="events", execute_fn=instant, partitioned_by=fs.DailyPartitions(start=date(2000, 1, 1)))
    ]) as rt:
        backfill = await rt.backfill("events", partitions=many, max_parallel=4)

        async def some_done():
            return (await rt.backfill_status(backfill)).succeeded > 0

        await until(some_done)
        with anyio.fail_after(10):
            status = await rt.cancel_backfill(backfill)
        assert status.state == "cancelled" and 0 < status.succeeded < len(many)
        assert status.cancelled == len(many) - status.succeeded - status.failed


async def test_resume_runs_only_what_is_not_done(anyio_backend):
    calls = []
    gate = {"open": False}
    release = anyio.Event()

    async def work(ctx, deps):
        calls.append(ctx.partition_key)
        if not gate["open"] and len(calls) > 10:
            await release.wait()  # stall after ten partitions so the backfill can be cancelled
        return ctx.partition_key

    async with fs.open_runtime([asset_of(work)]) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=2)

        async def ten_done():
            return (await rt.backfill_status(backfill)).succeeded >= 10

        await until(ten_done)
        first = await rt.cancel_backfill(backfill)
        done_before = first.succeeded
        gate["open"] = True
        calls.clear()
        assert await rt.resume_backfill(backfill) == backfill
        final = await rt.wait_backfill(backfill)
        assert final.state == "succeeded" and final.succeeded == 30
        assert len(calls) == 30 - done_before  # finished partitions were skipped, not recomputed
        successes = await rt.store.list_by_status("success", limit=100)
        assert len(successes) == 30 and len({r.partition for r in successes}) == 30


class _SavesRecorded(fs.store.MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.saved = []

    async def save_backfill(self, id, state, *, owner=None):
        self.saved.append((state.status.state, state.status.succeeded))
        await super().save_backfill(id, state, owner=owner)


async def test_a_running_backfill_saves_its_progress_periodically(anyio_backend, monkeypatch):
    """So that a process killed outright leaves recent counts in the store (the
    Postgres test kills a real process); the final save comes last, after every
    checkpoint (checked once the runtime has stopped, when no task is left)."""
    monkeypatch.setattr("flowstone.runtime.backfill.CHECKPOINT_SECONDS", 0.01)
    release = anyio.Event()
    calls = []

    async def work(ctx, deps):
        calls.append(1)
        if len(calls) > 5:
            await release.wait()
        return 1

    store = _SavesRecorded()
    async with fs.open_runtime([asset_of(work)], store=store) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=2)

        async def checkpointed():
            saved = await rt.store.load_backfill(backfill)
            return saved.status.state == "running" and saved.status.succeeded == 5

        await until(checkpointed)
        release.set()
        await rt.wait_backfill(backfill)
    *progress, final = store.saved
    assert final == ("succeeded", len(DAYS))
    assert {state for state, _ in progress} == {"running"} and len(progress) >= 2  # the start, and checkpoints
    assert ("running", 5) in progress


async def test_bad_partitions_are_refused_before_the_backfill_starts(anyio_backend):
    async with fs.open_runtime([asset_of(lambda ctx, deps: 1)]) as rt:
        with pytest.raises(fs.InvalidPartition, match="outside"):
            await rt.backfill("events", partitions=[*DAYS, date(2030, 1, 1)])
        with pytest.raises(fs.DefinitionError, match="max_parallel"):
            await rt.backfill("events", partitions=DAYS, max_parallel=0)
        with pytest.raises(fs.DefinitionError, match="partitions"):
            await rt.backfill("events", partitions="2025-01-01")
        with pytest.raises(fs.DefinitionError, match="partition_range"):  # meant as a range, would run two
            await rt.backfill("events", partitions=(DAYS[0], DAYS[9]))
        assert await rt.store.list_all() == []


async def test_default_partitions_are_all_of_the_definition(anyio_backend):
    async with fs.open_runtime([asset_of(lambda ctx, deps: 1)]) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", max_parallel=10))
        assert status.total == status.succeeded == 90


async def test_unknown_backfills_are_not_found(anyio_backend):
    async with fs.open_runtime([asset_of(lambda ctx, deps: 1)]) as rt:
        with pytest.raises(fs.BackfillNotFound):
            await rt.backfill_status("00000000-0000-0000-0000-000000000000")
        with pytest.raises(fs.NotFound):
            await rt.wait_backfill("not-an-id")
        with pytest.raises(fs.BackfillNotFound):
            await rt.resume_backfill("00000000-0000-0000-0000-000000000000")


async def test_a_backfill_runs_under_the_tenant_that_started_it(anyio_backend):
    async with fs.open_runtime([asset_of(lambda ctx, deps: ctx.tenant)]) as rt:
        with fs.tenant_scope("acme"):
            backfill = await rt.backfill("events", partitions=DAYS[:3])
            assert (await rt.wait_backfill(backfill)).succeeded == 3
            assert {r.tenant_id for r in await rt.store.list_all()} == {"acme"}
            assert await rt.load("events", DAYS[0]) == "acme"
        with pytest.raises(fs.BackfillNotFound):
            await rt.backfill_status(backfill)  # another tenant cannot see it
        assert await rt.store.list_all() == []


async def _left_running(store, max_parallel: int):
    """A backfill of DAYS whose partitions never end, left with ``max_parallel`` of
    them running when its runtime closes (interrupted); its id."""

    async def forever(ctx, deps):
        await anyio.Event().wait()

    async with fs.open_runtime([asset_of(forever)], store=store) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=max_parallel)

        async def all_running():
            return len(await rt.store.list_by_status("running")) == max_parallel

        await until(all_running)
    return backfill


async def test_leaving_the_runtime_cancels_a_running_backfill_cleanly(anyio_backend):
    store = fs.store.MemoryStore()
    backfill = await _left_running(store, 2)
    async with store:
        records = await store.list_all()
        assert len(records) == 2 and {r.status for r in records} == {Status.CANCELLED}
        saved = (await store.load_backfill(backfill)).status
        assert (saved.state, saved.interrupted, saved.cancelled) == ("cancelled", True, len(DAYS))


async def test_a_resumed_backfill_checks_its_partitions_against_the_definitions_of_now(anyio_backend):
    # backfill() checked the partitions against the asset as it was then, and its
    # runs do not check them again; a resume, under definitions changed since, does.
    store = fs.store.MemoryStore()
    backfill = await _left_running(store, 1)
    later = fs.DailyPartitions(start=DAYS[10], end=date(2025, 3, 31))  # the first ten days are not partitions now
    seen = []

    async def work(ctx, deps):
        seen.append(ctx.partition)
        return 1

    async with fs.open_runtime([fs.Asset(name="events", execute_fn=work, partitioned_by=later)], store=store) as rt:
        await rt.resume_backfill(backfill)
        final = await rt.wait_backfill(backfill)
    assert (final.succeeded, final.failed) == (20, 10)
    assert sorted(seen) == DAYS[10:] and all(type(day) is date for day in seen)
    assert sorted(key for key, _error in final.errors) == [day.isoformat() for day in DAYS[:10]]
    assert all("is outside DailyPartitions(start='2025-01-11'" in error for _key, error in final.errors)


async def test_a_backfill_of_a_reader_computes_each_partition_with_its_upstream(anyio_backend):
    calls = []

    async def raw(ctx, deps):
        calls.append(("raw", ctx.partition_key))
        return ctx.partition.day

    async def doubled(ctx, deps):
        calls.append(("doubled", ctx.partition_key))
        return deps["raw"] * 2

    assets = [
        fs.Asset(name="raw", execute_fn=raw, partitioned_by=DAILY),
        fs.Asset(name="doubled", execute_fn=doubled, partitioned_by=DAILY, depends_on=("raw",)),
    ]
    async with fs.open_runtime(assets) as rt:
        await rt.materialize("raw", DAYS[0])  # one upstream partition exists already
        calls.clear()
        status = await rt.wait_backfill(await rt.backfill("doubled", partitions=DAYS[:5], max_parallel=3))
        assert status.succeeded == 5
        assert sorted(c for c in calls if c[0] == "raw") == [("raw", d.isoformat()) for d in DAYS[1:5]]
        assert len([c for c in calls if c[0] == "doubled"]) == 5
        assert await rt.load("doubled", DAYS[4]) == 10
        record = await rt.store.get("doubled", DAYS[4])
        assert record.upstream_partitions == {"raw": ("2025-01-05",)}


class FaultyStore(fs.store.MemoryStore):
    """A real memory store that breaks its contract on one partition: a bare error."""

    async def begin(self, owner, seconds, **fields):
        if fields.get("partition") == "2025-01-03":
            raise RuntimeError("disk on fire")
        return await super().begin(owner, seconds, **fields)

    async def begin_many(self, owner, seconds, starts):
        """A batch's begins one by one, through the faulty ``begin``."""
        outcomes = []
        for start in starts:
            try:
                outcomes.append(await self.begin(owner, seconds, unless_done=start.unless_done, **start.fields))
            except Exception as error:
                outcomes.append(error)
        return outcomes


async def test_a_store_that_raises_a_bare_error_fails_one_partition_not_the_runtime(anyio_backend):
    async with fs.open_runtime([asset_of(lambda ctx, deps: 1)], store=FaultyStore()) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS[:5], max_parallel=2))
        assert (status.succeeded, status.failed) == (4, 1)
        assert status.errors == (("2025-01-03", "materialization failed: RuntimeError: disk on fire "
                                                "[asset='events', partition='2025-01-03']"),)
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("events", DAYS[2])
        assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("max_parallel", [1, 4])
async def test_an_upstream_shared_by_every_partition_is_computed_once(anyio_backend, max_parallel):
    """A backfill prefetches lookups per chunk; an asset every partition reads
    must still be computed once, not once per partition of a chunk."""
    calls = []

    async def lookup(ctx, deps):
        calls.append("lookup")
        return {"rate": 2}

    async def priced(ctx, deps):
        return ctx.partition.day * deps["lookup"]["rate"]

    assets = [
        fs.Asset(name="lookup", execute_fn=lookup),
        fs.Asset(name="priced", execute_fn=priced, partitioned_by=DAILY, depends_on=("lookup",)),
    ]
    async with fs.open_runtime(assets) as rt:
        status = await rt.wait_backfill(await rt.backfill("priced", partitions=DAYS, max_parallel=max_parallel))
        assert status.succeeded == 30
        assert calls == ["lookup"]
        assert await rt.load("priced", DAYS[9]) == 20
        lookups = await rt.store.list_all(asset_name="lookup")
        assert [r.status for r in lookups] == [Status.SUCCESS]


# ------------------------------------------------------------ lazy ranges

HOURLY = fs.HourlyPartitions(start=datetime(2000, 1, 1, tzinfo=timezone.utc))
TEN_MILLION_HOURS = fs.partition_range(
    datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2000, 1, 1, tzinfo=timezone.utc) + timedelta(hours=9_999_999),
    "hour",
)


def test_a_partition_range_is_lazy_and_equals_its_items():
    assert isinstance(TEN_MILLION_HOURS, PartitionRange) and len(TEN_MILLION_HOURS) == 10_000_000
    assert TEN_MILLION_HOURS[-1] == datetime(2000, 1, 1, tzinfo=timezone.utc) + timedelta(hours=9_999_999)
    assert TEN_MILLION_HOURS[5_000_000] in TEN_MILLION_HOURS
    assert TEN_MILLION_HOURS.index(TEN_MILLION_HOURS[1234]) == 1234
    assert datetime(2000, 1, 1, 0, 30, tzinfo=timezone.utc) not in TEN_MILLION_HOURS
    week = fs.partition_range(date(2025, 1, 1), date(2025, 1, 7), "day")
    assert week == [date(2025, 1, d) for d in range(1, 8)] and list(week)[2:4] == week[2:4]
    assert fs.partition_range(date(2025, 1, 31), date(2025, 4, 30), "month") == [
        date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 30)
    ]
    tracemalloc.start()
    try:
        fs.partition_range(datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(3000, 1, 1, tzinfo=timezone.utc), "hour")
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert allocated < 10_000  # the 8.8 million hours as a list would be half a gigabyte


async def test_a_backfill_over_ten_million_hours_starts_without_listing_them(anyio_backend):
    async def hour(ctx, deps):
        return ctx.partition.hour

    async with fs.store.MemoryStore() as store:
        async with fs.open_runtime([fs.Asset(name="h", execute_fn=hour, partitioned_by=HOURLY)], store=store) as rt:
            backfill = await rt.backfill("h", TEN_MILLION_HOURS, max_parallel=4)
            assert (await rt.backfill_status(backfill)).total == 10_000_000
            saved = await store.load_backfill(backfill)
            assert saved.spec.partitions is TEN_MILLION_HOURS  # kept as the range, never a list
            stopped = await rt.cancel_backfill(backfill)
            assert stopped.state == "cancelled" and stopped.total == 10_000_000


@pytest.mark.parametrize(
    "partitions, problem",
    [
        (fs.partition_range(datetime(1999, 12, 31, tzinfo=timezone.utc), datetime(2000, 1, 2, tzinfo=timezone.utc),
                            "hour"), "outside HourlyPartitions"),
        (fs.partition_range(datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2000, 1, 2, tzinfo=timezone.utc),
                            timedelta(minutes=30)), "steps off HourlyPartitions's hour boundaries"),
        (fs.partition_range(date(2000, 1, 1), date(2000, 1, 3), "day"), "must be an aware datetime"),
    ],
)
async def test_a_range_that_is_not_the_assets_partitions_is_refused_before_anything_runs(
    anyio_backend, partitions, problem
):
    async def hour(ctx, deps):
        return 1

    async with fs.open_runtime([fs.Asset(name="h", execute_fn=hour, partitioned_by=HOURLY)]) as rt:
        with pytest.raises(fs.InvalidPartition, match=problem) as info:
            await rt.backfill("h", partitions)
        assert info.value.asset == "h"
        assert await rt.store.list_all() == []


async def test_a_backfill_of_a_local_fall_back_day_runs_its_twenty_five_hours(anyio_backend):
    zone = "America/Los_Angeles"
    daily = fs.DailyPartitions(start=date(2025, 1, 1), timezone=zone)
    hourly = fs.HourlyPartitions(start=date(2025, 1, 1), timezone=zone)

    async def hour(ctx, deps):
        return ctx.partition.astimezone(hourly.zone).strftime("%H:%M %Z")

    async with fs.open_runtime([fs.Asset(name="h", execute_fn=hour, partitioned_by=hourly)]) as rt:
        start, end = daily.window(date(2025, 11, 2))
        status = await rt.wait_backfill(await rt.backfill("h", hourly.keys(start, end - timedelta(hours=1))))
        assert (status.state, status.succeeded) == ("succeeded", 25)
        keys = sorted(r.partition for r in await rt.store.list_all(asset_name="h"))
        assert keys[0] == "2025-11-02T07:00:00Z" and keys[-1] == "2025-11-03T07:00:00Z"
        assert [await rt.load("h", k) for k in ("2025-11-02T08:00:00Z", "2025-11-02T09:00:00Z")] == [
            "01:00 PDT", "01:00 PST"
        ]


# ------------------------------------------------------------ batches (ADR 0032)


class _Counting(fs.store.MemoryStore):
    """A memory store that remembers how many jobs each begin_many / complete_many took."""

    def __init__(self) -> None:
        super().__init__()
        self.begun: list[int] = []
        self.ended: list[int] = []

    async def begin_many(self, owner, seconds, starts):
        self.begun.append(len(starts))
        return await super().begin_many(owner, seconds, starts)

    async def complete_many(self, ends):
        self.ended.append(len(ends))
        return await super().complete_many(ends)


async def test_fast_partitions_begin_and_end_in_batches_each_with_its_own_record(anyio_backend):
    store = _Counting()
    async with fs.open_runtime([asset_of(lambda ctx, deps: ctx.partition_key)], store=store) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=2))
        assert (status.state, status.succeeded, status.failed) == ("succeeded", 30, 0)
        assert sum(store.begun) == sum(store.ended) == 30 - 2  # each worker's first partition ran alone
        assert max(store.begun) > 1 and max(store.begun) <= 16
        records = await rt.store.list_all()
        assert sorted(r.partition for r in records) == sorted(d.isoformat() for d in DAYS)
        assert len({r.run_id for r in records}) == 30  # one run per partition, batched or not
        for record in records:
            assert record.status is Status.SUCCESS and record.started_at <= record.completed_at
            assert record.duration_ms is not None and record.executor_node.endswith("/executor:events")
        assert await rt.load("events", DAYS[12]) == "2025-01-13"
        again = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=2))
        assert again.succeeded == 30 and len(await rt.store.list_all()) == 30  # all skipped: nothing written


async def test_the_workers_of_a_backfill_share_what_they_learn_of_its_pace(anyio_backend):
    """Only the backfill's first partition runs alone when it never yields: the other
    workers take its duration as theirs (each worker learning for itself ran one
    partition alone per worker: a fifth of the runs of 366 partitions at 20 workers).
    Once the pace is known, a worker takes as many partitions at once as a batch
    holds, not fewer."""
    store = _Counting()

    async def instant(ctx, deps):
        return ctx.partition_key

    async with fs.open_runtime([asset_of(instant)], store=store) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=4))
        assert (status.state, status.succeeded) == ("succeeded", 30)
        assert sum(store.begun) == sum(store.ended) == 30 - 1
        # Each worker's first chunk was 3 (30 // (2 * 4)), taken before any partition
        # ended, the first of them less the partition run alone; then chunks of a
        # batch's size (16, the most a batch takes on the memory store) until the feed runs out.
        assert sorted(store.begun) == [2, 2, 3, 3, 3, 16]
        assert await rt.load("events", DAYS[29]) == DAYS[29].isoformat()


async def test_a_store_may_ask_for_larger_batches(anyio_backend, tmp_path):
    """A store whose writes have fixed costs says how many partitions a batch should
    hold (``backfill_chunk``: 64 for SQLite, 128 for PostgreSQL); without it a batch holds 16."""
    sizes: list[int] = []

    class Counting(fs.store.SqliteStore):
        async def begin_many(self, owner, seconds, starts):
            sizes.append(len(starts))
            return await super().begin_many(owner, seconds, starts)

    async def instant(ctx, deps):
        return 1

    events = fs.Asset(name="events", execute_fn=instant, partitioned_by=fs.DailyPartitions(start=date(2020, 1, 1)))
    days = [date(2020, 1, 1) + timedelta(days=i) for i in range(300)]
    async with Counting(tmp_path / "f.db") as store, fs.open_runtime([events], store=store) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=2))
    assert status.succeeded == 300 and Counting.backfill_chunk == 64
    assert max(sizes) == 64 and sum(sizes) >= 300 - 2  # each worker's first partition may run alone
    memory = _Counting()
    async with fs.open_runtime([events], store=memory) as rt:
        await rt.wait_backfill(await rt.backfill("events", partitions=days, max_parallel=2))
    assert max(memory.begun) == 16


@pytest.mark.parametrize("tenant", [None, "acme"])
async def test_a_slow_partition_in_a_batch_holds_back_neither_the_records_nor_the_counts_before_it(
    anyio_backend, tenant
):
    # The runtime's one writer writes the ends before the slow partition behind it,
    # in the backfill's tenant (a record of another tenant is NotFound to a write).
    release = anyio.Event()

    async def work(ctx, deps):
        if ctx.partition_key == "2025-01-06":
            await release.wait()
        return 1

    async with fs.open_runtime([asset_of(work)]) as rt:
        with fs.tenant_scope(tenant) if tenant else contextlib.nullcontext():
            backfill = await rt.backfill("events", partitions=DAYS[:12], max_parallel=1)

            async def five_done():
                records = await rt.store.list_all()
                done = {r.partition for r in records if r.status is Status.SUCCESS}
                counted = (await rt.backfill_status(backfill)).succeeded
                return done == {d.isoformat() for d in DAYS[:5]} and counted == 5

            await until(five_done)
            waiting = {r.partition: r.status for r in await rt.store.list_all()}
            assert waiting["2025-01-06"] is Status.RUNNING
            release.set()
            status = await rt.wait_backfill(backfill)
            assert (status.succeeded, status.failed) == (12, 0)
            assert {r.tenant_id for r in await rt.store.list_all()} == {tenant}


async def test_a_failure_in_a_batch_fails_that_partition_only(anyio_backend):
    def work(ctx, deps):
        if ctx.partition_key in ("2025-01-04", "2025-01-09"):
            raise ValueError(f"bad day {ctx.partition_key}")
        return 1

    store = _Counting()
    async with fs.open_runtime([asset_of(work)], store=store) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS[:12], max_parallel=1))
        assert (status.state, status.succeeded, status.failed) == ("failed", 10, 2)
        assert sorted(status.errors) == [
            (f"2025-01-0{day}", f"materialization failed: ValueError: bad day 2025-01-0{day} "
                                f"[asset='events', partition='2025-01-0{day}']") for day in (4, 9)]
        assert max(store.begun) > 1
        failed = await rt.store.list_by_status("failed")
        assert sorted(r.partition for r in failed) == ["2025-01-04", "2025-01-09"]
        assert all("ValueError: bad day" in r.error_traceback for r in failed)


async def test_cancelling_a_backfill_mid_batch_leaves_every_record_terminal(anyio_backend):
    started = anyio.Event()

    async def work(ctx, deps):
        if ctx.partition_key == "2025-01-05":
            started.set()
            await anyio.sleep_forever()
        return 1

    async with fs.open_runtime([asset_of(work)]) as rt:
        backfill = await rt.backfill("events", partitions=DAYS[:12], max_parallel=1)
        with anyio.fail_after(5):
            await started.wait()
        status = await rt.cancel_backfill(backfill)
        assert status.state == "cancelled" and status.failed == 0
        records = {r.partition: r for r in await rt.store.list_all()}
        assert {r.status for r in records.values()} <= TERMINAL
        assert records["2025-01-05"].error_message == "cancelled"
        assert [records[d.isoformat()].status for d in DAYS[:4]] == [Status.SUCCESS] * 4
        assert status.succeeded == 4


def test_a_batch_is_as_large_as_its_partitions_are_fast():
    from flowstone.runtime.backfill import MAX_CHUNK, _Pace
    from flowstone.runtime.run import RunResult
    from flowstone.store.records import Materialization

    def done(ms):
        record = Materialization(id=uuid.uuid4(), asset_name="a", partition="p", run_id=uuid.uuid4(),
                                 status=Status.SUCCESS, duration_ms=ms)
        return RunResult(run_id=record.run_id, materializations={"a": record})

    pace = _Pace()
    assert pace.size == 1  # nothing known yet: one at a time
    pace.saw([done(0.05), done(0.05)])
    assert pace.size == MAX_CHUNK
    pace.saw([done(2.5)])  # 10 ms of work takes four of these
    assert pace.size == 4
    pace.saw([done(50)])
    assert pace.size == 1
    pace.saw([done(0.01), RuntimeError("no record")])
    assert pace.size == 1


async def test_a_batch_of_partitions_that_yield_ends_when_they_do_not_on_the_write_behind_clock(
    anyio_backend, monkeypatch
):
    """The task writing a batch's ends behind is told when the last one computed: a
    batch of fast partitions that each await something is not held up to its period."""
    monkeypatch.setattr("flowstone.runtime.job.BATCH_SECONDS", 60.0)
    monkeypatch.setattr("flowstone.runtime.backfill.BATCH_SECONDS", 60.0)

    async def work(ctx, deps):
        await anyio.sleep(0)
        return 1

    store = _Counting()
    async with fs.open_runtime([asset_of(work)], store=store) as rt:
        with anyio.fail_after(20):
            status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=1))
        assert status.succeeded == 30 and max(store.begun) > 1


async def test_a_downstream_backfill_runs_each_partition_alone_and_skips_what_is_done(anyio_backend):
    """upstream="missing" and raw not there yet: each partition's run computes raw then
    doubled, alone (a batch would compute every raw partition before any doubled
    one, so a slow raw partition would hold back the others' runs); the fast roots
    still batch."""
    def raw(ctx, deps):
        if ctx.partition_key == "2025-01-07":
            raise ValueError("no data that day")
        return ctx.partition.day

    assets = [
        fs.Asset(name="raw", execute_fn=raw, partitioned_by=DAILY),
        fs.Asset(name="doubled", execute_fn=lambda ctx, deps: deps["raw"] * 2, partitioned_by=DAILY,
                 depends_on=("raw",)),
    ]
    store = _Counting()
    async with fs.open_runtime(assets, store=store) as rt:
        status = await rt.wait_backfill(await rt.backfill("doubled", partitions=DAYS[:12], max_parallel=1))
        assert (status.succeeded, status.failed) == (11, 1)
        assert status.errors == (("2025-01-07", "materialization failed: ValueError: no data that day "
                                                "[asset='raw', partition='2025-01-07']"),)
        assert store.begun == []
        assert await rt.load("doubled", DAYS[11]) == 24
        doubled = {r.partition: r for r in await rt.store.list_all(asset_name="doubled")}
        assert "2025-01-07" not in doubled  # its input failed: never begun
        raws = {r.partition: r for r in await rt.store.list_all(asset_name="raw")}
        for day, record in doubled.items():
            assert record.upstream_partitions == {"raw": (day,)}
            assert record.run_id == raws[day].run_id  # one run per partition, both assets in it
        calls = len(await rt.store.list_all())
        again = await rt.wait_backfill(await rt.backfill("doubled", partitions=DAYS[:12], max_parallel=1))
        assert (again.succeeded, again.failed) == (11, 1)
        assert len(await rt.store.list_all()) == calls + 1  # only the failed raw partition ran again
        roots = await rt.wait_backfill(await rt.backfill("raw", partitions=DAYS[12:], max_parallel=1))
        assert roots.succeeded == 18 and max(store.begun) > 1


async def test_a_downstream_backfill_over_an_upstream_up_to_date_runs_in_batches(anyio_backend):
    """upstream="missing" with the upstream partitions up to date: only the reader
    runs, so its partitions batch as a root's do, and each run announces its upstream
    skipped. A partition whose upstream is missing runs alone, upstream first."""
    from flowstone import events as ev

    store = _Counting()
    async with fs.open_runtime(raw_and_doubled(), store=store) as rt:
        await rt.wait_backfill(await rt.backfill("raw", partitions=DAYS[:11], max_parallel=1))  # not the 12th
        store.begun.clear()
        async with rt.events(kinds=[ev.MaterializationSkipped, ev.MaterializationSucceeded]) as events:
            status = await rt.wait_backfill(await rt.backfill("doubled", partitions=DAYS[:12], max_parallel=1))
            seen = []
            while events.pending:
                seen.append(events._queue.popleft())
        assert (status.state, status.succeeded, status.failed) == ("succeeded", 12, 0)
        assert max(store.begun) > 1  # the readers of what is stored, in batches
        skipped = sorted(e.partition for e in seen if isinstance(e, ev.MaterializationSkipped))
        assert skipped == [d.isoformat() for d in DAYS[:11]]  # raw, reused by each batched run
        succeeded = [(e.asset, e.partition) for e in seen if isinstance(e, ev.MaterializationSucceeded)]
        assert sorted(succeeded) == sorted([("doubled", d.isoformat()) for d in DAYS[:12]]
                                           + [("raw", DAYS[11].isoformat())])
        raws = {r.partition: r for r in await rt.store.list_all(asset_name="raw")}
        doubled = {r.partition: r for r in await rt.store.list_all(asset_name="doubled")}
        assert len(raws) == 12 and len(doubled) == 12  # nothing computed twice
        last = DAYS[11].isoformat()
        assert raws[last].run_id == doubled[last].run_id  # the missing one: one run, both assets
        for day, record in doubled.items():
            assert record.upstream_partitions == {"raw": (day,)}
            assert record.dependency_hash is not None
        assert [await rt.load("doubled", day) for day in DAYS[:12]] == [2 * d.day for d in DAYS[:12]]
        again = await rt.wait_backfill(await rt.backfill("doubled", partitions=DAYS[:12], max_parallel=1))
        assert again.succeeded == 12 and len(await rt.store.list_all()) == 24  # all reused: nothing written


async def test_batched_partitions_are_announced_one_by_one_and_skipped_ones_too(anyio_backend):
    from flowstone import events as ev

    store = _Counting()
    async with fs.open_runtime([asset_of(lambda ctx, deps: 1)], store=store) as rt:
        async with rt.events(kinds=[ev.MaterializationStarted, ev.MaterializationSucceeded,
                                    ev.MaterializationSkipped]) as events:
            for _ in range(2):
                await rt.wait_backfill(await rt.backfill("events", partitions=DAYS[:12], max_parallel=1))
            seen = []
            while events.pending:
                seen.append(events._queue.popleft())
    assert max(store.begun) > 1
    kinds = [type(e).__name__ for e in seen]
    assert kinds.count("MaterializationStarted") == kinds.count("MaterializationSucceeded") == 12
    assert kinds[-12:] == ["MaterializationSkipped"] * 12  # the second backfill
    succeeded = [e for e in seen if isinstance(e, ev.MaterializationSucceeded)]
    assert sorted(e.partition for e in succeeded) == [d.isoformat() for d in DAYS[:12]]
    assert len({e.run_id for e in succeeded}) == 12


async def test_a_partition_another_run_here_computes_is_followed_not_computed_again(anyio_backend):
    """Single flight holds in batches: the batch hands that partition to a run of
    its own, which waits for the other run and takes its success."""
    calls: list[str] = []
    release = anyio.Event()

    async def work(ctx, deps):
        calls.append(ctx.partition_key)
        if ctx.partition_key == "2025-01-05" and not release.is_set():
            await release.wait()
        return 1

    async with fs.open_runtime([asset_of(work)]) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(rt.materialize, "events", DAYS[4])

            async def computing():
                return "2025-01-05" in calls

            await until(computing)
            backfill = await rt.backfill("events", partitions=DAYS[:12], max_parallel=1)

            async def around_it_done():  # its batch ran the others: 01-01 alone, 01-02..01-06 but 01-05
                return (await rt.backfill_status(backfill)).succeeded >= 5

            await until(around_it_done)
            release.set()
        status = await rt.wait_backfill(backfill)
        assert (status.succeeded, status.failed) == (12, 0)
        assert sorted(calls) == sorted(d.isoformat() for d in DAYS[:12])  # 2025-01-05 once
        assert len(await rt.store.list_all()) == 12


async def test_upstream_none_batches_and_a_missing_input_fails_only_its_partition(anyio_backend):
    store = _Counting()
    async with fs.open_runtime(raw_and_doubled(), store=store) as rt:
        await rt.wait_backfill(await rt.backfill("raw", partitions=[d for d in DAYS[:12] if d != DAYS[6]]))
        store.begun.clear()
        status = await rt.wait_backfill(await rt.backfill("doubled", partitions=DAYS[:12], upstream="none",
                                                          max_parallel=1))
        assert (status.succeeded, status.failed) == (11, 1)
        [(partition, message)] = status.errors
        assert partition == "2025-01-07" and "upstream has no successful materialization" in message
        assert max(store.begun) > 1
        assert await rt.load("doubled", DAYS[11]) == 24
        record = await rt.store.get("doubled", DAYS[11])
        assert record.upstream_partitions == {"raw": ("2025-01-12",)}


async def test_a_guard_that_denies_after_the_start_fails_each_partition_of_a_batch(anyio_backend):
    class Closing:
        """Allows the backfill to start, and nothing after its first partitions."""

        def __init__(self) -> None:
            self.asked = 0

        def can_access(self, asset, context):
            return True

        def can_materialize(self, asset, context):
            self.asked += 1
            return self.asked <= 2

    store = _Counting()
    async with fs.open_runtime([asset_of(lambda ctx, deps: 1)], store=store, guard=Closing()) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS[:12], max_parallel=1))
        assert (status.succeeded, status.failed) == (1, 11)
        assert all("denied" in message or "not allowed" in message for _p, message in status.errors), status.errors
        assert store.begun == [] and len(await rt.store.list_all()) == 1  # a denial records nothing


async def test_metadata_the_store_cannot_hold_fails_its_partition_only_in_a_batch(anyio_backend, tmp_path):
    def work(ctx, deps):
        if ctx.partition_key == "2025-01-05":
            ctx.metadata["when"] = ctx.partition  # a date: not JSON
        return 1

    async with fs.store.SqliteStore(tmp_path / "flowstone.db") as store:
        async with fs.open_runtime([asset_of(work)], store=store) as rt:
            status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS[:12], max_parallel=1))
            assert (status.succeeded, status.failed) == (11, 1)
            [(partition, message)] = status.errors
            assert partition == "2025-01-05" and "SerializationError" in message
            records = await rt.store.list_all()
            assert len(records) == 12 and {r.status for r in records} == {Status.SUCCESS, Status.FAILED}
