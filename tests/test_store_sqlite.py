"""SqliteStore: the shared store contract on a real file, on asyncio and trio, and
what an embedded store must refuse."""

from __future__ import annotations

import sqlite3

import anyio
import pytest

import flowstone as fs
from contracts.store import LeaseContract, StoreContract
from flowstone.store.sqlite import SqliteStore, filesystem_type, sqlite_path

pytestmark = pytest.mark.anyio


class TestSqliteStoreContract(StoreContract, LeaseContract):
    @pytest.fixture
    async def store(self, tmp_path):
        async with SqliteStore(tmp_path / "flowstone.db") as store:
            yield store

    @pytest.fixture
    def age(self, store):
        """Time passing, as the store sees it: leases and heartbeats grow older."""

        def older(seconds: float) -> None:
            with sqlite3.connect(store.path, timeout=30) as connection:
                connection.execute("UPDATE flowstone_leases SET expires_at = expires_at - ?", (seconds,))
                connection.execute("UPDATE flowstone_backfills SET heartbeat_at = heartbeat_at - ?", (seconds,))

        async def age(seconds):
            await anyio.to_thread.run_sync(older, seconds)

        return age
