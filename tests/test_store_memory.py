"""The memory store passes the store contract (tests/contracts/store.py)."""

import pytest

import flowstone as fs
from contracts.store import StoreContract

pytestmark = pytest.mark.anyio


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def store(self, anyio_backend):
        async with fs.store.MemoryStore() as store:
            yield store


async def test_an_unstarted_memory_store_says_how_to_start_it(anyio_backend):
    with pytest.raises(fs.RuntimeClosed, match="async with MemoryStore"):
        await fs.store.MemoryStore().list_all()


async def test_records_survive_leaving_and_reentering_the_store(anyio_backend):
    store = fs.store.MemoryStore()
    async with store:
        record = await store.create(asset_name="orders")
    async with store:
        assert (await store.get_by_id(record.id)).id == record.id
