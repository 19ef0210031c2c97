"""MemoryIO passes the IO contract (tests/contracts/io.py)."""

import pytest

import flowstone as fs
from contracts.io import IOContract

pytestmark = pytest.mark.anyio


class TestMemoryIO(IOContract):
    @pytest.fixture
    async def io(self, anyio_backend):
        async with fs.io.MemoryIO() as io:
            yield io


async def test_memory_io_keeps_the_object_itself(anyio_backend):
    value = object()
    async with fs.io.MemoryIO() as io:
        await io.store("a", value, None, {})
        assert await io.load("a", None, {}) is value
        assert fs.io.MemoryIO.returns_stored_object is True
