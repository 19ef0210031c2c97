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
