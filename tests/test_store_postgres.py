"""PostgresStore: the shared store contract against a real server, on asyncio and trio."""

from __future__ import annotations

import pytest

import anyio

from contracts.store import DatabaseContract, LeaseContract, StoreContract
from flowstone.store.postgres import PostgresStore
from pgfixtures import admin, run_sync

pytestmark = pytest.mark.anyio


class TestPostgresStoreContract(StoreContract, LeaseContract, DatabaseContract):
    @pytest.fixture
    async def store(self, pg_dsn):
        async with PostgresStore(pg_dsn) as store:
            yield store

    @pytest.fixture
    def age(self, pg_database):
        """Time passing, as the database sees it: leases and heartbeats grow older."""

        async def age(seconds):
            await anyio.to_thread.run_sync(
                run_sync, admin, pg_database.admin_dsn,
                f"UPDATE flowstone_leases SET expires_at = expires_at - interval '{float(seconds)} seconds'",
                f"UPDATE flowstone_backfills SET heartbeat_at = heartbeat_at - interval '{float(seconds)} seconds'",
                f"UPDATE flowstone_roles SET expires_at = expires_at - interval '{float(seconds)} seconds'",
            )

        return age
