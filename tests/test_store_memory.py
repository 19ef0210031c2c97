"""The memory store passes the store contract (tests/contracts/store.py)."""

from datetime import datetime, timedelta, timezone

import pytest

import flowstone as fs
from contracts.store import LeaseContract, StoreContract

pytestmark = pytest.mark.anyio


class _Clock:
    """The memory store's clock, moved by the tests instead of waiting."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


class TestMemoryStore(StoreContract, LeaseContract):
    @pytest.fixture
    def clock(self):
        return _Clock()

    @pytest.fixture
    async def store(self, anyio_backend, clock):
        async with fs.store.MemoryStore(now=clock) as store:
            yield store

    @pytest.fixture
    def age(self, clock):
        async def age(seconds):
            clock.offset += timedelta(seconds=seconds)

        return age


async def test_an_unstarted_memory_store_says_how_to_start_it(anyio_backend):
    with pytest.raises(fs.RuntimeClosed, match="async with MemoryStore"):
        await fs.store.MemoryStore().list_all()


async def test_records_survive_leaving_and_reentering_the_store(anyio_backend):
    store = fs.store.MemoryStore()
    async with store:
        record = await store.create(asset_name="orders")
    async with store:
        assert (await store.get_by_id(record.id)).id == record.id
