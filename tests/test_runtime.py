"""The runtime (SPEC 7) on the memory store and memory IO, on asyncio and trio."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from datetime import date, datetime, timezone

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import until

import flowstone as fs
from flowstone.runtime.executor import Stats
from flowstone.store import Status

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 31))



def chain_pipeline(calls: list[str] | None = None) -> fs.Pipeline:
    calls = [] if calls is None else calls
    pipeline = fs.Pipeline("chain")

    @pipeline.asset
    async def raw(ctx, deps):
        calls.append("raw")
        return [1, 2, 3]

    @pipeline.asset(depends_on=["raw"])
    def clean(ctx, deps):  # a plain function: runs in a worker thread
        calls.append("clean")
        return [x * 10 for x in deps["raw"]]

    @pipeline.asset(depends_on=["clean"])
    async def report(ctx, deps):
        calls.append("report")
        return {"total": sum(deps["clean"])}

    return pipeline


# ------------------------------------------------------------ materialize


async def test_materialize_runs_upstream_in_order_and_stores_the_value(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        result = await rt.materialize("report")
        assert calls == ["raw", "clean", "report"]
        assert set(result.materializations) == {"raw", "clean", "report"}
        assert all(m.status is Status.SUCCESS for m in result.materializations.values())
        assert result.skipped == ()
        assert await rt.load("report") == {"total": 60}
        assert await rt.load("clean") == [10, 20, 30]


async def test_a_runtime_leaves_its_hosts_garbage_collector_alone(anyio_backend):
    """Only FlowStone's own processes set their collector (ADR 0049): a service
    embedding a runtime (or a test suite opening hundreds) decides that itself."""
    before = gc.get_freeze_count(), gc.get_threshold()
    async with fs.open_runtime(chain_pipeline()) as rt:
        await rt.materialize("report")
        assert (gc.get_freeze_count(), gc.get_threshold()) == before
    assert (gc.get_freeze_count(), gc.get_threshold()) == before


async def test_records_carry_lineage_timing_and_the_run(anyio_backend):
    async with fs.open_runtime(chain_pipeline()) as rt:
        result = await rt.materialize("report")
        report = result.materializations["report"]
        assert report.upstream_assets == ("clean",)
        assert report.upstream_partitions == {"clean": (None,)}
        assert report.run_id == result.run_id
        assert report.dependency_hash and len(report.dependency_hash) == 64
        assert report.executor_node.endswith("/executor:report")
        assert report.started_at <= report.completed_at and report.duration_ms >= 0
        assert {r.id for r in await rt.store.get_by_run_id(result.run_id)} == {
            m.id for m in result.materializations.values()
        }


async def test_a_second_materialize_with_nothing_changed_computes_nothing(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        first = await rt.materialize("report")
        calls.clear()
        second = await rt.materialize("report")
        assert calls == []
        assert set(second.skipped) == {"raw", "clean", "report"}
        assert second.materializations["report"].id == first.materializations["report"].id


async def test_force_recomputes_the_target_only(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        await rt.materialize("report")
        calls.clear()
        result = await rt.materialize("report", force=True)
        assert calls == ["report"] and set(result.skipped) == {"raw", "clean"}


async def test_upstream_all_recomputes_everything(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        await rt.materialize("report")
        calls.clear()
        await rt.materialize("report", upstream="all")
        assert calls == ["raw", "clean", "report"]


async def test_upstream_none_reads_stored_values_and_refuses_when_missing(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        with pytest.raises(fs.NotFound, match="materialize it first") as info:
            await rt.materialize("report", upstream="none")
        assert info.value.asset == "clean"
        assert await rt.store.list_all() == []  # nothing recorded for the refused run
        await rt.materialize("clean")
        calls.clear()
        await rt.materialize("report", upstream="none")
        assert calls == ["report"]


async def test_rematerializing_upstream_makes_dependents_stale_then_rebuilds_them(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        first = await rt.materialize("report")
        await rt.materialize("raw", force=True)
        assert (await rt.store.get_by_id(first.materializations["clean"].id)).status is Status.STALE
        assert (await rt.store.get_by_id(first.materializations["report"].id)).status is Status.STALE
        calls.clear()
        rebuilt = await rt.materialize("report")
        assert calls == ["clean", "report"] and rebuilt.skipped == ("raw",)


async def test_a_new_code_version_rebuilds(anyio_backend):
    def pipeline(version):
        return fs.Pipeline("p", assets=[
            fs.Asset(name="a", execute_fn=lambda ctx, deps: 1, code_version=version)
        ])

    store, io = fs.store.MemoryStore(), fs.io.MemoryIO()
    async with fs.open_runtime(pipeline("1"), store=store, io_managers={"memory": io}) as rt:
        await rt.materialize("a")
        assert (await rt.materialize("a")).skipped == ("a",)
    async with fs.open_runtime(pipeline("2"), store=store, io_managers={"memory": io}) as rt:
        assert (await rt.materialize("a")).skipped == ()


async def test_independent_branches_run_concurrently(anyio_backend):
    """Both branches must be inside their functions at once for either to finish."""
    both_running = anyio.Event()
    arrived = []

    async def branch(ctx, deps):
        arrived.append(ctx.asset.name)
        if len(arrived) == 2:
            both_running.set()
        await both_running.wait()
        return ctx.asset.name

    pipeline = fs.Pipeline("fork", assets=[
        fs.Asset(name="root", execute_fn=lambda ctx, deps: 0),
        fs.Asset(name="left", depends_on=("root",), execute_fn=branch),
        fs.Asset(name="right", depends_on=("root",), execute_fn=branch),
        fs.Asset(name="join", depends_on=("left", "right"), execute_fn=lambda ctx, deps: deps),
    ])
    async with fs.open_runtime(pipeline) as rt:
        with anyio.fail_after(5):
            await rt.materialize("join")
        assert await rt.load("join") == {"left": "left", "right": "right"}


async def test_context_gives_the_function_what_spec_promises(anyio_backend):
    seen = {}

    @fs.asset(partitioned_by=DAILY, requires=["db"])
    def inspect_ctx(ctx, deps):
        seen.update(
            asset=ctx.asset.name, partition=ctx.partition, key=ctx.partition_key, run_id=ctx.run_id,
            tenant=ctx.tenant, logger=ctx.log.name, db=ctx.resources["db"], current=fs.current_tenant(),
            thread=threading.current_thread() is threading.main_thread(),
        )
        ctx.metadata["rows"] = 7
        return None

    async with fs.open_runtime([inspect_ctx], resources={"db": "conn"}) as rt:
        with fs.tenant_scope("acme"):
            result = await rt.materialize("inspect_ctx", date(2025, 1, 15))
    record = result.materializations["inspect_ctx"]
    assert seen == {
        "asset": "inspect_ctx", "partition": date(2025, 1, 15), "key": "2025-01-15", "run_id": result.run_id,
        "tenant": "acme", "logger": "flowstone.asset.inspect_ctx", "db": "conn", "current": "acme",
        "thread": False,
    }
    assert record.metadata["rows"] == 7


# ---------------------------------------------------------------- failures


def failing_pipeline(attempts: list[int], fail_times: int, retry=None) -> fs.Pipeline:
    async def flaky(ctx, deps):
        attempts.append(1)
        if len(attempts) <= fail_times:
            raise ValueError(f"bad row {len(attempts)}")
        return "ok"

    return fs.Pipeline("f", assets=[
        fs.Asset(name="flaky", execute_fn=flaky, retry=retry),
        fs.Asset(name="after", depends_on=("flaky",), execute_fn=lambda ctx, deps: deps["flaky"]),
        fs.Asset(name="beside", execute_fn=lambda ctx, deps: "fine"),
        fs.Asset(name="both", depends_on=("after", "beside"), execute_fn=lambda ctx, deps: deps),
    ])


async def test_a_failing_asset_is_recorded_and_its_dependents_do_not_run(anyio_backend):
    async with fs.open_runtime(failing_pipeline([], fail_times=1)) as rt:
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("both")
        error = info.value
        assert error.asset == "flaky" and isinstance(error.__cause__, ValueError)
        assert "bad row 1" in str(error)
        failed = error.result.materializations["flaky"]
        assert failed.status is Status.FAILED and failed.error_message == "ValueError: bad row 1"
        assert error.result.materializations["beside"].status is Status.SUCCESS  # the other branch ran
        names = {r.asset_name for r in await rt.store.list_all()}
        assert names == {"flaky", "beside"}  # 'after' and 'both' never started


async def test_retry_policy_retries_before_failing(anyio_backend):
    attempts: list[int] = []
    policy = fs.RetryPolicy(max_attempts=3, backoff=0)
    async with fs.open_runtime(failing_pipeline(attempts, fail_times=2, retry=policy)) as rt:
        result = await rt.materialize("after")
        assert len(attempts) == 3
        assert result.materializations["flaky"].metadata["attempts"] == 3


async def test_retries_exhausted_records_the_last_error(anyio_backend):
    attempts: list[int] = []
    policy = fs.RetryPolicy(max_attempts=2, backoff=0)
    async with fs.open_runtime(failing_pipeline(attempts, fail_times=5, retry=policy)) as rt:
        with pytest.raises(fs.MaterializationFailed, match="bad row 2"):
            await rt.materialize("flaky")
        assert len(attempts) == 2


async def test_a_value_the_io_manager_cannot_hold_fails_the_asset_not_the_runtime(anyio_backend):
    class Picky:
        async def load(self, asset, partition, config):
            raise fs.NotFound("nothing", asset=asset)

        async def store(self, asset, value, partition, config):
            raise fs.SerializationError(f"cannot hold {type(value).__name__}", asset=asset)

        async def delete(self, asset, partition, config):
            return None

    pipeline = fs.Pipeline("p", assets=[fs.Asset(name="a", execute_fn=lambda ctx, deps: object(), io_manager="picky")])
    async with fs.open_runtime(pipeline, io_managers={"picky": Picky()}) as rt:
        with pytest.raises(fs.MaterializationFailed, match="cannot hold object"):
            await rt.materialize("a")
        assert (await rt.store.get("a")).status is Status.FAILED


# -------------------------------------------------------------- partitions


def partitioned_pipeline() -> fs.Pipeline:
    pipeline = fs.Pipeline("daily")

    @pipeline.asset(partitioned_by=DAILY)
    async def events(ctx, deps):
        return [ctx.partition_key]

    @pipeline.asset(partitioned_by=DAILY, depends_on=["events", "lookup"])
    async def enriched(ctx, deps):
        return {"events": deps["events"], "lookup": deps["lookup"]}

    @pipeline.asset
    async def lookup(ctx, deps):
        return "v1"

    @pipeline.asset(depends_on=["events"])
    async def summary(ctx, deps):
        return deps["events"]

    return pipeline


async def test_same_partitioning_reads_the_same_partition_and_broadcast_reads_the_single_value(anyio_backend):
    async with fs.open_runtime(partitioned_pipeline()) as rt:
        result = await rt.materialize("enriched", partition="2025-01-15")
        assert await rt.load("enriched", date(2025, 1, 15)) == {"events": ["2025-01-15"], "lookup": "v1"}
        assert result.materializations["events"].partition == "2025-01-15"
        assert result.materializations["lookup"].partition is None


async def test_unpartitioned_reader_gets_every_existing_partition_as_a_mapping(anyio_backend):
    async with fs.open_runtime(partitioned_pipeline()) as rt:
        for day in (date(2025, 1, 1), date(2025, 1, 2)):
            await rt.materialize("events", day)
        result = await rt.materialize("summary")
        assert await rt.load("summary") == {"2025-01-01": ["2025-01-01"], "2025-01-02": ["2025-01-02"]}
        assert result.materializations["summary"].upstream_partitions == {"events": ("2025-01-01", "2025-01-02")}


async def test_an_unpartitioned_reader_given_a_partition_reads_that_partition(anyio_backend):
    """SPEC 7's example: a report over partitioned events, materialized for one day."""
    async with fs.open_runtime(partitioned_pipeline()) as rt:
        result = await rt.materialize("summary", partition=date(2025, 1, 15))
        assert await rt.load("summary", partition=date(2025, 1, 15)) == ["2025-01-15"]
        record = result.materializations["summary"]
        assert record.partition == "2025-01-15" and record.upstream_partitions == {"events": ("2025-01-15",)}
        with pytest.raises(fs.NotFound):
            await rt.load("summary")  # the whole-range summary was never computed


@pytest.mark.parametrize(
    ("name", "partition", "message", "refused_by"),
    [
        ("events", None, "pass partition=", "events"),
        ("events", date(2024, 12, 31), "outside", "events"),
        ("events", "15/01/2025", "not a date", "events"),
        ("lookup", date(2025, 1, 1), "not partitioned", "lookup"),
        ("summary", date(2024, 12, 31), "outside", "events"),  # carried to 'events', which refuses it
    ],
)
async def test_bad_partitions_are_refused_before_anything_runs(anyio_backend, name, partition, message, refused_by):
    async with fs.open_runtime(partitioned_pipeline()) as rt:
        with pytest.raises(fs.InvalidPartition, match=message) as info:
            await rt.materialize(name, partition)
        assert info.value.asset == refused_by
        assert await rt.store.list_all() == []


# ----------------------------------------------------------------- tenants


async def test_records_and_values_are_scoped_by_tenant(anyio_backend):
    calls: list[str] = []
    async with fs.open_runtime(chain_pipeline(calls)) as rt:
        with fs.tenant_scope("a"):
            await rt.materialize("report")
            assert {r.tenant_id for r in await rt.store.list_all()} == {"a"}
        with fs.tenant_scope("b"):
            assert await rt.store.list_all() == []
            with pytest.raises(fs.NotFound):
                await rt.load("report")
            calls.clear()
            await rt.materialize("report")  # b's own run: nothing of a's is reused
            assert calls == ["raw", "clean", "report"]
        with pytest.raises(fs.NotFound):
            await rt.load("report")  # no tenant sees neither


# ------------------------------------------------------------------ guards


class Policy:
    def __init__(self, *, materialize=True, access=True):
        self.allow = {"materialize": materialize, "access": access}
        self.contexts = []

    def can_materialize(self, asset, context):
        self.contexts.append(dict(context))
        return self.allow["materialize"]

    async def can_access(self, asset, context):
        if self.allow["access"] == "raise":
            raise RuntimeError("policy down")
        return self.allow["access"]


async def test_a_denied_materialization_raises_and_leaves_no_record(anyio_backend):
    guard = Policy(materialize=False)
    async with fs.open_runtime(chain_pipeline(), guard=guard) as rt:
        with fs.tenant_scope("acme"):
            with pytest.raises(fs.AccessDenied) as info:
                await rt.materialize("report", context={"user": "ana"})
            assert info.value.action == "materialize" and info.value.tenant == "acme"
            assert await rt.store.list_all() == []
    assert guard.contexts[0] == {"user": "ana", "tenant": "acme"}


async def test_load_asks_the_guard_and_a_raising_guard_denies(anyio_backend):
    guard = Policy()
    async with fs.open_runtime(chain_pipeline(), guard=guard) as rt:
        await rt.materialize("raw")
        guard.allow["access"] = "raise"
        with pytest.raises(fs.AccessDenied, match="policy down") as info:
            await rt.load("raw")
        assert info.value.action == "access"


# ------------------------------------------------------------- single flight


async def test_concurrent_materializations_of_one_partition_share_one_computation(anyio_backend):
    calls = []
    release = anyio.Event()

    async def slow(ctx, deps):
        calls.append(1)
        await release.wait()
        return "done"

    async with fs.open_runtime([fs.Asset(name="slow", execute_fn=slow)]) as rt:
        results = []

        async def call():
            results.append(await rt.materialize("slow"))

        async def sharing():
            stats = (await rt.statistics())["slow"]
            return stats.in_flight == 1 and stats.followers == 2

        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(call)
            await until(sharing)
            release.set()
        assert calls == [1]
        assert len({r.materializations["slow"].id for r in results}) == 1
        assert len(await rt.store.list_all()) == 1


class _LateLookups(fs.store.MemoryStore):
    """A memory store whose lookups, once ``hold`` is set, answer only after ``release``:
    a caller then decides on what it saw before another caller finished."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.looked = anyio.Event()
        self.release = anyio.Event()

    async def latest_successes(self, pairs):
        found = await super().latest_successes(pairs)
        if self.hold:
            self.hold = False
            self.looked.set()
            await self.release.wait()
        return found


async def test_a_caller_that_saw_nothing_reuses_a_computation_finished_meanwhile(anyio_backend):
    """The second caller looked up "nothing stored" before the first finished and asks
    for leases after: it takes the first one's records (the downstream one too, whose
    dependency hash it knows only once its input is settled) instead of computing again."""
    calls = []

    async def raw(ctx, deps):
        calls.append("raw")
        return 1

    async def once(ctx, deps):
        calls.append("once")
        return deps["raw"] + 1

    assets = [fs.Asset(name="raw", execute_fn=raw), fs.Asset(name="once", execute_fn=once, depends_on=("raw",))]
    store = _LateLookups()
    async with fs.open_runtime(assets, store=store) as rt:
        late = []

        async def second():
            late.append(await rt.materialize("once"))

        store.hold = True
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(second)
            await store.looked.wait()
            first = await rt.materialize("once")
            store.release.set()
        assert calls == ["raw", "once"]
        assert late[0].materializations == first.materializations
        assert set(late[0].skipped) == {"raw", "once"}
        assert len(await rt.store.list_all()) == 2
        # What a caller saw is respected: a stale record is rebuilt, and force recomputes.
        await rt.store.mark_stale("raw", None)
        await rt.materialize("once")
        await rt.materialize("once", force=True)
        assert calls == ["raw", "once", "once", "once"]


class _CountingStaleMarks(fs.store.MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.marked = []

    async def mark_stale(self, asset_name, partition):
        self.marked.append(asset_name)
        await super().mark_stale(asset_name, partition)


async def test_only_an_asset_something_reads_pays_for_the_stale_cascade(anyio_backend):
    """A forced rebuild of a leaf has nothing in the graph built on it: no cascade
    query (on PostgreSQL it grows with the table); its upstream still cascades."""
    store = _CountingStaleMarks()
    assets = [fs.Asset(name="raw", execute_fn=lambda ctx, deps: 1),
              fs.Asset(name="report", execute_fn=lambda ctx, deps: 2, depends_on=("raw",))]
    async with fs.open_runtime(assets, store=store) as rt:
        first = await rt.materialize("report")
        second = await rt.materialize("report", force=True)
        assert store.marked == []  # report is a leaf
        await rt.materialize("raw", force=True)
        assert store.marked == ["raw"]
        assert (await rt.store.get_by_id(first.materializations["report"].id)).status is Status.SUPERSEDED
        assert (await rt.store.get_by_id(second.materializations["report"].id)).status is Status.STALE


async def test_max_concurrency_queues_partitions_beyond_the_limit(anyio_backend):
    inside, peak = [], []
    release = anyio.Event()

    async def limited(ctx, deps):
        inside.append(1)
        peak.append(len(inside))
        await release.wait()
        inside.pop()

    asset = fs.Asset(name="limited", execute_fn=limited, partitioned_by=DAILY, max_concurrency=2)
    async with fs.open_runtime([asset]) as rt:
        async def queued():
            stats = (await rt.statistics())["limited"]
            return stats.in_flight == 2 and stats.queued == 3

        async with anyio.create_task_group() as tasks:
            for day in range(1, 6):
                tasks.start_soon(rt.materialize, "limited", date(2025, 1, day))
            await until(queued)
            release.set()
        assert max(peak) == 2 and len(peak) == 5


# ------------------------------------------------------------- cancellation


async def test_a_lease_granted_to_a_caller_that_left_goes_to_the_next_caller(anyio_backend):
    # A caller cancelled between posting its request and the executor's answer
    # cannot run the partition nor hand the lease back: the executor must see that,
    # or every later caller of that partition would wait on a flight nobody flies.
    from flowstone.actors.mailbox import open_mailbox
    from flowstone.runtime.executor import Finished, Lease, Stats, Submit, executor_actor

    handle, send, receive = open_mailbox("executor:a")
    with send, receive:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(executor_actor(fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)), receive)
            gone = await handle.request(Submit, tenant=None, key="k")
            gone.discard()  # cancelled before the executor answered
            leader = await handle.request(Submit, tenant=None, key="k")
            with anyio.fail_after(5):
                lease = await leader.result()
            assert isinstance(lease, Lease)
            # The same when the lease is passed on: the leader gives up, the first
            # follower has left, the second one gets it.
            left, staying = [await handle.request(Submit, tenant=None, key="k") for _ in range(2)]
            assert (await handle.call(Stats)).followers == 2
            left.discard()
            await handle.cast(Finished(tenant=None, key="k", token=lease.token, result=None))
            with anyio.fail_after(5):
                assert isinstance(await staying.result(), Lease)
            stats = await handle.call(Stats)
            assert (stats.in_flight, stats.followers) == (1, 0)
            send.close()


@contextlib.asynccontextmanager
async def gate_executor():
    """An executor actor whose handle carries its door, as the runtime makes them."""
    from flowstone.actors.supervisor import RestartPolicy, spawn
    from flowstone.runtime.executor import Door, executor_actor

    asset = fs.Asset(name="a", execute_fn=lambda ctx, deps: 1)
    door = Door(asset)
    async with anyio.create_task_group() as tasks:
        handle = spawn(tasks, "executor:a", executor_actor(asset, door), RestartPolicy(), shared=door)
        yield handle, door
        handle.close()


async def test_the_gate_answers_direct_callers_at_once_and_followers_when_the_leader_finishes(anyio_backend):
    # Runs in the runtime's loop ask the executor's gate directly (no message, no
    # event-loop turn); what must wait still waits for the leader, as by message.
    from flowstone.runtime.executor import JobResult, Lease, Stats, finish, submit
    from flowstone.store.records import new_record

    async with gate_executor() as (handle, door):
        leader = await submit(handle, None, "k")
        follower = await submit(handle, None, "k")
        other = await submit(handle, "tenant-b", "k")  # another tenant's partition is another flight
        assert door.gate is not None and len(door.gate.flights) == 2  # before the actor's task even began
        lease = await leader.result()
        assert isinstance(lease, Lease) and isinstance(await other.result(), Lease)
        stats = await handle.call(Stats)  # the actor serves messages on the same gate
        assert (stats.in_flight, stats.followers) == (2, 1)
        result = JobResult(record=new_record({"asset_name": "one"}, None, datetime.now(timezone.utc)))
        assert finish(handle, None, "k", lease.token, result) is None  # handed straight to the gate
        with anyio.fail_after(5):
            assert await follower.result() is result
        assert (await handle.call(Stats)).in_flight == 1


async def test_a_batch_takes_a_lease_straight_from_the_gate_only_when_submit_would_grant_it(anyio_backend):
    # lease_now is submit's answer without its reply: for a free partition only.
    from flowstone.runtime.executor import Door, Lease, finish, lease_now, submit

    async with gate_executor() as (handle, door):
        lease = lease_now(handle, None, "k")
        assert isinstance(lease, Lease)
        assert lease_now(handle, None, "k") is None  # in flight: a caller must follow it, by submit
        follower = await submit(handle, None, "k")
        assert not follower.ready
        other = lease_now(handle, "tenant-b", "k")
        assert isinstance(other, Lease) and other.token != lease.token
        assert finish(handle, None, "k", lease.token, None) is None
        with anyio.fail_after(5):
            assert isinstance(await follower.result(), Lease)  # the leader left: the follower runs it
        gate, door.gate = door.gate, None  # down, as between a crash and the restart
        assert lease_now(handle, None, "free") is None  # then only a message asks
        door.gate = gate
    limited = fs.Asset(name="one", execute_fn=lambda ctx, deps: 1, max_concurrency=1)
    async with anyio.create_task_group() as tasks:
        from flowstone.actors.supervisor import RestartPolicy, spawn
        from flowstone.runtime.executor import executor_actor

        one_door = Door(limited)
        one = spawn(tasks, "executor:one", executor_actor(limited, one_door), RestartPolicy(), shared=one_door)
        assert isinstance(lease_now(one, None, "a"), Lease)
        assert lease_now(one, None, "b") is None  # no slot free: submit would queue it
        one.close()


async def test_a_bug_in_a_direct_gate_call_restarts_the_executor_with_a_new_gate(anyio_backend, monkeypatch):
    from flowstone.errors import ActorCrashed
    from flowstone.runtime import executor as ex

    async with gate_executor() as (handle, door):
        first = door.gate
        waiting = await ex.submit(handle, None, "held")  # a leader, then a follower of it
        follower = await ex.submit(handle, None, "held")
        assert isinstance(await waiting.result(), ex.Lease)

        def broken(self, message):
            raise KeyError("a bug")

        monkeypatch.setattr(ex._Gate, "submit", broken)
        monkeypatch.setattr(ex._Gate, "lease_now", broken)  # what submit asks first
        with pytest.raises(ActorCrashed) as caught:
            await ex.submit(handle, None, "k")
        assert isinstance(caught.value.__cause__, KeyError)
        with anyio.fail_after(5), pytest.raises(ActorCrashed):
            await follower.result()  # nobody waits on a broken gate
        monkeypatch.undo()
        with anyio.fail_after(5):
            while door.gate is None or door.gate is first:  # until the supervisor has restarted it
                await anyio.lowlevel.checkpoint()
            assert isinstance(await (await ex.submit(handle, None, "k")).result(), ex.Lease)


async def test_a_lease_granted_at_once_is_handed_back_when_abandoned(anyio_backend):
    """``submit`` of a free partition is answered by the gate on the spot (no reply or
    message); a run that does not use it (an input failed) hands the lease back."""
    from flowstone.runtime import executor as ex
    from flowstone.runtime.run import hand_back

    async with gate_executor() as (handle, door):
        granted = await ex.submit(handle, None, "k")
        assert isinstance(granted, ex.Granted) and granted.ready
        assert door.gate is not None and list(door.gate.flights) == [(None, "k")]
        await granted.abandon(hand_back(handle, None, "k"))
        with anyio.fail_after(5):
            while door.gate.flights:  # the Finished cast reaches the gate
                await anyio.lowlevel.checkpoint()
        again = await ex.submit(handle, None, "k")
        assert isinstance(await again.result(), ex.Lease)


async def test_while_the_gate_is_down_a_caller_asks_by_message(anyio_backend):
    from flowstone.runtime.executor import Lease, Stats, submit

    async with gate_executor() as (handle, door):
        await handle.call(Stats)  # the actor serves its gate now
        gate, door.gate = door.gate, None  # as between a crash and the restart
        pending = await submit(handle, None, "k")
        assert gate is not None and not gate.flights  # not asked directly
        with anyio.fail_after(5):
            assert isinstance(await pending.result(), Lease)  # the actor answered the message
        assert len(gate.flights) == 1


async def test_cancelling_a_caller_records_its_job_cancelled(anyio_backend):
    started = anyio.Event()

    async def forever(ctx, deps):
        started.set()
        await anyio.Event().wait()

    async with fs.open_runtime([fs.Asset(name="forever", execute_fn=forever)]) as rt:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(rt.materialize, "forever")
                await started.wait()
                scope.cancel()
        record = await rt.store.get("forever")
        assert record.status is Status.CANCELLED and record.error_message == "cancelled"
        assert (await rt.statistics())["forever"].in_flight == 0


async def test_a_waiting_caller_takes_over_when_the_leader_is_cancelled(anyio_backend):
    runs = []
    first_started = anyio.Event()

    async def work(ctx, deps):
        runs.append(1)
        if len(runs) == 1:
            first_started.set()
            await anyio.Event().wait()  # the leader's run never finishes: it is cancelled
        return "second"

    async with fs.open_runtime([fs.Asset(name="work", execute_fn=work)]) as rt:
        results, scopes = [], []

        async def leader():
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await rt.materialize("work")

        async def follower():
            results.append(await rt.materialize("work"))

        async def following():
            return (await rt.statistics())["work"].followers == 1

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(leader)
            await first_started.wait()
            tasks.start_soon(follower)
            await until(following)
            scopes[0].cancel()
        assert len(runs) == 2
        assert results[0].materializations["work"].status is Status.SUCCESS
        assert await rt.load("work") == "second"
        assert sorted(r.status.value for r in await rt.store.list_all()) == ["cancelled", "success"]


# ------------------------------------------------------------- registration


async def test_register_adds_an_asset_that_can_then_run(anyio_backend):
    async with fs.open_runtime(chain_pipeline()) as rt:
        extra = fs.Asset(name="extra", depends_on=("report",), execute_fn=lambda ctx, deps: deps["report"]["total"])
        await rt.register(extra)
        assert [a.name for a in await rt.assets()][-1] == "extra"
        await rt.materialize("extra")
        assert await rt.load("extra") == 60


async def test_an_executor_starts_on_first_use_once_however_many_ask(anyio_backend):
    async with fs.open_runtime(chain_pipeline()) as rt:
        await rt.register(fs.Asset(name="extra", depends_on=("report",), execute_fn=lambda ctx, deps: 1))
        snapshot = await rt._snapshot()
        assert [snapshot.executors.running(name) for name in ("raw", "clean", "report", "extra")] == [None] * 4
        idle = await rt.statistics()
        assert sorted(idle) == ["clean", "extra", "raw", "report"]  # every asset, none started to say so
        assert {(s.in_flight, s.followers, s.queued, s.awaiting_approval) for s in idle.values()} == {(0, 0, 0, 0)}
        assert snapshot.executors.running("extra") is None
        assert "executor:extra" in await rt._actor_names()

        results = []

        async def run():
            results.append(await rt.materialize("extra"))

        async with anyio.create_task_group() as tasks:  # both ask before either executor exists
            tasks.start_soon(run)
            tasks.start_soon(run)
        handles = {name: snapshot.executors.running(name) for name in ("raw", "clean", "report", "extra")}
        assert None not in handles.values()
        assert (await rt._snapshot()).executors["extra"] is handles["extra"]  # later snapshots share it
        assert len(await rt.store.list_by_status("success")) == 4  # each asset computed once: one executor each
        assert [r.materializations["extra"].status for r in results] == [Status.SUCCESS] * 2
    with pytest.raises(fs.RuntimeClosed):
        await snapshot.executors["clean"].call(Stats)  # started: its mailbox closed with the runtime


async def test_an_executor_cannot_start_once_the_runtime_closed(anyio_backend):
    async with fs.open_runtime(chain_pipeline()) as rt:
        snapshot = await rt._snapshot()
    with pytest.raises(fs.RuntimeClosed):
        snapshot.executors["raw"]


@pytest.mark.parametrize(
    ("asset", "problem"),
    [
        (fs.Asset(name="raw", execute_fn=lambda ctx, deps: 1), "already registered"),
        (fs.Asset(name="x", depends_on=("ghost",), execute_fn=lambda ctx, deps: 1), "unknown dependency"),
        (fs.Asset(name="x", depends_on=("x",), execute_fn=lambda ctx, deps: 1), "itself"),
        (fs.Asset(name="x", execute_fn=lambda ctx, deps: 1, io_manager="nowhere"), "unknown IO manager"),
        (fs.Asset(name="x"), "execute"),
    ],
)
async def test_register_refuses_what_would_break_the_graph(anyio_backend, asset, problem):
    async with fs.open_runtime(chain_pipeline()) as rt:
        with pytest.raises(fs.DefinitionError, match=problem):
            await rt.register(asset)
        assert len(await rt.assets()) == 3


async def test_concurrent_registrations_of_one_name_admit_exactly_one(anyio_backend):
    async with fs.open_runtime([]) as rt:
        outcomes = []

        async def register(index):
            try:
                await rt.register(fs.Asset(name="same", execute_fn=lambda ctx, deps: index))
                outcomes.append("ok")
            except fs.DefinitionError:
                outcomes.append("refused")

        async with anyio.create_task_group() as tasks:
            for index in range(10):
                tasks.start_soon(register, index)
            for index in range(10):
                tasks.start_soon(rt.register, fs.Asset(name=f"n{index}", execute_fn=lambda ctx, deps: 1))
        assert sorted(outcomes) == ["ok"] + ["refused"] * 9
        assert len(await rt.assets()) == 11


# ------------------------------------------------------------------- errors


async def test_unknown_asset_names_are_not_found_naming_them(anyio_backend):
    async with fs.open_runtime(chain_pipeline()) as rt:
        for call in (rt.materialize("nope"), rt.load("nope"), rt.backfill("nope", partitions=[])):
            with pytest.raises(fs.NotFound, match="'nope'"):
                await call


@pytest.mark.parametrize(
    "kwargs",
    [{"upstream": "some"}, {"force": "yes"}, {"io": {"io_manager": "nowhere"}}, {"io": "memory"}, {"context": 3}],
)
async def test_bad_materialize_arguments_are_definition_errors(anyio_backend, kwargs):
    async with fs.open_runtime(chain_pipeline()) as rt:
        with pytest.raises(fs.DefinitionError):
            await rt.materialize("report", **kwargs)


async def test_open_runtime_validates_the_pipeline_and_its_keys_first(anyio_backend):
    bad = fs.Pipeline(
        "p", assets=[fs.Asset(name="a", execute_fn=lambda ctx, deps: 1, io_manager="nowhere", requires=("db",))]
    )
    with pytest.raises(fs.DefinitionError) as info:
        async with fs.open_runtime(bad):
            pass  # pragma: no cover
    assert {e.field for e in info.value.errors} == {"io_manager", "requires"}
    with pytest.raises(fs.DefinitionError, match="default_io_manager"):
        async with fs.open_runtime(chain_pipeline(), default_io_manager="nowhere"):
            pass  # pragma: no cover


async def test_built_in_io_managers_are_registered_unless_given(anyio_backend, tmp_path, monkeypatch):
    """SPEC 5: filesystem, parquet and s3 always (they connect or write only when
    used), postgres when FLOWSTONE_DSN is set; a manager the caller passes wins."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWSTONE_DSN", raising=False)
    asset = fs.Asset(name="a", execute_fn=lambda ctx, deps: {"v": 1}, io_manager="filesystem")
    async with fs.open_runtime([asset]) as rt:
        await rt.materialize("a")
        assert await rt.load("a") == {"v": 1}
        assert set(rt.io_managers) == {"memory", "filesystem", "parquet", "s3"}
    assert (tmp_path / ".flowstone" / "storage" / "@shared" / "a" / "@all.json").is_file()
    mine = fs.io.FilesystemIO(tmp_path / "mine")
    monkeypatch.setenv("FLOWSTONE_DSN", "postgresql://nobody@127.0.0.1:1/none")
    async with fs.open_runtime([asset], io_managers={"filesystem": mine}) as rt:
        assert rt.io_managers["filesystem"] is mine
        assert isinstance(rt.io_managers["postgres"], fs.io.PostgresIO)


async def test_the_io_override_stores_the_target_elsewhere_and_loads_find_it(anyio_backend):
    other = fs.io.MemoryIO()
    async with fs.open_runtime(chain_pipeline(), io_managers={"other": other}) as rt:
        result = await rt.materialize("report", io={"io_manager": "other", "config": {"note": "x"}})
        assert result.materializations["report"].metadata["flowstone.io_manager"] == "other"
        assert await other.load("report", None, {}) == {"total": 60}
        assert await rt.load("report") == {"total": 60}


# ------------------------------------------------------------------ lifecycle


async def test_nothing_outlives_the_runtime_block(anyio_backend_name):
    if anyio_backend_name == "asyncio":
        import asyncio

        before = asyncio.all_tasks()
        async with fs.open_runtime(chain_pipeline()) as rt:
            await rt.materialize("report")
        assert asyncio.all_tasks() == before
    else:
        import trio

        async with fs.open_runtime(chain_pipeline()) as rt:
            await rt.materialize("report")
        assert trio.lowlevel.current_task().child_nurseries == []


async def test_a_closed_runtime_says_so(anyio_backend):
    async with fs.open_runtime(chain_pipeline()) as rt:
        pass
    with pytest.raises(fs.RuntimeClosed):
        await rt.materialize("report")


async def test_an_error_in_the_block_comes_out_as_itself(anyio_backend):
    with pytest.raises(KeyError):
        async with fs.open_runtime(chain_pipeline()):
            raise KeyError("mine")


def test_sync_materialize_for_scripts():
    result = fs.materialize(chain_pipeline(), "report")
    assert result.materializations["report"].status is Status.SUCCESS


async def test_a_caller_waiting_outside_the_runtime_is_answered_when_it_closes(anyio_backend):
    """A task outside the runtime block, queued for a slot, hears RuntimeClosed at
    shutdown instead of hanging."""
    started, answered = anyio.Event(), anyio.Event()

    async def hold(ctx, deps):
        started.set()
        await anyio.Event().wait()

    asset = fs.Asset(name="hold", execute_fn=hold, partitioned_by=fs.StaticPartitions(["a", "b"]), max_concurrency=1)
    outcome = {}
    holder = anyio.CancelScope()

    async def hold_slot(rt):
        with holder:
            await rt.materialize("hold", "a")

    async def queued_caller(rt):
        try:
            await rt.materialize("hold", "b")
        except fs.FlowstoneError as error:
            outcome["error"] = error
        answered.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outside:
            async with fs.open_runtime([asset]) as rt:
                outside.start_soon(hold_slot, rt)
                await started.wait()
                outside.start_soon(queued_caller, rt)

                async def queued():
                    return (await rt.statistics())["hold"].queued == 1

                await until(queued)
            await answered.wait()  # the runtime is closed; the queued caller was told
            holder.cancel()
    assert isinstance(outcome["error"], fs.RuntimeClosed)


async def test_the_runtime_wide_limit_caps_materializations_across_assets(anyio_backend):
    inside, peak = [], []
    release = anyio.Event()

    async def work(ctx, deps):
        inside.append(1)
        peak.append(len(inside))
        await release.wait()
        inside.pop()

    assets = [fs.Asset(name=f"a{i}", execute_fn=work) for i in range(5)]
    async with fs.open_runtime(assets, max_concurrency=2) as rt:
        async def two_inside():
            await anyio.lowlevel.checkpoint()
            return len(inside) == 2

        async with anyio.create_task_group() as tasks:
            for asset in assets:
                tasks.start_soon(rt.materialize, asset.name)
            await until(two_inside)
            for _ in range(20):  # give the other three every chance to get in (they must not)
                await anyio.lowlevel.checkpoint()
            assert len(inside) == 2
            release.set()
        assert max(peak) == 2 and len(peak) == 5


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_graphs_run_each_asset_once_with_lineage_matching_the_graph(data):
    """Property: for a random DAG, one materialize of a random target computes it
    and exactly its dependencies, once each, upstream first, recording as lineage
    exactly the assets each one read."""
    size = data.draw(st.integers(1, 12))
    deps = {f"n{i}": data.draw(st.lists(st.sampled_from([f"n{j}" for j in range(i)]), unique=True)) if i else []
            for i in range(size)}
    order: list[str] = []

    def make(name):
        async def fn(ctx, inputs):
            assert set(inputs) == set(deps[name])  # it got exactly its inputs
            order.append(name)
            return name
        return fn

    assets = [fs.Asset(name=n, depends_on=tuple(d), execute_fn=make(n)) for n, d in deps.items()]
    target = data.draw(st.sampled_from(list(deps)))

    async def main():
        async with fs.open_runtime(assets) as rt:
            result = await rt.materialize(target)
            return result

    result = anyio.run(main, backend=data.draw(st.sampled_from(["asyncio", "trio"])))
    expected = fs.dependencies(target, assets) | {target}
    assert sorted(order) == sorted(expected)  # each once, nothing else
    position = {name: i for i, name in enumerate(order)}
    for name in expected:
        record = result.materializations[name]
        assert set(record.upstream_assets) == set(deps[name])
        assert all(position[d] < position[name] for d in deps[name])


async def test_a_failure_keeps_a_bounded_traceback_and_is_logged_with_its_context(anyio_backend, caplog):
    from flowstone.runtime.job import TRACEBACK_LIMIT

    def build_report(ctx, deps):
        raise ValueError("boom " + "x" * 20_000)

    daily = fs.DailyPartitions(start=date(2025, 1, 1))
    assets = [fs.Asset(name="report", execute_fn=build_report, partitioned_by=daily)]
    with caplog.at_level(logging.WARNING, logger="flowstone"):
        async with fs.open_runtime(assets) as rt:
            with fs.tenant_scope("acme"), pytest.raises(fs.MaterializationFailed) as info:
                await rt.materialize("report", date(2025, 1, 15))
    record = info.value.result.materializations["report"]
    assert record.status is Status.FAILED and record.error_message.startswith("ValueError: boom")
    assert "build_report" not in record.error_message  # one line: type and message
    assert "in build_report" in record.error_traceback and record.error_traceback.endswith("x\n")
    assert len(record.error_traceback) <= TRACEBACK_LIMIT + 5
    [logged] = [r for r in caplog.records if r.name.startswith("flowstone") and r.levelno == logging.WARNING]
    assert (logged.asset, logged.partition, logged.tenant, logged.run_id) == (
        "report", "2025-01-15", "acme", str(record.run_id)
    )
    assert "report" in logged.getMessage() and "acme" in logged.getMessage()


async def test_a_run_named_beforehand_carries_that_id(anyio_backend):
    import uuid

    pipeline = fs.Pipeline("p")

    @pipeline.asset()
    def one(ctx, deps):
        return 1

    run = uuid.uuid4()
    async with fs.open_runtime(pipeline) as rt:
        with pytest.raises(fs.DefinitionError, match="run_id"):
            await rt.materialize("one", run_id="not a uuid")
        await rt.materialize("one", run_id=str(run))
        [record] = await rt.store.get_by_run_id(run)
    assert record.asset_name == "one" and record.run_id == run


# ------------------------------------------------------------------ the lease keeper


async def test_a_lease_released_by_its_jobs_last_write_is_not_reported_taken_over(anyio_backend, caplog):
    # The keeper asks the store to renew what it holds while a job's last write is
    # releasing one of them: the store answers without it, and that is no takeover.
    from flowstone.runtime.leases import LeaseKeeper
    from flowstone.store import MemoryStore

    async with MemoryStore() as store:
        keeper = LeaseKeeper(store, "me", 30)
        leases = {}
        for partition in ("ending", "taken"):
            record, lease = await store.begin("me", 30, asset_name="a", partition=partition, status=Status.RUNNING)
            keeper.hold(lease, keeper.clock())
            leases[partition] = (record, lease)
        record, lease = leases["ending"]
        keeper.ending(lease)
        await store.complete(record, Status.SUCCESS, lease=lease)  # released in the store; the job drops it next
        taken = leases["taken"][1]
        await store.complete(leases["taken"][0], Status.FAILED, lease=taken)  # as if another process took it
        await keeper.renew()
        assert not keeper.held[lease.fence].lost
        assert keeper.held[taken.fence].lost
        warned = [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()]
        assert len(warned) == 1 and "'taken'" in warned[0]
