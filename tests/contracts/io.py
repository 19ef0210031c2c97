"""The IO-manager contract. Subclass with an ``io`` fixture (and ``config`` if needed).

Every IO manager (memory, postgres, s3, parquet, filesystem) runs it unchanged,
on asyncio and trio. Values are written as small dicts; a manager that holds
tables overrides ``put`` (dict -> its value) and ``got`` (its value -> dict).
"""

from __future__ import annotations

from datetime import date, datetime, timezone

import anyio
import pytest

import flowstone as fs

pytestmark = pytest.mark.anyio

HOSTILE_KEYS = ["../../etc/passwd", "a/b", "/leading", "ünïcødé ☃", "a|b", "a\\b", "..", " ", "x" * 300]


class IOContract:
    """``io`` is an opened IO manager holding nothing; ``config`` its per-call settings."""

    @pytest.fixture
    def config(self):
        return {}

    @pytest.fixture
    async def io(self):  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    def put(self, data: dict):
        """The value to store for ``data``."""
        return data

    def got(self, value) -> dict:
        """``data`` back from a loaded value."""
        return value

    async def test_a_stored_value_loads_back(self, io, config):
        await io.store("orders", self.put({"rows": [1, 2, 3]}), None, config)
        assert self.got(await io.load("orders", None, config)) == {"rows": [1, 2, 3]}

    async def test_partitions_are_separate_values(self, io, config):
        await io.store("daily", self.put({"day": 1}), date(2025, 1, 1), config)
        await io.store("daily", self.put({"day": 2}), date(2025, 1, 2), config)
        assert self.got(await io.load("daily", date(2025, 1, 1), config)) == {"day": 1}
        assert self.got(await io.load("daily", "2025-01-02", config)) == {"day": 2}  # the key works too

    async def test_storing_again_replaces_the_value(self, io, config):
        await io.store("orders", self.put({"v": 1}), None, config)
        await io.store("orders", self.put({"v": 2}), None, config)
        assert self.got(await io.load("orders", None, config)) == {"v": 2}

    async def test_a_missing_value_is_not_found_naming_it(self, io, config):
        with pytest.raises(fs.NotFound) as info:
            await io.load("orders", "eu", config)
        assert info.value.asset == "orders"

    async def test_delete_removes_and_deleting_again_is_not_an_error(self, io, config):
        await io.store("orders", self.put({"v": 1}), None, config)
        await io.delete("orders", None, config)
        await io.delete("orders", None, config)
        with pytest.raises(fs.NotFound):
            await io.load("orders", None, config)

    async def test_exists(self, io, config):
        assert not await io.exists("orders", None, config)
        await io.store("orders", self.put({"v": 1}), None, config)
        assert await io.exists("orders", None, config)

    async def test_metadata_has_size_and_update_time(self, io, config):
        before = datetime.now(timezone.utc)
        await io.store("orders", self.put({"rows": list(range(100))}), None, config)
        meta = await io.metadata("orders", None, config)
        assert meta["size_bytes"] > 0
        assert meta["updated_at"] >= before.replace(microsecond=0)

    async def test_a_tenant_cannot_read_another_tenants_value(self, io, config):
        with fs.tenant_scope("a"):
            await io.store("orders", self.put({"owner": "a"}), None, config)
        with fs.tenant_scope("b"):
            with pytest.raises(fs.NotFound):
                await io.load("orders", None, config)
            assert not await io.exists("orders", None, config)
            await io.store("orders", self.put({"owner": "b"}), None, config)
        with pytest.raises(fs.NotFound):
            await io.load("orders", None, config)  # no tenant is a namespace of its own
        with fs.tenant_scope("a"):
            assert self.got(await io.load("orders", None, config)) == {"owner": "a"}

    async def test_concurrent_writers_to_different_partitions(self, io, config):
        async def write(index):
            await io.store("daily", self.put({"i": index}), f"p{index}", config)

        async with anyio.create_task_group() as tasks:
            for index in range(50):
                tasks.start_soon(write, index)
        for index in range(50):
            assert self.got(await io.load("daily", f"p{index}", config)) == {"i": index}

    @pytest.mark.parametrize("key", HOSTILE_KEYS)
    async def test_a_hostile_partition_key_stays_in_its_own_namespace(self, io, config, key):
        await io.store("victim", self.put({"safe": True}), None, config)
        await io.store("attacker", self.put({"k": key}), key, config)
        assert self.got(await io.load("attacker", key, config)) == {"k": key}
        assert self.got(await io.load("victim", None, config)) == {"safe": True}
        with pytest.raises(fs.NotFound):
            await io.load("attacker", None, config)
