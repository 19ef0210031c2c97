"""Whatever a user function raises is that function's failure (SPEC 10): BaseException
subclasses, a cancellation nobody asked for, time limits. On asyncio and trio."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import date

import anyio
import pytest
from waiting import until

import flowstone as fs
from flowstone.store import Status

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
import json, signal, sys, time
from datetime import date
import anyio
import flowstone as fs

# As at a terminal: a shell that starts the tests in the background makes its
# children ignore SIGINT, and Python then never raises KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)

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
                                  "records": sorted([r.partition, r.status.value, r.error_message]
                                                    for r in records)}), flush=True)

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
    assert (outcome["state"], outcome["failed"]) == ("cancelled", 0), err
    first, interrupted, *never_started = outcome["records"]
    assert first == ["2025-01-01", "success", None]
    assert interrupted == ["2025-01-02", "cancelled", "cancelled"]
    # Fast partitions begin in batches (ADR 0032): those of the interrupted one's
    # batch that never started are cancelled too, and say so.
    assert all(status == "cancelled" and message == "cancelled before it started"
               for _partition, status, message in never_started), outcome


# ------------------------------------------------------------ time limits


async def test_an_async_function_past_its_timeout_fails_with_asset_timeout(anyio_backend):
    async def stuck(ctx, deps):
        await anyio.sleep_forever()

    async with fs.open_runtime([fs.Asset(name="stuck", execute_fn=stuck, timeout=0.05)]) as rt:
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("stuck")
    assert isinstance(info.value.__cause__, fs.AssetTimeout) and isinstance(info.value.__cause__, TimeoutError)
    record = info.value.result.materializations["stuck"]
    assert record.status is Status.FAILED
    assert record.error_message.startswith("AssetTimeout: still running after its timeout of 0.05s")


async def test_a_thread_past_its_timeout_is_abandoned_and_the_runtime_goes_on(anyio_backend):
    release = threading.Event()
    finished = threading.Event()

    def stuck(ctx, deps):
        release.wait(30)
        finished.set()
        return 1

    assets = [fs.Asset(name="stuck", execute_fn=stuck, timeout=0.05)]
    async with fs.open_runtime(assets) as rt:
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("stuck")
        assert "threads cannot be stopped" in str(info.value.__cause__)
        assert not finished.is_set()  # the runtime did not wait for the thread
    release.set()
    assert finished.wait(5)


async def test_a_timeout_error_the_function_raises_itself_is_not_a_time_limit(anyio_backend):
    async def raises(ctx, deps):
        raise TimeoutError("the API timed out")

    async with fs.open_runtime([fs.Asset(name="raises", execute_fn=raises, timeout=30)]) as rt:
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("raises")
    assert type(info.value.__cause__) is TimeoutError
    assert info.value.result.materializations["raises"].error_message == "TimeoutError: the API timed out"


async def test_a_time_limit_applies_to_each_attempt(anyio_backend):
    attempts: list[int] = []

    async def slow_then_fast(ctx, deps):
        attempts.append(1)
        if len(attempts) == 1:
            await anyio.sleep_forever()
        return "done"

    retry = fs.RetryPolicy(max_attempts=2, backoff=0)
    assets = [fs.Asset(name="a", execute_fn=slow_then_fast, timeout=0.05, retry=retry)]
    async with fs.open_runtime(assets) as rt:
        result = await rt.materialize("a")
        assert result.materializations["a"].status is Status.SUCCESS and len(attempts) == 2
        assert await rt.load("a") == "done"


_NEVER_RETURNS = """
import sys, threading
import anyio
import flowstone as fs

def forever(ctx, deps):
    threading.Event().wait()

async def main():
    async with fs.open_runtime([fs.Asset(name="forever", execute_fn=forever, timeout=0.1)]) as rt:
        try:
            await rt.materialize("forever")
        except fs.MaterializationFailed as error:
            print(type(error.__cause__).__name__, flush=True)

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_function_that_never_returns_does_not_keep_the_program_from_exiting(backend):
    done = subprocess.run(
        [sys.executable, "-c", _NEVER_RETURNS, backend], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "AssetTimeout"), done.stderr


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.5}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": "10"}, "timeout"),
        ({"executor": "fork"}, "executor"),
        ({"executor": "async"}, "executor"),  # on a plain function
    ],
)
def test_bad_time_limits_and_executors_are_definition_errors(fields, problem):
    with pytest.raises(fs.DefinitionError) as info:
        fs.asset(name="a", **fields)(_cpu_bound)
    assert problem in str(info.value)


# ------------------------------------------------------------ worker processes
# Functions a worker process runs are found there by module and name: module level.


def _cpu_bound(ctx, deps):
    ctx.log.info("summing %s", ctx.partition_key)
    ctx.metadata["pid"] = os.getpid()
    return {"partition": ctx.partition_key, "tenant": ctx.tenant, "sum": sum(i * i for i in range(10_000))}


def _totals(ctx, deps):
    return {key: value["sum"] for key, value in sorted(deps["squares"].items())}


def _returns_a_set(ctx, deps):
    return {1, 2, 3}


def _raises(ctx, deps):
    raise ValueError("bad input in the worker")


class Unpicklable(Exception):
    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")


def _raises_unpicklable(ctx, deps):
    raise Unpicklable(7, "no")


def _spins(ctx, deps):
    print(os.getpid(), file=open(ctx.asset.metadata["pid_file"], "w"), flush=True)
    while True:
        pass


async def test_a_process_executor_runs_the_function_in_another_process(anyio_backend, caplog):
    days = fs.partition_range(date(2025, 1, 1), date(2025, 1, 3), "day")
    assets = [
        fs.Asset(name="squares", execute_fn=_cpu_bound, partitioned_by=DAILY, executor="process"),
        fs.Asset(name="totals", execute_fn=_totals, depends_on=["squares"], executor="process"),
    ]
    with caplog.at_level(logging.INFO, logger="flowstone"):
        async with fs.open_runtime(assets) as rt:
            with fs.tenant_scope("acme"):
                status = await rt.wait_backfill(await rt.backfill("squares", days))
                assert status.state == "succeeded"
                value = await rt.load("squares", date(2025, 1, 2))
                result = await rt.materialize("totals")
                totals = await rt.load("totals")
                [record] = [r for r in await rt.store.list_all(asset_name="squares") if r.partition == "2025-01-02"]
    assert record.metadata["pid"] != os.getpid()
    assert value == {"partition": "2025-01-02", "tenant": "acme", "sum": 333283335000}
    assert totals == {str(day): 333283335000 for day in days}  # crossed as JSON: keys are text
    assert result.materializations["totals"].status is Status.SUCCESS
    assert any(r.getMessage() == "summing 2025-01-02" and r.name == "flowstone.asset.squares" for r in caplog.records)


@pytest.mark.parametrize(
    "fn, message, frame",
    [
        (_raises, "ValueError: bad input in the worker", "in _raises"),
        (_raises_unpicklable, "WorkerFailure: Unpicklable: code 7: no", "in _raises_unpicklable"),
        (_returns_a_set, "SerializationError: a set value cannot be stored as JSON", "in _pack"),
    ],
)
async def test_a_process_function_failure_is_recorded_with_the_worker_traceback(anyio_backend, fn, message, frame):
    assets = [fs.Asset(name="a", execute_fn=fn, executor="process"),
              fs.Asset(name="fine", execute_fn=_cpu_bound, executor="process")]
    async with fs.open_runtime(assets) as rt:
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("a")
        record = info.value.result.materializations["a"]
        assert record.status is Status.FAILED and record.error_message.startswith(message)
        assert "raised in a worker process" in record.error_traceback
        assert frame in record.error_traceback
        # the failure stayed in the function: the runtime and its workers go on
        assert (await rt.materialize("fine")).materializations["fine"].status is Status.SUCCESS


async def test_a_process_past_its_timeout_is_killed(anyio_backend, tmp_path):
    pid_file = tmp_path / "pid"
    assets = [fs.Asset(name="spins", execute_fn=_spins, executor="process", timeout=1,
                       metadata={"pid_file": str(pid_file)}),
              fs.Asset(name="fine", execute_fn=_cpu_bound, executor="process")]
    async with fs.open_runtime(assets) as rt:
        await rt.materialize("fine")  # a worker started (and idle) before the clock runs
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("spins")
    assert isinstance(info.value.__cause__, fs.AssetTimeout)
    assert "threads cannot be stopped" not in str(info.value.__cause__)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def test_a_process_executor_needs_a_module_level_plain_function():
    def nested(ctx, deps):
        return 1

    async def coroutine(ctx, deps):
        return 1

    for fn in (nested, lambda ctx, deps: 1, coroutine):
        with pytest.raises(fs.DefinitionError, match="executor"):
            fs.asset(name="a", executor="process")(fn)
    with pytest.raises(fs.DefinitionError, match="resources"):
        fs.asset(name="a", executor="process", requires=["db"])(_cpu_bound)


@fs.asset(executor="process", partitioned_by=DAILY, metadata={"owner": "data"})
def decorated(ctx, deps):
    return {"name": ctx.asset.name, "owner": ctx.asset.metadata["owner"], "day": ctx.partition.isoformat()}


async def test_a_decorated_asset_runs_in_a_process_too(anyio_backend):
    async with fs.open_runtime([decorated]) as rt:
        await rt.materialize("decorated", date(2025, 1, 4))
        loaded = await rt.load("decorated", date(2025, 1, 4))
        assert loaded == {"name": "decorated", "owner": "data", "day": "2025-01-04"}


_MAIN_PROGRAM = """
import sys
import anyio
import flowstone as fs

def pid_of_worker(ctx, deps):
    import os
    return os.getpid()

async def main():
    asset = fs.Asset(name="where", execute_fn=pid_of_worker, executor="process")
    async with fs.open_runtime([asset]) as rt:
        await rt.materialize("where")
        import os
        print("worker" if await rt.load("where") != os.getpid() else "same process", flush=True)

if __name__ == "__main__":
    anyio.run(main)
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_a_process_function_of_the_main_program_is_found(tmp_path, how):
    """As multiprocessing does: python script.py and python -m pkg both work."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(_MAIN_PROGRAM)
    command = [sys.executable, str(package / "__main__.py")] if how == "script" else [sys.executable, "-m", "pkg"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "worker"), done.stderr


COMPOSITE = fs.CompositePartitions(
    fs.StaticPartitions(["eu", "us"]), fs.DailyPartitions(start=date(2025, 1, 1), timezone="Europe/Paris")
)


def _sees_its_definition(ctx, deps):
    return {
        "same_definition": ctx.asset.partitioned_by == COMPOSITE,
        "partition_is_a_tuple_of_values": ctx.partition == ("eu", date(2025, 1, 2)),
        "retry": ctx.asset.retry.max_attempts,
        "input": deps["upstream"],
    }


def _bad_metadata(ctx, deps):
    ctx.metadata["when"] = {1, 2}
    return 1


async def test_a_plain_function_in_a_process_sees_the_same_asset_partition_and_inputs(anyio_backend):
    async def upstream(ctx, deps):
        return {"payload": b"\x00\xff".hex()}

    assets = [
        fs.Asset(name="upstream", execute_fn=upstream, partitioned_by=COMPOSITE),
        fs.Asset(name="seen", execute_fn=_sees_its_definition, partitioned_by=COMPOSITE, executor="process",
                 depends_on=["upstream"], retry=fs.RetryPolicy(max_attempts=2, backoff=0)),
        fs.Asset(name="bad", execute_fn=_bad_metadata, executor="process"),
    ]
    async with fs.open_runtime(assets) as rt:
        await rt.materialize("seen", ("eu", date(2025, 1, 2)))
        assert await rt.load("seen", ("eu", date(2025, 1, 2))) == {
            "same_definition": True, "partition_is_a_tuple_of_values": True, "retry": 2,
            "input": {"payload": "00ff"},
        }
        with pytest.raises(fs.MaterializationFailed) as info:
            await rt.materialize("bad")
        assert isinstance(info.value.__cause__, fs.SerializationError)
        assert "ctx.metadata must hold JSON values" in str(info.value.__cause__)


def test_frames_carry_json_and_bytes_and_nothing_else():
    from flowstone.runtime.processes import decode_frame, encode_frame

    message = ["call", {"blob": b"\x00\x01", "nested": [b"", {"x": 1}], "text": "é"}]
    frame = encode_frame(message)
    head_size = int.from_bytes(frame[:4], "big")
    head, rest = frame[4:4 + head_size], frame[4 + head_size:]
    count = int.from_bytes(rest[:4], "big")
    blobs, offset = [], 4
    for _ in range(count):
        size = int.from_bytes(rest[offset:offset + 4], "big")
        blobs.append(rest[offset + 4:offset + 4 + size])
        offset += 4 + size
    assert json.loads(head) and count == 2 and decode_frame(head, blobs) == [
        "call", {"blob": b"\x00\x01", "nested": [b"", {"x": 1}], "text": "é"}
    ]
    with pytest.raises(TypeError):
        encode_frame({"value": object()})  # what JSON cannot say does not cross


# ------------------------------------------------------------ transient storage failures


class FlakyStore(fs.io.MemoryIO):
    """A user's own IO manager whose backend answers "try again" a few times."""

    def __init__(self, failures: int, transient: bool) -> None:
        super().__init__()
        self.failures, self.transient, self.tries = failures, transient, 0

    async def store(self, asset, value, partition=None, config=None):
        self.tries += 1
        if self.tries <= self.failures:
            raise fs.StorageError("backend busy", code="Busy", transient=self.transient, asset=asset)
        await super().store(asset, value, partition, config or {})


@pytest.mark.parametrize("transient, outcome, tries", [(True, Status.SUCCESS, 3), (False, Status.FAILED, 1)])
async def test_the_adapter_says_what_is_worth_retrying(anyio_backend, transient, outcome, tries):
    computed = []

    async def value(ctx, deps):
        computed.append(1)
        return 42

    flaky = FlakyStore(failures=2, transient=transient)
    asset = fs.Asset(name="a", execute_fn=value, io_manager="flaky",
                     retry=fs.RetryPolicy(max_attempts=3, backoff=0, jitter=False))
    async with fs.open_runtime([asset], io_managers={"flaky": flaky}) as rt:
        try:
            result = await rt.materialize("a")
            record = result.materializations["a"]
        except fs.MaterializationFailed as error:
            record = error.result.materializations["a"]
    assert (record.status, flaky.tries, len(computed)) == (outcome, tries, 1)  # the value is not computed again


def test_s3_codes_that_say_try_again_are_transient_and_others_are_not():
    from botocore.exceptions import ClientError

    from flowstone.io.s3 import _storage_error

    def s3(code):
        return _storage_error(ClientError({"Error": {"Code": code, "Message": code}}, "PutObject"), "put", "a", None)

    assert s3("SlowDown").transient and s3("503").transient
    assert not s3("AccessDenied").transient and s3("AccessDenied").code == "AccessDenied"
    assert fs.StorageUnavailable("gone").transient


def test_an_asyncio_program_never_loads_trio_and_a_trio_one_protects_its_loops():
    """The Ctrl-C marks need trio only when trio runs: an asyncio program does not pay
    for importing it (measured: 4 MB of a 50 MB backfill process)."""
    script = (
        "import sys, anyio\n"
        "import flowstone as fs\n"
        "from flowstone.actors.supervisor import _supervised, supervise\n"
        "async def main():\n"
        "    async with fs.open_runtime([fs.Asset(name='a', execute_fn=lambda ctx, deps: 1)]) as rt:\n"
        "        await rt.materialize('a')\n"
        "    if sys.argv[1] == 'trio':\n"
        "        from trio._core._ki import _CODE_KI_PROTECTION_STATUS_WMAP as marks\n"
        "        print(marks[supervise.__code__] and marks[_supervised.__code__])\n"
        "    else:\n"
        "        print('trio' in sys.modules)\n"
        "anyio.run(main, backend=sys.argv[1])\n"
    )
    answers = {
        backend: subprocess.run(
            [sys.executable, "-c", script, backend], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        for backend in ("asyncio", "trio")
    }
    assert answers == {"asyncio": "False", "trio": "True"}
