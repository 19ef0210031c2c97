"""flowstone.testing (SPEC 9): the harness, chaos helpers, the integrity check,
assert_performance and the pytest fixture, each checked against what it claims."""

from __future__ import annotations

import threading
import uuid
from datetime import date, timedelta

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.store import Status
from flowstone.testing import (
    ActorKiller,
    ConcurrentHarness,
    FaultyIO,
    InjectedFault,
    IntegrityError,
    PerformanceError,
    assert_performance,
    check_integrity,
    kill_actor,
    terminate_connections,
)

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 12, 31))
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(40)]


def daily(fn, **options):
    return fs.Asset(name="events", execute_fn=fn, partitioned_by=DAILY, **options)


# ------------------------------------------------------------- harness


async def test_the_harness_counts_times_and_groups_failures(anyio_backend):
    inside, peak = 0, 0
    all_in = anyio.Event()

    async def operation(i):
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        if inside == 8:
            all_in.set()
        await all_in.wait()  # the first eight meet here: the harness runs eight at once
        await anyio.lowlevel.checkpoint()
        inside -= 1
        if i % 5 == 0:
            raise ValueError(f"bad {i}")
        if i == 7:
            raise KeyError(i)

    report = await ConcurrentHarness(threads=8, operations=operation, repeat=5).run()
    m = report.metrics
    assert (m.total_operations, m.success_count, m.failure_count) == (40, 31, 9)
    assert report.errors == {"ValueError": 8, "KeyError": 1}
    assert report.error_samples["ValueError"][0].startswith("bad ") and not report.ok
    assert peak == 8  # exactly `threads` at once, never more
    assert 0 < m.latency_ms.p50 <= m.latency_ms.p95 <= m.latency_ms.p99 <= m.latency_ms.max
    assert "40 operations" in str(report) and "8 x ValueError" in str(report)


async def test_plain_functions_run_on_that_many_threads(anyio_backend):
    idents, barrier = set(), threading.Barrier(4, timeout=10)

    def operation(i):
        idents.add(threading.get_ident())
        barrier.wait()  # all four must be inside at once, each on its own thread

    report = await ConcurrentHarness(threads=4, operations=operation).run()
    assert report.ok and len(idents) == 4


async def test_a_harness_timeout_counts_what_did_not_finish(anyio_backend):
    async def operation(i):
        if i >= 2:
            await anyio.Event().wait()  # never finishes: only the timeout ends it

    report = await ConcurrentHarness(threads=4, operations=operation, timeout=0.2).run()
    assert report.metrics.success_count == 2 and report.errors == {"TimeoutError": 2}


def test_a_harness_refuses_nonsense():
    with pytest.raises(ValueError):
        ConcurrentHarness(threads=0, operations=lambda i: None)
    with pytest.raises(TypeError):
        ConcurrentHarness(threads=2, operations=None)


# --------------------------------------------------------------- chaos


async def test_kill_actor_picks_reproducibly_and_the_runtime_recovers(anyio_backend):
    assets = [daily(lambda ctx, deps: 1), fs.Asset(name="other", execute_fn=lambda ctx, deps: 2)]
    async with fs.open_runtime(assets) as rt:
        assert await rt._actor_names() == ["registry", "memory-store", "executor:events", "executor:other"]
        first = [await kill_actor(rt, seed=seed) for seed in (1, 2, 3)]
        again = [await kill_actor(rt, seed=seed) for seed in (1, 2, 3)]
        assert first == again
        assert await kill_actor(rt, "executor:other") == "executor:other"
        assert (await rt.materialize("other")).materializations["other"].status is Status.SUCCESS


async def test_work_in_flight_survives_executors_being_killed(anyio_backend):
    """A backfill while executors are killed every few milliseconds: partitions whose
    executor died under them may fail; re-running leaves every partition with one
    success and nothing open."""

    killed_some = anyio.Event()

    async def held(ctx, deps):
        await killed_some.wait()  # in flight until the executor has died a few times
        return ctx.partition_key

    async with fs.open_runtime([daily(held)]) as rt:
        async with ActorKiller(rt, every=0.001, seed=7, limit=3) as killer:  # within the restart budget
            backfill = await rt.backfill("events", partitions=DAYS, max_parallel=8)

            async def three_kills():
                return len(killer.killed) >= 3

            await until(three_kills)
            killed_some.set()
            first = await rt.wait_backfill(backfill)
        assert killer.killed and set(killer.killed) == {"executor:events"}
        second = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=8))
        assert second.succeeded == len(DAYS)
        assert first.succeeded + first.failed == len(DAYS)
        report = await check_integrity(rt.store, "events", DAYS, rt.io_managers)
        assert report.ok, report.problems


async def test_faulty_io_is_reproducible_and_a_retry_policy_rides_it_out(anyio_backend):
    async def fault_pattern(seed):
        faulty = FaultyIO(fs.io.MemoryIO(), failure_rate=0.3, seed=seed)
        async with fs.open_runtime(
            [fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)], io_managers={"memory": faulty}
        ):
            outcomes = []
            for i in range(50):
                try:
                    await faulty.store("a", i, None, {})
                    outcomes.append(True)
                except InjectedFault:
                    outcomes.append(False)
            return outcomes

    first, again, other = await fault_pattern(3), await fault_pattern(3), await fault_pattern(4)
    assert first == again and first != other
    assert 5 <= first.count(False) <= 25  # about 30%

    faulty = FaultyIO(fs.io.MemoryIO(), failure_rate=0.1, latency=0.001, seed=11)
    asset = daily(lambda ctx, deps: ctx.partition_key, retry=fs.RetryPolicy(max_attempts=10, backoff=0, jitter=False))
    async with fs.open_runtime([asset], io_managers={"memory": faulty}) as rt:
        status = await rt.wait_backfill(await rt.backfill("events", partitions=DAYS, max_parallel=4))
        assert status.succeeded == len(DAYS) and faulty.faults["store"] > 0
        (await check_integrity(rt.store, "events", DAYS, rt.io_managers)).raise_if_bad()


async def test_terminate_connections_ends_the_store_s_connections_and_it_recovers(anyio_backend, pg_dsn):
    async with fs.store.PostgresStore(pg_dsn, min_size=3, max_size=3) as store:
        first = await store.create(asset_name="a", partition=None, run_id=uuid.uuid4())
        assert await terminate_connections(pg_dsn) >= 1
        assert (await store.get_by_id(first.id)).id == first.id  # a fresh connection, same data


# ----------------------------------------------------------- integrity


async def test_check_integrity_names_each_kind_of_problem(anyio_backend):
    io = fs.io.MemoryIO()
    async with fs.open_runtime([daily(lambda ctx, deps: 1)], io_managers={"memory": io}) as rt:
        first = [await rt.materialize("events", day) for day in DAYS[:3]]
        assert (await check_integrity(rt.store, "events", DAYS[:3], rt.io_managers)).ok
        store, run = rt.store, uuid.uuid4()
        await store.create(asset_name="events", partition=DAYS[0].isoformat(), run_id=run)  # left pending
        twice = await store.create(asset_name="events", partition=DAYS[1].isoformat(), run_id=run)
        twice = await store.update_status(twice.id, Status.RUNNING)
        await store.update_status(twice.id, Status.SUCCESS)  # a second success supersedes the first
        replaced = await store.get_by_id(first[1].materializations["events"].id)
        await io.delete("events", DAYS[2], {})
        report = await check_integrity(store, "events", DAYS[:4], rt.io_managers)
    assert replaced.status is Status.SUPERSEDED
    text = "\n".join(report.problems)
    assert "is still pending" in text
    assert "successes (duplicated)" not in text  # the store keeps one current success
    assert "points at a value" in text
    assert f"partition '{DAYS[3].isoformat()}' has no success" in text
    with pytest.raises(IntegrityError, match="integrity problems"):
        report.raise_if_bad()


# --------------------------------------------------------- performance


def test_assert_performance_passes_under_its_limits_and_says_by_how_much_otherwise():
    measured = assert_performance(lambda: sum(range(1000)), max_time_ms=1000, max_memory_bytes=10_000_000)
    assert measured.time_ms > 0 and measured.peak_memory_bytes is not None
    with pytest.raises(PerformanceError, match=r"summing took .* ms, over the limit of 0.0001 ms by"):
        assert_performance(lambda: sum(range(100_000)), max_time_ms=0.0001, label="summing")
    with pytest.raises(PerformanceError, match=r"peaked at .* bytes of traced memory, over the limit of 1,000,000"):
        assert_performance(lambda: [0] * 1_000_000, max_memory_bytes=1_000_000)
    with pytest.raises(ValueError):
        assert_performance(lambda: None)


async def test_assert_performance_awaits_an_async_function(anyio_backend):
    async def quick():
        await anyio.sleep(0)

    async def slow():
        for _ in range(3):
            await anyio.lowlevel.checkpoint()

    assert (await assert_performance(quick, max_time_ms=1000, max_memory_bytes=1_000_000)).time_ms < 1000
    with pytest.raises(PerformanceError, match="slow took"):
        await assert_performance(slow, max_time_ms=0.0001)


# -------------------------------------------------------- pytest plugin


async def _raw(ctx, deps):
    return [1, 2, 3]


async def _total(ctx, deps):
    return sum(deps["raw"])


PIPELINE = [fs.Asset(name="raw", execute_fn=_raw), fs.Asset(name="total", execute_fn=_total, depends_on=("raw",))]


@pytest.mark.flowstone(assets=PIPELINE)
async def test_the_fixture_gives_a_runtime_with_the_marked_assets(anyio_backend, flowstone_runtime, tmp_path):
    await flowstone_runtime.materialize("total")
    assert await flowstone_runtime.load("total") == 6
    assert flowstone_runtime.io_managers["filesystem"].root.startswith(str(tmp_path))


@pytest.mark.flowstone(assets=PIPELINE)
async def test_each_test_gets_a_fresh_runtime(anyio_backend, flowstone_runtime):
    assert await flowstone_runtime.store.list_all() == []  # nothing from the test before


@pytest.fixture
def flowstone_assets():
    return PIPELINE[:1]


async def test_a_flowstone_assets_fixture_works_too(anyio_backend, flowstone_runtime):
    assert [a.name for a in await flowstone_runtime.assets()] == ["raw"]
