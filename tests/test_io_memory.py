"""MemoryIO passes the IO contract (tests/contracts/io.py)."""

import pyarrow as pa
import pytest
from contracts.io import IOContract

import flowstone as fs

pytestmark = pytest.mark.anyio


class TestMemoryIO(IOContract):
    @pytest.fixture
    async def io(self, anyio_backend):
        async with fs.io.MemoryIO() as io:
            yield io


async def test_a_loaded_value_is_never_the_stored_object(anyio_backend):
    """Neither the producer nor a reader mutating its object changes what is stored."""
    value = {"rows": [1, 2]}
    async with fs.io.MemoryIO() as io:
        await io.store("a", value, None, {})
        value["rows"].append(3)  # the producer keeps changing its object
        loaded = await io.load("a", None, {})
        assert loaded == {"rows": [1, 2]} and loaded is not value
        loaded["rows"].clear()  # a reader changes its copy
        assert await io.load("a", None, {}) == {"rows": [1, 2]}


async def test_immutable_values_are_their_own_copy_and_uncopyable_ones_are_refused(anyio_backend):
    import threading

    text, table = "hello", pa.table({"a": [1, 2]})
    async with fs.io.MemoryIO() as io:
        await io.store("t", text, None, {})
        await io.store("arrow", table, None, {})
        assert await io.load("t", None, {}) is text and await io.load("arrow", None, {}) is table
        with pytest.raises(fs.SerializationError, match="cannot be copied"):
            await io.store("lock", threading.Lock(), "2025-01-01", {})
        assert not await io.exists("lock", "2025-01-01", {})


async def test_a_reader_that_mutates_its_input_leaves_the_upstream_value_alone(anyio_backend):
    def mutate(ctx, deps):
        deps["raw"]["rows"].append("mutated")
        return len(deps["raw"]["rows"])

    assets = [fs.Asset(name="raw", execute_fn=lambda ctx, deps: {"rows": [1, 2]}),
              fs.Asset(name="count", execute_fn=mutate, depends_on=("raw",))]
    async with fs.open_runtime(assets) as rt:
        await rt.materialize("count")  # raw handed over in the run
        await rt.materialize("count", force=True, upstream="none")  # raw loaded
        assert await rt.load("raw") == {"rows": [1, 2]}
        assert await rt.load("count") == 3


async def test_a_load_is_answered_in_place_unless_a_write_is_on_its_way(anyio_backend, monkeypatch):
    """A load with nothing queued before it reads the actor's data here and now (no
    turn in the mailbox); with a write still queued it goes through the mailbox,
    behind that write, and sees it. Its errors are the actor's: a missing value is
    NotFound; a bug is ActorCrashed, and the restarted actor answers the next load."""
    from flowstone.store import memory_actor as m

    async with fs.io.MemoryIO() as io:
        await io.store("a", 1, None, {})
        requests = []
        request = type(io.handle).request

        async def counting(self, message_type, /, **fields):
            requests.append(message_type.__name__)
            return await request(self, message_type, **fields)

        monkeypatch.setattr(type(io.handle), "request", counting)
        assert await io.load("a", None, {}) == 1
        assert requests == []  # in place
        await io.handle.cast(m.PutValue(tenant=None, asset="a", partition=None, value=2))  # queued, not taken yet
        assert await io.load("a", None, {}) == 2
        assert requests == ["GetValue"]  # behind the write, through the mailbox
        with pytest.raises(fs.NotFound, match="no stored value"):
            await io.load("missing", None, {})

        def broken(message):
            raise KeyError("a bug")

        door = io.handle.shared
        handlers = door.dispatch
        door.dispatch = {**handlers, m.GetValue: broken}
        with pytest.raises(fs.ActorCrashed):
            await io.load("a", None, {})
        door.dispatch = handlers
        assert await io.load("a", None, {}) == 2  # behind the crash it asked for: the restarted actor answers
        assert requests[-1] == "GetValue"
