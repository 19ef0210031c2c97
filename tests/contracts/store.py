"""The materialization-store contract. Subclass with a ``store`` fixture.

Written against the protocol only, so every store (memory now, Postgres and the
embedded store later) runs it unchanged. Every test runs on asyncio and trio.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone

import anyio
import attrs
import pytest

import flowstone as fs
from flowstone.runtime.backfill import BackfillSpec, BackfillStatus, Saved
from flowstone.store import TRANSITIONS, Status

pytestmark = pytest.mark.anyio


class StoreContract:
    """Every store passes these; ``store`` is an opened store with no records."""

    @pytest.fixture
    async def store(self):  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    # ----------------------------------------------------------- create / get

    async def test_create_fills_identity_status_and_timestamps(self, store):
        record = await store.create(asset_name="orders")
        assert isinstance(record.id, uuid.UUID) and isinstance(record.run_id, uuid.UUID)
        assert record.status is Status.PENDING and record.partition is None
        assert record.tenant_id is None
        assert record.inserted_at.tzinfo is not None and record.updated_at == record.inserted_at

    async def test_get_returns_the_latest_record_of_asset_and_partition(self, store):
        first = await store.create(asset_name="orders", partition="eu")
        second = await store.create(asset_name="orders", partition="eu")
        await store.create(asset_name="orders", partition="us")
        assert (await store.get("orders", "eu")).id == second.id != first.id

    async def test_partition_values_are_stored_by_their_key(self, store):
        record = await store.create(asset_name="daily", partition=date(2025, 1, 15))
        assert record.partition == "2025-01-15"
        assert (await store.get("daily", date(2025, 1, 15))).id == record.id
        assert (await store.get("daily", "2025-01-15")).id == record.id

    async def test_get_missing_is_not_found_naming_asset_and_partition(self, store):
        with pytest.raises(fs.NotFound) as info:
            await store.get("orders", "eu")
        assert info.value.asset == "orders" and info.value.partition == "eu"

    async def test_get_by_id_accepts_uuid_and_string(self, store):
        record = await store.create(asset_name="orders")
        assert (await store.get_by_id(record.id)).id == record.id
        assert (await store.get_by_id(str(record.id))).id == record.id

    @pytest.mark.parametrize("bad", ["not-a-uuid", 42, None])
    async def test_get_by_id_with_a_bad_or_unknown_id_is_not_found(self, store, bad):
        with pytest.raises(fs.NotFound):
            await store.get_by_id(bad)
        with pytest.raises(fs.NotFound):
            await store.get_by_id(uuid.uuid4())

    async def test_get_by_run_id_returns_every_record_of_the_run(self, store):
        run = uuid.uuid4()
        a = await store.create(asset_name="a", run_id=run)
        b = await store.create(asset_name="b", run_id=str(run))
        await store.create(asset_name="c")
        assert {r.id for r in await store.get_by_run_id(run)} == {a.id, b.id}

    async def test_exists(self, store):
        assert not await store.exists("orders", "eu")
        await store.create(asset_name="orders", partition="eu")
        assert await store.exists("orders", "eu")
        assert not await store.exists("orders", "us")

    async def test_create_refuses_unknown_fields_and_bad_names_storing_nothing(self, store):
        with pytest.raises(fs.DefinitionError, match="colour"):
            await store.create(asset_name="orders", colour="red")
        with pytest.raises(fs.InvalidIdentifier):
            await store.create(asset_name="drop table x; --")
        with pytest.raises(fs.DefinitionError, match="asset_name"):
            await store.create(partition="eu")
        with pytest.raises(fs.InvalidTransition):
            await store.create(asset_name="orders", status="exploded")
        assert await store.list_all() == []

    async def test_create_refuses_setting_the_tenant_by_hand(self, store):
        with pytest.raises(fs.DefinitionError, match="tenant_id"):
            await store.create(asset_name="orders", tenant_id="someone-else")

    # ----------------------------------------------------------- transitions

    async def test_update_status_follows_the_status_machine(self, store):
        record = await store.create(asset_name="orders")
        running = await store.update_status(record.id, Status.RUNNING, started_at=datetime.now(timezone.utc))
        assert running.status is Status.RUNNING and running.started_at is not None
        done = await store.update_status(str(record.id), "success", duration_ms=12.5, metadata={"rows": 3})
        assert done.status is Status.SUCCESS and done.duration_ms == 12.5 and done.metadata == {"rows": 3}
        assert (await store.get_by_id(record.id)).status is Status.SUCCESS
        assert done.updated_at >= running.updated_at

    async def test_every_status_pair_is_allowed_or_refused_as_the_machine_says(self, store):
        """All 49 (from, to) pairs, exhaustively: allowed moves apply, others change nothing."""
        for start in Status:
            for target in Status:
                record = await store.create(asset_name="orders", status=start)
                if target in TRANSITIONS[start]:
                    assert (await store.update_status(record.id, target)).status is target
                    continue
                with pytest.raises(fs.InvalidTransition) as info:
                    await store.update_status(record.id, target)
                assert info.value.current is start and info.value.requested is target
                assert (await store.get_by_id(record.id)).status is start

    async def test_update_with_unknown_or_identity_fields_is_refused(self, store):
        record = await store.create(asset_name="orders")
        for fields in ({"colour": "red"}, {"asset_name": "other"}, {"tenant_id": "x"}, {"run_id": uuid.uuid4()}):
            with pytest.raises(fs.DefinitionError):
                await store.update_status(record.id, Status.RUNNING, **fields)
        assert (await store.get_by_id(record.id)).status is Status.PENDING

    async def test_update_of_a_missing_record_is_not_found(self, store):
        with pytest.raises(fs.NotFound):
            await store.update_status(uuid.uuid4(), Status.RUNNING)

    async def test_complete_checks_first_and_is_visible_to_the_next_call(self, store):
        record = await store.create(asset_name="orders", status=Status.RUNNING)
        done = await store.complete(record, Status.SUCCESS, duration_ms=1.0)
        assert done.status is Status.SUCCESS
        assert (await store.get_by_id(record.id)).status is Status.SUCCESS
        with pytest.raises(fs.InvalidTransition):
            await store.complete(done, Status.RUNNING)

    # -------------------------------------------------------------- listings

    async def test_list_by_status_is_newest_first_and_limited(self, store):
        made = [await store.create(asset_name="orders", partition=str(i), status=Status.FAILED) for i in range(5)]
        await store.create(asset_name="orders", partition="ok", status=Status.SUCCESS)
        failed = await store.list_by_status(Status.FAILED, limit=3)
        assert [r.id for r in failed] == [r.id for r in reversed(made)][:3]
        assert len(await store.list_by_status("failed")) == 5

    async def test_list_all_is_newest_first_filtered_and_limited(self, store):
        made = [await store.create(asset_name=name) for name in ("a", "b", "a", "c")]
        assert [r.id for r in await store.list_all()] == [r.id for r in reversed(made)]
        assert [r.asset_name for r in await store.list_all(asset_name="a")] == ["a", "a"]
        assert len(await store.list_all(limit=2)) == 2

    async def test_a_negative_limit_is_refused(self, store):
        with pytest.raises(fs.DefinitionError, match="limit"):
            await store.list_all(limit=-1)

    # ------------------------------------------------ what the runtime needs

    async def test_latest_successes_sees_only_success_or_stale(self, store):
        ok = await store.create(asset_name="a", partition="1", status=Status.RUNNING)
        ok = await store.complete(ok, Status.SUCCESS)
        await store.create(asset_name="a", partition="1", status=Status.FAILED)  # newer, but failed
        await store.create(asset_name="a", partition="2", status=Status.RUNNING)
        found = await store.latest_successes([("a", "1"), ("a", "2"), ("b", None)])
        assert list(found) == [("a", "1")] and found[("a", "1")].id == ok.id

    async def test_partitions_of_lists_the_latest_success_of_each_partition(self, store):
        for key in ("1", "2"):
            record = await store.create(asset_name="a", partition=key, status=Status.RUNNING)
            await store.complete(record, Status.SUCCESS)
        assert sorted(await store.partitions_of("a")) == ["1", "2"]
        assert await store.partitions_of("nothing") == {}

    async def test_mark_stale_follows_lineage_transitively(self, store):
        async def success(name, key, reads):
            record = await store.create(
                asset_name=name, partition=key, status=Status.RUNNING,
                upstream_assets=tuple(reads), upstream_partitions=reads,
            )
            return await store.complete(record, Status.SUCCESS)

        await success("raw", "1", {})
        clean = await success("clean", "1", {"raw": ("1",)})
        summary = await success("summary", None, {"clean": ("1",)})
        other = await success("clean", "2", {"raw": ("2",)})
        await store.mark_stale("raw", "1")
        assert (await store.get_by_id(clean.id)).status is Status.STALE
        assert (await store.get_by_id(summary.id)).status is Status.STALE
        assert (await store.get_by_id(other.id)).status is Status.SUCCESS

    async def test_backfill_state_round_trips(self, store):
        backfill = uuid.uuid4()
        assert await store.load_backfill(backfill) is None
        spec = BackfillSpec(
            id=backfill, asset="daily", partitions=("2025-01-01", "2025-01-02"), max_parallel=4,
            upstream="missing", force=False, io={"config": {"table": "t"}}, context={"who": "me"}, tenant=None,
        )
        now = datetime(2025, 1, 3, 4, 5, 6, 789, tzinfo=timezone.utc)
        running = BackfillStatus(
            id=backfill, asset="daily", state="running", total=2, queued=1, running=1, succeeded=0,
            failed=0, cancelled=0, started_at=now,
        )
        await store.save_backfill(backfill, Saved(spec, running))
        assert await store.load_backfill(backfill) == Saved(spec, running)
        done = attrs.evolve(
            running, state="failed", queued=0, running=0, succeeded=1, failed=1,
            errors=(("2025-01-02", "boom"),), finished_at=now,
        )
        await store.save_backfill(backfill, Saved(spec, done))
        assert await store.load_backfill(backfill) == Saved(spec, done)

    # ---------------------------------------------------------------- tenants

    async def test_records_are_invisible_across_tenants(self, store):
        with fs.tenant_scope("a"):
            mine = await store.create(asset_name="orders", partition="eu", status=Status.RUNNING)
            assert mine.tenant_id == "a"
            await store.complete(mine, Status.SUCCESS)
        for tenant in ("b", None):
            with fs.tenant_scope(tenant) if tenant else _no_tenant():
                assert not await store.exists("orders", "eu")
                assert await store.list_all() == []
                assert await store.list_by_status("success") == []
                assert await store.get_by_run_id(mine.run_id) == []
                assert await store.latest_successes([("orders", "eu")]) == {}
                with pytest.raises(fs.NotFound):
                    await store.get("orders", "eu")
                with pytest.raises(fs.NotFound):
                    await store.get_by_id(mine.id)
                with pytest.raises(fs.NotFound):
                    await store.update_status(mine.id, Status.STALE)
        with fs.tenant_scope("a"):
            assert (await store.get("orders", "eu")).status is Status.SUCCESS

    # ------------------------------------------------------------ concurrency

    async def test_concurrent_writers_lose_nothing(self, store):
        async def writer(index):
            record = await store.create(asset_name="orders", partition=str(index), status=Status.RUNNING)
            await store.update_status(record.id, Status.SUCCESS)

        async with anyio.create_task_group() as tasks:
            for index in range(200):
                tasks.start_soon(writer, index)
        records = await store.list_all(limit=1000)
        assert len(records) == 200 and {r.status for r in records} == {Status.SUCCESS}
        assert len({r.partition for r in records}) == 200


class _no_tenant:
    def __enter__(self):
        assert fs.current_tenant() is None

    def __exit__(self, *exc):
        return None
