"""Trust across tenants and processes, at the runtime: ids are tenant-scoped, guards
are asked by every call that changes state, one current success, single flight
through the store, backfill owners, saves never dropped (ADR 0009).

Each test pins a hole found by trying it; PostgreSQL and multi-process versions
are in test_postgres.py and test_processes.py.
"""

from __future__ import annotations

from datetime import date, timedelta

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.runtime import backfill as bf
from flowstone.store import Status
from flowstone.testing import check_integrity

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 3, 31))
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(6)]


def events(fn) -> fs.Asset:
    return fs.Asset(name="events", execute_fn=fn, partitioned_by=DAILY, code_version="1")


async def blocked_backfill(rt, release: anyio.Event, started: list) -> object:
    """Start a backfill whose partitions wait for ``release``; return its id once one runs."""
    backfill = await rt.backfill("events", partitions=DAYS, max_parallel=1)

    async def running():
        return bool(started)

    await until(running)
    return backfill


def waiting_events(release: anyio.Event, started: list) -> fs.Asset:
    async def work(ctx, deps):
        started.append(ctx.partition_key)
        await release.wait()
        return ctx.partition_key

    return events(work)


# ---------------------------------------------------------------- tenant-scoped ids


async def test_another_tenants_running_backfill_is_not_found_and_cannot_be_cancelled(anyio_backend):
    release, started = anyio.Event(), []
    async with fs.open_runtime([waiting_events(release, started)]) as rt:
        with fs.tenant_scope("owner"):
            backfill = await blocked_backfill(rt, release, started)
        with fs.tenant_scope("intruder"):
            for call in (rt.backfill_status, rt.cancel_backfill, rt.wait_backfill, rt.resume_backfill):
                with pytest.raises(fs.BackfillNotFound):
                    await call(backfill)
        with fs.tenant_scope("owner"):
            assert (await rt.backfill_status(backfill)).state == "running"
            release.set()
            assert (await rt.wait_backfill(backfill)).state == "succeeded"


async def test_a_saved_spec_naming_another_tenant_is_not_resumed_into_its_namespace(anyio_backend):
    """A tenant writes a backfill whose spec names its victim; resuming it runs nothing."""
    calls = []
    store = fs.store.MemoryStore()
    async with fs.open_runtime([events(lambda ctx, deps: calls.append(ctx.tenant))], store=store) as rt:
        with fs.tenant_scope("attacker"):
            forged = _saved(tenant="victim")
            await store.save_backfill(forged.spec.id, forged, owner="forger")
            with pytest.raises(fs.BackfillNotFound):
                await rt.resume_backfill(forged.spec.id)
        with fs.tenant_scope("victim"):
            assert await store.list_all() == []
    assert calls == []


async def test_a_resume_runs_under_the_callers_tenant_and_context(anyio_backend):
    seen = []
    store = fs.store.MemoryStore()

    class Recording:
        def can_access(self, asset, context):
            return True

        def can_materialize(self, asset, context):
            seen.append(dict(context))
            return True

    async with fs.open_runtime([events(lambda ctx, deps: ctx.tenant)], store=store, guard=Recording()) as rt:
        with fs.tenant_scope("acme"):
            saved = _saved(tenant="acme", context={"user": "who saved it"})
            await store.save_backfill(saved.spec.id, saved, owner="gone")
            seen.clear()
            await rt.resume_backfill(saved.spec.id, context={"user": "ana"})
            assert (await rt.wait_backfill(saved.spec.id)).state == "succeeded"
            assert await rt.load("events", DAYS[0]) == "acme"
    assert seen and all(c == {"user": "ana", "tenant": "acme"} for c in seen)


def _saved(*, tenant, context=None) -> bf.Saved:
    import uuid

    backfill = uuid.uuid4()
    spec = bf.BackfillSpec(
        id=backfill, asset="events", partitions=tuple(DAYS[:2]), max_parallel=1, upstream="missing",
        force=False, io=None, context=context, tenant=tenant,
    )
    status = bf.BackfillStatus(id=backfill, asset="events", state="cancelled", total=2, queued=0, running=0,
                               succeeded=0, failed=0, cancelled=2)
    return bf.Saved(spec, status)


# ------------------------------------------------------------------------- guards


class DenyUnless:
    """Allows materializing only for the user named; reading always."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.asked: list[dict] = []

    def can_access(self, asset, context):
        return True

    def can_materialize(self, asset, context):
        self.asked.append(dict(context))
        return context.get("user") == self.user


async def test_approve_and_reject_ask_the_guard_with_the_callers_context(anyio_backend):
    guard = DenyUnless("boss")
    gated = fs.Asset(name="publish", execute_fn=lambda ctx, deps: 1, requires_approval=True)
    async with fs.open_runtime([gated], guard=guard) as rt:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: rt.materialize("publish", context={"user": "boss"}))

            async def parked():
                return bool(await rt.store.list_by_status("waiting_approval"))

            await until(parked)
            (record,) = await rt.store.list_by_status("waiting_approval")
            for call in (rt.approve(record.id, context={"user": "intern"}),
                         rt.reject(record.id, "no", context={"user": "intern"})):
                with pytest.raises(fs.AccessDenied):
                    await call
            assert (await rt.store.get_by_id(record.id)).status is Status.WAITING_APPROVAL
            await rt.approve(record.id, context={"user": "boss"})
        assert (await rt.store.get_by_id(record.id)).status is Status.SUCCESS
    assert guard.asked[-1] == {"user": "boss", "tenant": None}


async def test_cancel_and_resume_ask_the_guard_with_the_callers_context(anyio_backend):
    release, started = anyio.Event(), []
    guard = DenyUnless("boss")
    async with fs.open_runtime([waiting_events(release, started)], guard=guard) as rt:
        backfill = await rt.backfill("events", partitions=DAYS, max_parallel=1, context={"user": "boss"})
        with pytest.raises(fs.AccessDenied):
            await rt.cancel_backfill(backfill, context={"user": "intern"})
        with pytest.raises(fs.AccessDenied):
            await rt.resume_backfill(backfill, context={"user": "intern"})
        assert (await rt.backfill_status(backfill)).state == "running"
        assert (await rt.cancel_backfill(backfill, context={"user": "boss"})).state == "cancelled"
        with pytest.raises(fs.AccessDenied):
            await rt.resume_backfill(backfill, context={"user": "intern"})
        await rt.resume_backfill(backfill, context={"user": "boss"})
        release.set()
        assert (await rt.wait_backfill(backfill)).state == "succeeded"


# ---------------------------------------------------------- one current success


async def test_a_forced_rebuild_leaves_one_success_and_supersedes_the_old_one(anyio_backend):
    async with fs.open_runtime([events(lambda ctx, deps: ctx.run_id.hex)]) as rt:
        first = (await rt.materialize("events", DAYS[0])).materializations["events"]
        second = (await rt.materialize("events", DAYS[0], force=True)).materializations["events"]
        assert (await rt.store.get_by_id(first.id)).status is Status.SUPERSEDED
        assert await rt.load("events", DAYS[0]) == second.run_id.hex  # the current success's value
        (await check_integrity(rt.store, "events", DAYS[:1], rt.io_managers, default_io="memory")).raise_if_bad()


# --------------------------------------------------------- single flight, owners


async def test_two_runtimes_on_one_store_compute_a_partition_once(anyio_backend):
    """Two runtimes are two owners (as two processes would be): the second waits for
    the first one's lease and takes its success."""
    calls, release = [], anyio.Event()

    async def slow(ctx, deps):
        calls.append(ctx.partition_key)
        await release.wait()
        return "value"

    store, values = fs.store.MemoryStore(), fs.io.MemoryIO()
    results = []
    async with fs.open_runtime([events(slow)], store=store, io_managers={"memory": values}) as first, \
            fs.open_runtime([events(slow)], store=store, io_managers={"memory": values}) as second:

        async def run(rt):
            results.append(await rt.materialize("events", DAYS[0]))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, first)

            async def leased():
                return bool(calls)

            await until(leased)
            tasks.start_soon(run, second)
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert calls == [DAYS[0].isoformat()]
    ids = {r.materializations["events"].id for r in results}
    assert len(ids) == 1 and sorted(len(r.skipped) for r in results) == [0, 1]


async def test_resuming_a_backfill_whose_owner_is_alive_is_refused_naming_it(anyio_backend):
    release, started = anyio.Event(), []
    store = fs.store.MemoryStore()
    async with fs.open_runtime([waiting_events(release, started)], store=store) as owner, \
            fs.open_runtime([waiting_events(release, started)], store=store) as other:
        backfill = await blocked_backfill(owner, release, started)
        with pytest.raises(fs.BackfillOwned, match="last seen") as refused:
            await other.resume_backfill(backfill)
        assert refused.value.owner.count(":") == 2  # host:pid:runtime
        release.set()
        assert (await owner.wait_backfill(backfill)).succeeded == len(DAYS)
    assert len(started) == len(DAYS)  # no partition computed twice


# ---------------------------------------------------------------- saves


class FlakySaves(fs.store.MemoryStore):
    """A real memory store whose backfill saves fail while ``failing`` says so."""

    def __init__(self, failing) -> None:
        super().__init__()
        self.failing = failing
        self.tries = 0

    async def save_backfill(self, id, state, *, owner=None):
        self.tries += 1
        if self.failing(self.tries, state):
            raise fs.DatabaseUnavailable("the database stalls")
        await super().save_backfill(id, state, owner=owner)


async def test_a_save_that_fails_is_retried_until_written(anyio_backend, monkeypatch):
    monkeypatch.setattr(bf, "SAVE_DELAY", 0)
    store = FlakySaves(lambda tries, state: state.status.done and tries < 5)
    async with fs.open_runtime([events(lambda ctx, deps: 1)], store=store) as rt:
        backfill = await rt.backfill("events", partitions=DAYS)
        assert (await rt.wait_backfill(backfill)).state == "succeeded"
    async with fs.open_runtime([events(lambda ctx, deps: 1)], store=store) as rt:
        assert (await rt.backfill_status(backfill)).state == "succeeded"  # from the store


async def test_a_final_save_that_never_lands_fails_the_backfill_loudly_and_keeps_it_known(anyio_backend, monkeypatch):
    monkeypatch.setattr(bf, "SAVE_DELAY", 0)
    store = FlakySaves(lambda tries, state: state.status.done)
    async with fs.open_runtime([events(lambda ctx, deps: 1)], store=store) as rt:
        backfill = await rt.backfill("events", partitions=DAYS)
        final = await rt.wait_backfill(backfill)
        assert final.state == "failed" and final.succeeded == len(DAYS)
        assert "could not be saved" in final.errors[-1][1] and "stalls" in final.errors[-1][1]
        assert await rt.backfill_status(backfill) == final  # not unknown


async def test_a_backfill_whose_first_save_fails_does_not_start(anyio_backend, monkeypatch):
    monkeypatch.setattr(bf, "SAVE_DELAY", 0)
    store = FlakySaves(lambda tries, state: True)
    async with fs.open_runtime([events(lambda ctx, deps: 1)], store=store) as rt:
        with pytest.raises(fs.DatabaseUnavailable):
            await rt.backfill("events", partitions=DAYS)
        assert await rt.store.list_all() == []
