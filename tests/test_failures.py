"""Whatever a user function raises is that function's failure (SPEC 10): BaseException
subclasses, a cancellation nobody asked for, time limits. On asyncio and trio."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from datetime import date

import anyio
import pytest

import flowstone as fs
from flowstone.store import Status
from waiting import until

pytestmark = pytest.mark.anyio

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 10))


class Abort(BaseException):
    """A user's own BaseException subclass."""


@pytest.mark.parametrize("raised", [KeyboardInterrupt("stop"), SystemExit(3), Abort("mine")])
@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_a_base_exception_from_the_function_is_its_failure(anyio_backend, raised, kind):
    if kind == "async":
        async def boom(ctx, deps):
            raise raised
    else:
        def boom(ctx, deps):
            raise raised

    assets = [fs.Asset(name="boom", execute_fn=boom), fs.Asset(name="fine", execute_fn=lambda ctx, deps: 1)]
    async with fs.open_runtime(assets) as rt:
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("boom")
        record = info.value.result.materializations["boom"]
        assert record.status is Status.FAILED
        assert record.error_message.startswith(type(raised).__name__)
        assert info.value.__cause__ is raised
        # the runtime is still up and serves other work
        assert (await rt.materialize("fine")).materializations["fine"].status is Status.SUCCESS
        assert [r.status for r in await rt.store.list_all(asset_name="boom")] == [Status.FAILED]


async def test_a_base_exception_in_a_backfill_fails_that_partition_only(anyio_backend):
    def flaky(ctx, deps):
        if ctx.partition == date(2025, 1, 3):
            raise KeyboardInterrupt("only this one")
        return ctx.partition_key

    async def other(ctx, deps):
        return 1

    assets = [
        fs.Asset(name="flaky", execute_fn=flaky, partitioned_by=DAILY),
        fs.Asset(name="other", execute_fn=other, partitioned_by=DAILY),
    ]
    async with fs.open_runtime(assets) as rt:
        with fs.tenant_scope("b"):
            elsewhere = await rt.backfill("other", fs.partition_range(date(2025, 1, 1), date(2025, 1, 10), "day"))
        with fs.tenant_scope("a"):
            bf = await rt.backfill("flaky", fs.partition_range(date(2025, 1, 1), date(2025, 1, 10), "day"))
            status = await rt.wait_backfill(bf)
        assert (status.state, status.succeeded, status.failed, status.cancelled) == ("failed", 9, 1, 0)
        with fs.tenant_scope("b"):
            assert (await rt.wait_backfill(elsewhere)).state == "succeeded"
        with fs.tenant_scope("a"):
            [failed] = [r for r in await rt.store.list_all(asset_name="flaky") if r.status is not Status.SUCCESS]
            assert failed.status is Status.FAILED and failed.partition == "2025-01-03"
            assert failed.error_message == "KeyboardInterrupt: only this one"


async def test_a_cancellation_nobody_asked_for_is_a_failure_not_a_cancel(anyio_backend):
    async def pretends(ctx, deps):
        # a cancellation from a scope of the function's own, raised outside that scope
        with anyio.CancelScope() as scope:
            scope.cancel()
            try:
                await anyio.sleep(0)
            except anyio.get_cancelled_exc_class() as exc:
                caught = exc
        raise caught

    assets = [fs.Asset(name="pretends", execute_fn=pretends, partitioned_by=DAILY)]
    async with fs.open_runtime(assets) as rt:
        bf = await rt.backfill("pretends", fs.partition_range(date(2025, 1, 1), date(2025, 1, 3), "day"))
        status = await rt.wait_backfill(bf)
        assert (status.state, status.failed, status.cancelled, status.succeeded) == ("failed", 3, 0, 0)
        assert {r.status for r in await rt.store.list_all(asset_name="pretends")} == {Status.FAILED}


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_a_runtime_shutting_down_cancels_its_work_it_fails_none(anyio_backend, kind):
    release = threading.Event()
    running: list[str] = []

    if kind == "async":
        async def slow(ctx, deps):
            running.append(ctx.partition_key)
            await anyio.sleep_forever()
    else:
        def slow(ctx, deps):
            running.append(ctx.partition_key)
            release.wait(30)  # a thread cannot be cancelled: it is left to finish

    assets = [fs.Asset(name="slow", execute_fn=slow, partitioned_by=DAILY)]
    async with fs.store.MemoryStore() as store:
        async with fs.open_runtime(assets, store=store) as rt:
            days = fs.partition_range(date(2025, 1, 1), date(2025, 1, 10), "day")
            bf = await rt.backfill("slow", days, max_parallel=3)

            async def three_running() -> bool:
                return len(running) == 3

            await until(three_running)
        release.set()
        records = await store.list_all(asset_name="slow")
        assert len(records) == 3 and {r.status for r in records} == {Status.CANCELLED}
        saved = await store.load_backfill(bf)
        assert (saved.status.state, saved.status.failed, saved.status.cancelled) == ("cancelled", 0, 10)


_CTRL_C = """
import json, sys, time
from datetime import date
import anyio
import flowstone as fs

DAILY = fs.DailyPartitions(start=date(2025, 1, 1), end=date(2025, 1, 10))

async def main():
    async def busy(ctx, deps):
        if ctx.partition_key == "2025-01-02":
            print("ready", flush=True)
            limit = time.monotonic() + 20
            while time.monotonic() < limit:  # mostly Python code: where trio's Ctrl-C lands
                for _ in range(10_000):
                    pass
                await anyio.sleep(0)  # where asyncio's lands (it cancels the main task)
        return 1

    assets = [fs.Asset(name="busy", execute_fn=busy, partitioned_by=DAILY)]
    async with fs.store.MemoryStore() as store:
        try:
            async with fs.open_runtime(assets, store=store) as rt:
                bf = await rt.backfill("busy", max_parallel=1)
                await rt.wait_backfill(bf)
        finally:
            with anyio.CancelScope(shield=True):
                saved = await store.load_backfill(bf)
                records = await store.list_all(asset_name="busy")
                print(json.dumps({"state": saved.status.state, "failed": saved.status.failed,
                                  "records": sorted(r.status.value for r in records)}), flush=True)

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_cancels_the_work_in_flight_it_fails_nothing(backend):
    process = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C, backend], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "KeyboardInterrupt" in err  # Ctrl-C still stops the program
    outcome = json.loads(out)
    assert outcome == {"state": "cancelled", "failed": 0, "records": ["cancelled", "success"]}, err
