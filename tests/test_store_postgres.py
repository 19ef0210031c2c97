"""PostgresStore: the shared store contract against a real server, on asyncio and trio."""

from __future__ import annotations

import pytest

from contracts.store import StoreContract
from flowstone.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio


class TestPostgresStoreContract(StoreContract):
    @pytest.fixture
    async def store(self, pg_dsn):
        async with PostgresStore(pg_dsn) as store:
            yield store
