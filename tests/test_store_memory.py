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


async def test_a_batch_write_the_store_refuses_does_not_drop_the_others(anyio_backend, caplog):
    """A batch's records reach the actor as one message; one it refuses (an id
    already taken, the caller's to choose) is logged, and the rest are stored."""
    from flowstone.store.leases import Start

    async with fs.store.MemoryStore() as store:
        taken = await store.create(asset_name="orders")
        begun = await store.begin_many("p1", 30, [
            Start({"asset_name": "orders", "partition": "1", "status": fs.Status.RUNNING, "id": taken.id}),
            Start({"asset_name": "orders", "partition": "2", "status": fs.Status.RUNNING}),
        ])
        second, _lease = begun[1]
        assert (await store.get_by_id(second.id)).partition == "2"
        assert (await store.get_by_id(taken.id)).partition is None  # not overwritten
        assert "already exists" in caplog.text
