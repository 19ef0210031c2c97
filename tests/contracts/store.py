"""The materialization-store contract. Subclass with a ``store`` fixture.

Written against the protocol only, so every store (memory now, Postgres and the
embedded store later) runs it unchanged. Every test runs on asyncio and trio.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import anyio
import attrs
import pytest

import flowstone as fs
from flowstone.runtime.backfill import BackfillSpec, BackfillStatus, Saved
from flowstone.store import TRANSITIONS, Status
from flowstone.store.leases import CancelRequested, End, FinishedElsewhere, LeaseHeld, Start

pytestmark = pytest.mark.anyio


async def pruned_history(store) -> None:
    """Asset a: 5 partitions built 4 times (the last attempt at "4" failed); asset b: 3
    partitions built 3 times. What the retention tests prune."""
    for attempt in range(4):
        for key in map(str, range(5)):
            record = await store.create(asset_name="a", partition=key, status=Status.RUNNING)
            await store.complete(record, Status.FAILED if (attempt, key) == (3, "4") else Status.SUCCESS)
    for key in map(str, range(3)):  # another asset's history
        for _ in range(3):
            record = await store.create(asset_name="b", partition=key, status=Status.RUNNING)
            await store.complete(record, Status.SUCCESS)


def kinds(records) -> list[tuple[str, str | None, str]]:
    """Each record's asset, partition and status, sorted: what two stores or tenants compare."""
    return sorted((r.asset_name, r.partition, r.status.value) for r in records)


class StoreContract:
    """Every store passes these; ``store`` is an opened store with no records, and
    ``age(seconds)`` makes its leases and backfill heartbeats that much older (time
    passing, without waiting for it)."""

    @pytest.fixture
    async def store(self):  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    @pytest.fixture
    def age(self, store):  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    # ----------------------------------------------------------- create / get

    async def test_create_fills_identity_status_and_timestamps(self, store):
        record = await store.create(asset_name="orders")
        assert isinstance(record.id, uuid.UUID) and isinstance(record.run_id, uuid.UUID)
        assert record.status is Status.PENDING and record.partition is None
        assert record.tenant_id is None
        assert record.inserted_at.tzinfo is not None and record.updated_at == record.inserted_at

    async def test_metadata_keeps_each_values_type_when_equal_values_of_other_types_came_first(self, store):
        # 1, 1.0 and True are equal in Python; records that share small metadata must not mix them up.
        kept = []
        for value in (1, True, 1.0, "1", None):
            record = await store.create(asset_name="raw", partition=repr(value), metadata={"flag": value})
            kept.append((record.id, value))
        for record_id, value in kept:
            stored = (await store.get_by_id(record_id)).metadata["flag"]
            assert (type(stored), stored) == (type(value), value)

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

    async def test_the_whole_asset_and_the_empty_key_are_different_partitions(self, store):
        assert not await store.exists("orders") and not await store.exists("orders", "")
        whole = await store.create(asset_name="orders")
        assert await store.exists("orders") and not await store.exists("orders", "")
        empty = await store.create(asset_name="orders", partition="", status=Status.RUNNING)
        newer = await store.create(asset_name="orders")
        assert (await store.get("orders")).id == newer.id != whole.id
        assert (await store.get("orders", "")).id == empty.id
        moved = await store.update_status(empty.id, Status.SUCCESS)  # the latest record, whatever its status
        assert (await store.get("orders", "")).status is moved.status is Status.SUCCESS

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

    async def test_what_complete_returns_is_what_is_stored(self, store):
        # A job's end (timing, metadata, an error) and any other move alike: every
        # field read back equals the record complete returned, and what it did not
        # change is what begin wrote.
        now = datetime.now(timezone.utc)
        fields = dict(status=Status.RUNNING, started_at=now, upstream_assets=("raw",),
                      upstream_partitions={"raw": ("1",)}, dependency_hash="h" * 64, executor_node="node/executor:a")
        ok, lease = await store.begin("p1", 30, asset_name="a", partition="1", **fields)
        done = await store.complete(ok, Status.SUCCESS, lease=lease, completed_at=now, duration_ms=2.5,
                                    metadata={"flowstone.io_manager": "memory", "rows": 3})
        bad, lease = await store.begin("p1", 30, asset_name="a", partition="2", **fields)
        failed = await store.complete(bad, Status.FAILED, lease=lease, completed_at=now, duration_ms=1.0,
                                      error_message="ValueError: boom", error_traceback="Traceback ...")
        moved = await store.create(asset_name="a", partition="3", status=Status.PENDING)
        started = await store.complete(moved, Status.RUNNING, started_at=now, executor_node="node/executor:a")
        for returned in (done, failed, started):
            assert await store.get_by_id(returned.id) == returned
        assert (done.upstream_partitions, done.dependency_hash, done.started_at) == ({"raw": ("1",)}, "h" * 64, now)

    async def test_a_failure_keeps_its_message_and_traceback(self, store):
        record = await store.create(asset_name="orders", status=Status.RUNNING)
        trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in build\nValueError: boom\n'
        failed = await store.complete(record, Status.FAILED, error_message="ValueError: boom", error_traceback=trace)
        assert (await store.get_by_id(record.id)).error_traceback == trace == failed.error_traceback
        other = await store.create(asset_name="orders", status=Status.RUNNING)
        await store.update_status(other.id, Status.FAILED, error_traceback=trace)
        assert (await store.get_by_id(other.id)).error_traceback == trace

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

    async def test_list_all_pages_after_a_record(self, store):
        made = [await store.create(asset_name=name) for name in ("a", "b", "a", "c", "a", "a")]
        newest_first = [r.id for r in reversed(made)]
        first = await store.list_all(limit=2)
        second = await store.list_all(limit=2, before=first[-1].id)
        assert [r.id for r in first + second] == newest_first[:4]
        assert [r.id for r in await store.list_all(before=made[1].id)] == [made[0].id]
        a_pages = [r.id for r in await store.list_all(asset_name="a", limit=3, before=str(made[5].id))]
        assert a_pages == [made[4].id, made[2].id, made[0].id]
        assert await store.list_all(before=made[0].id) == []
        with fs.tenant_scope("other"):
            with pytest.raises(fs.NotFound):
                await store.list_all(before=made[3].id)  # another tenant's record is no bookmark

    async def test_backfills_are_listed_a_page_at_a_time(self, store):
        from flowstone.runtime.backfill import BackfillSpec, BackfillStatus, Saved

        for n in range(5):
            spec = BackfillSpec(id=uuid.uuid4(), asset=f"a{n}", partitions=("1",), max_parallel=1, upstream="none",
                                force=False, io=None, context=None, tenant=None)
            status = BackfillStatus(id=spec.id, asset=spec.asset, state="succeeded", total=1, queued=0, running=0,
                                    succeeded=1, failed=0, cancelled=0)
            await store.save_backfill(spec.id, Saved(spec, status), owner="me")
        everything = [s.spec.id for s in await store.list_backfills()]
        pages = [s.spec.id for offset in (0, 2, 4) for s in await store.list_backfills(limit=2, offset=offset)]
        assert len(everything) == 5 and pages == everything
        assert await store.list_backfills(offset=5) == []
        with pytest.raises(fs.DefinitionError, match="offset"):
            await store.list_backfills(offset=-1)

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

    async def test_lookups_asked_at_once_each_get_their_own_answer(self, store):
        """A backfill's workers ask at once (a store may answer them with one query):
        each still gets the successes of its own pairs, in its own tenant."""
        ids = {}
        for tenant in (None, "other"):
            with fs.tenant_scope(tenant) if tenant else _no_tenant():
                for key in ("1", "2", "3") if tenant else ("1", "2"):
                    record = await store.create(asset_name="a", partition=key, status=Status.RUNNING)
                    ids[(tenant, key)] = (await store.complete(record, Status.SUCCESS)).id
        asks = [(tenant, keys) for tenant in (None, "other") for keys in (["1"], ["2", "3"], ["3", "9", "3"], [])]
        answers: dict[int, dict] = {}

        async def ask(index, tenant, keys):
            with fs.tenant_scope(tenant) if tenant else _no_tenant():
                answers[index] = await store.latest_successes([("a", key) for key in keys])

        async with anyio.create_task_group() as group:
            for index, (tenant, keys) in enumerate(asks):
                group.start_soon(ask, index, tenant, keys)
        for index, (tenant, keys) in enumerate(asks):
            expected = {("a", key): ids[(tenant, key)] for key in keys if (tenant, key) in ids}
            assert {pair: record.id for pair, record in answers[index].items()} == expected, (tenant, keys)
        assert answers[1] == {("a", "2"): answers[1][("a", "2")]}  # no tenant has no "3": not another's

    async def test_partitions_of_lists_the_latest_success_of_each_partition(self, store):
        for key in ("1", "2"):
            record = await store.create(asset_name="a", partition=key, status=Status.RUNNING)
            await store.complete(record, Status.SUCCESS)
        assert sorted(await store.partitions_of("a")) == ["1", "2"]
        assert await store.partitions_of("nothing") == {}

    async def test_successes_after_a_mark_are_what_became_successes_since_oldest_first(self, store):
        """What the daemon asks every few seconds for an eager asset's upstream: the
        successes written after its last look, not every partition's record."""

        async def success(asset, key):
            return await store.complete(await store.create(asset_name=asset, partition=key, status=Status.RUNNING),
                                        Status.SUCCESS)

        nothing, start = await store.successes_after("up", None)
        assert nothing == [] and isinstance(start, str)
        assert (await store.successes_after("up", start))[0] == []
        first = await success("up", "1")
        second = await success("up", "2")
        await success("other", "1")
        found, mark = await store.successes_after("up", start)
        assert [r.id for r in found] == [first.id, second.id]
        again = await success("up", "1")  # supersedes the first
        await store.create(asset_name="up", partition="3", status=Status.FAILED)
        stale = await success("up", "4")
        await store.update_status(stale.id, Status.STALE)
        made = await store.create(asset_name="up", partition="5", status=Status.SUCCESS)  # written a success
        moved = await store.update_status(
            (await store.create(asset_name="up", partition="6", status=Status.RUNNING)).id, Status.SUCCESS)
        found, later = await store.successes_after("up", mark)
        assert [r.id for r in found] == [again.id, made.id, moved.id]
        assert (await store.successes_after("up", later))[0] == []
        begun = await store.begin_many("me", 60.0, [
            Start({"asset_name": "up", "partition": key, "status": Status.RUNNING}) for key in ("7", "8")])
        ended = await store.complete_many([End(record, Status.SUCCESS, lease, {}) for record, lease in begun])
        found, _ = await store.successes_after("up", later)
        assert [r.id for r in found] == [r.id for r in ended]
        # From the first mark: the current successes written since (the first was superseded).
        found, _ = await store.successes_after("up", start)
        assert [r.id for r in found] == [second.id, again.id, made.id, moved.id, *(r.id for r in ended)]
        assert (await store.successes_after("nothing", start))[0] == []
        with fs.tenant_scope("other"):
            assert (await store.successes_after("up", start))[0] == []
        # Not marks at all, or marks of no store like this one: other kinds, or later than now.
        for bad in ("nonsense", "memory:zz@", "sqlite:x", "pg:1:2:x", 42, "pg:" + "1" * 1_000_001,
                    "sqlite:99999999999", "pg:99999999999:99999999999:"):
            with pytest.raises(fs.DefinitionError, match="mark"):
                await store.successes_after("up", bad)

    async def test_an_older_record_made_a_success_is_its_partitions_current_one(self, store):
        """A success need not be its partition's newest record: an older record moved
        to success (a newer one failed meanwhile) is the partition's current record for
        every lookup, and is new for an eager look."""
        older = await store.create(asset_name="a", partition="1", status=Status.RUNNING)
        newer = await store.create(asset_name="a", partition="1", status=Status.FAILED)
        _, mark = await store.successes_after("a", None)
        made = await store.update_status(older.id, Status.SUCCESS)
        assert [r.id for r in (await store.successes_after("a", mark))[0]] == [made.id]
        assert (await store.latest_successes([("a", "1")]))[("a", "1")].id == made.id
        assert {key: r.id for key, r in (await store.partitions_of("a")).items()} == {"1": made.id}
        assert (await store.get("a", "1")).id == newer.id  # the latest record is still the failed one
        assert (await store.partition_states("a")) == {"1": Status.FAILED}

    async def test_partition_states_are_the_latest_record_of_each_partition(self, store):
        ok = await store.complete(await store.create(asset_name="a", partition="1", status=Status.RUNNING),
                                  Status.SUCCESS)
        await store.create(asset_name="a", partition="1", status=Status.FAILED)  # a later attempt failed
        await store.complete(await store.create(asset_name="a", partition="2", status=Status.RUNNING),
                             Status.SUCCESS)
        await store.update_status(ok.id, Status.STALE)
        whole = await store.create(asset_name="a", status=Status.RUNNING)
        await store.create(asset_name="b", partition="9", status=Status.FAILED)
        with fs.tenant_scope("other"):
            await store.create(asset_name="a", partition="3", status=Status.FAILED)
            assert await store.partition_states("a") == {"3": Status.FAILED}
        assert await store.partition_states("a") == {"1": Status.FAILED, "2": Status.SUCCESS, None: Status.RUNNING}
        assert await store.partition_states("nothing") == {}
        await store.complete(whole, Status.SUCCESS)  # the latest record moves: so does its partition's state
        assert (await store.partition_states("a"))[None] is Status.SUCCESS
        await store.create(asset_name="a", status=Status.PENDING)  # a newer one of the unpartitioned asset
        assert await store.partition_states("a") == {"1": Status.FAILED, "2": Status.SUCCESS, None: Status.PENDING}

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

    # ------------------------------------------------------------ retention

    async def _history(self, store, asset="a", key="1"):
        """Per partition ``key``: three superseded successes, a failure, the current
        success, then a failed attempt (the latest record); their records, oldest first."""
        made = []
        for status in (Status.SUCCESS, Status.SUCCESS, Status.SUCCESS, Status.FAILED, Status.SUCCESS, Status.FAILED):
            record = await store.create(asset_name=asset, partition=key, status=Status.RUNNING)
            made.append(await store.complete(record, status))
        return [await store.get_by_id(r.id) for r in made]

    async def test_prune_keeps_the_newest_history_of_each_partition_and_never_the_current_or_latest(self, store):
        one, other = await self._history(store, key="1"), await self._history(store, key="2")
        whole = await self._history(store, key=None)
        with fs.tenant_scope("t"):
            theirs = await self._history(store, key="1")
        assert [r.status for r in one] == [Status.SUPERSEDED] * 3 + [Status.FAILED, Status.SUCCESS, Status.FAILED]
        assert await store.prune("a") == 0  # no limit given: nothing
        assert await store.prune("a", keep_last=2) == 3 * 3  # per partition: the 2 newest history records stay
        for made in (one, other, whole):
            left = {r.id for r in await store.list_all(asset_name="a", limit=100)}
            # kept: the latest (failed), the current success, the newest history one
            assert [r.id in left for r in made] == [False, False, False, True, True, True]
        assert await store.partition_states("a") == {"1": Status.FAILED, "2": Status.FAILED, None: Status.FAILED}
        assert (await store.latest_successes([("a", "1")]))[("a", "1")].id == one[4].id
        assert await store.prune("a", keep_last=0) == 3  # even the newest, but never the latest or current
        assert {r.id for r in await store.list_all(asset_name="a", limit=100)} == {
            r.id for made in (one, other, whole) for r in made[4:]}
        with fs.tenant_scope("t"):
            assert len(await store.list_all(asset_name="a", limit=100)) == len(theirs)  # another tenant's stay

    async def test_prune_by_age_with_a_limit_and_sparing_what_a_stale_record_read(self, store):
        made = await self._history(store, key="1")
        assert await store.prune("a", before=made[0].inserted_at) == 0  # nothing older than the first
        assert await store.prune("a", keep_last=0, spare=["1"]) == 1  # superseded ones of "1" spared: the failure
        assert await store.prune("a", before=datetime.now(timezone.utc) + timedelta(days=1), limit=2) == 2
        left = {r.id for r in await store.list_all(asset_name="a", limit=100)}
        assert [r.id in left for r in made] == [False, False, True, False, True, True]  # oldest first
        with pytest.raises(fs.DefinitionError, match="keep_last"):
            await store.prune("a", keep_last=-1)
        with pytest.raises(fs.DefinitionError, match="limit"):
            await store.prune("a", keep_last=1, limit=0)

    async def test_prune_in_batches_deletes_what_one_call_deletes(self, store):
        """Retention deletes ``limit`` records a call until fewer go. A pass's choice is
        made once and gone through call after call (another asset's prune in between
        makes it anew); what a batch deletes in the end is what one call deletes."""
        with fs.tenant_scope("whole"):
            await pruned_history(store)
            assert await store.prune("a", keep_last=1) == 10
        with fs.tenant_scope("parts"):
            await pruned_history(store)
            counts = [await store.prune("a", keep_last=1, limit=3)]
            record = await store.create(asset_name="a", partition="0", status=Status.RUNNING)
            await store.complete(record, Status.SUCCESS)  # one more superseded record of a/0, after the choice
            counts.append(await store.prune("a", keep_last=1, limit=3))
            assert await store.prune("b", keep_last=1, limit=3) == 3  # another choice in between...
            while counts[-1] == 3:
                counts.append(await store.prune("a", keep_last=1, limit=3))
            assert sum(counts) == 11 and counts[-1] < 3  # ...so a's was made again, with the new record
            assert await store.prune("b", keep_last=1, limit=3) == 0
            parts = kinds(await store.list_all(limit=1000))
        with fs.tenant_scope("whole"):
            record = await store.create(asset_name="a", partition="0", status=Status.RUNNING)
            await store.complete(record, Status.SUCCESS)
            assert await store.prune("a", keep_last=1) == 1
            assert await store.prune("b", keep_last=1) == 3
            assert parts == kinds(await store.list_all(limit=1000))
            assert await store.partition_states("a") == {"0": Status.SUCCESS, "1": Status.SUCCESS,
                                                          "2": Status.SUCCESS, "3": Status.SUCCESS,
                                                          "4": Status.FAILED}

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
        assert await store.load_backfill_status(backfill) == running
        assert await store.load_backfill_status(uuid.uuid4()) is None
        with fs.tenant_scope("other"):
            assert await store.load_backfill_status(backfill) is None
        done = attrs.evolve(
            running, state="failed", queued=0, running=0, succeeded=1, failed=1,
            errors=(("2025-01-02", "boom"),), finished_at=now,
        )
        await store.save_backfill(backfill, Saved(spec, done))
        assert await store.load_backfill(backfill) == Saved(spec, done)

    async def test_backfills_are_listed_most_recently_saved_first_per_tenant(self, store):
        saved = []
        for asset in ("a", "b"):
            backfill = uuid.uuid4()
            spec = BackfillSpec(id=backfill, asset=asset, partitions=("1",), max_parallel=1, upstream="missing",
                                force=False, io=None, context=None, tenant=None)
            status = BackfillStatus(id=backfill, asset=asset, state="running", total=1, queued=1, running=0,
                                    succeeded=0, failed=0, cancelled=0)
            saved.append(Saved(spec, status))
            await store.save_backfill(backfill, saved[-1])
        assert [s.spec.asset for s in await store.list_backfills()] == ["b", "a"]
        await store.save_backfill(saved[0].spec.id, saved[0])  # saved again: now the most recent
        assert [s.spec.asset for s in await store.list_backfills()] == ["a", "b"]
        assert [s.spec.asset for s in await store.list_backfills(limit=1)] == ["a"]
        assert await store.list_backfill_statuses() == [s.status for s in await store.list_backfills()]
        assert await store.list_backfill_statuses(limit=1, offset=1) == [saved[1].status]
        with fs.tenant_scope("other"):
            assert await store.list_backfills() == []
            assert await store.list_backfill_statuses() == []

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


class LeaseContract:
    """Single flight across processes and ownership of backfills (ADR 0009), mixed
    into every store's contract class."""

    # ------------------------------------------------------- one current success

    async def test_a_new_success_supersedes_the_current_record_in_the_same_write(self, store):
        first = await store.complete(await store.create(asset_name="a", partition="1", status=Status.RUNNING),
                                     Status.SUCCESS)
        second = await store.complete(await store.create(asset_name="a", partition="1", status=Status.RUNNING),
                                      Status.SUCCESS)
        assert (await store.get_by_id(first.id)).status is Status.SUPERSEDED
        await store.update_status(second.id, Status.STALE)
        third = await store.create(asset_name="a", partition="1", status=Status.RUNNING)
        await store.update_status(third.id, Status.SUCCESS)  # the public move supersedes too
        assert (await store.get_by_id(second.id)).status is Status.SUPERSEDED
        assert [r.id for r in await store.list_by_status("success")] == [third.id]
        assert (await store.latest_successes([("a", "1")]))[("a", "1")].id == third.id

    async def test_superseding_keeps_partitions_tenants_and_the_unpartitioned_record_apart(self, store):
        async def success(partition):
            return await store.complete(
                await store.create(asset_name="a", partition=partition, status=Status.RUNNING), Status.SUCCESS
            )

        kept = [await success(None), await success(""), await success("x")]
        with fs.tenant_scope("other"):
            await success("x")
        assert [(await store.get_by_id(r.id)).status for r in kept] == [Status.SUCCESS] * 3

    # ----------------------------------------------------------------- leases

    async def test_begin_takes_the_lease_and_creates_the_record(self, store):
        record, lease = await store.begin("p1", 30, asset_name="a", partition="1", status=Status.RUNNING)
        assert (await store.get_by_id(record.id)).status is Status.RUNNING
        assert (lease.owner, lease.asset, lease.partition, lease.tenant) == ("p1", "a", "1", None)
        assert isinstance(lease.fence, int)

    async def test_begin_with_an_id_in_use_is_refused_and_leaves_the_record_as_it_was(self, store):
        record = await store.create(asset_name="orders", status=Status.RUNNING)
        with pytest.raises(fs.DefinitionError, match="already exists"):
            await store.begin("p1", 30, id=record.id, asset_name="a", partition="1", status=Status.RUNNING)
        kept = await store.get_by_id(record.id)
        assert (kept.asset_name, kept.status) == ("orders", Status.RUNNING)
        _, lease = await store.begin("p2", 30, asset_name="a", partition="1", status=Status.RUNNING)
        assert lease.owner == "p2"  # the refused begin kept no lease

    async def test_a_held_lease_is_refused_naming_its_holder_and_records_nothing(self, store):
        _, lease = await store.begin("p1", 30, asset_name="a", partition="1", status=Status.RUNNING)
        with pytest.raises(LeaseHeld) as held:
            await store.begin("p2", 30, asset_name="a", partition="1", status=Status.RUNNING)
        assert (held.value.owner, held.value.fence) == ("p1", lease.fence)
        assert len(await store.list_all()) == 1
        await store.begin("p2", 30, asset_name="a", partition="2", status=Status.RUNNING)  # another partition

    async def test_a_terminal_write_releases_the_lease_and_the_next_fence_is_larger(self, store):
        record, lease = await store.begin("p1", 30, asset_name="a", partition="1", status=Status.RUNNING)
        await store.complete(record, Status.SUCCESS, lease=lease)
        _, again = await store.begin("p2", 30, asset_name="a", partition="1", status=Status.RUNNING)
        assert again.fence > lease.fence

    async def test_an_expired_lease_is_taken_over_and_its_holder_fenced_out(self, store, age):
        old, lease = await store.begin("dead", 10, asset_name="a", partition="1", status=Status.RUNNING)
        await age(11)
        new, taken = await store.begin("alive", 10, asset_name="a", partition="1", status=Status.RUNNING)
        closed = await store.get_by_id(old.id)  # the holder's open record, closed in the same write
        assert closed.status is Status.FAILED and closed.error_message.startswith("orphaned: dead")
        with pytest.raises(fs.LeaseLost):
            await store.complete(old, Status.SUCCESS, lease=lease)
        done = await store.complete(new, Status.SUCCESS, lease=taken)
        found = await store.latest_successes([("a", "1")])
        assert found[("a", "1")].id == done.id
        assert (await store.get_by_id(old.id)).status is Status.FAILED

    async def test_a_fenced_out_holder_cannot_supersede_the_current_success(self, store, age):
        old, lease = await store.begin("slow", 10, asset_name="a", partition="1", status=Status.RUNNING)
        await age(11)
        new, taken = await store.begin("fast", 10, asset_name="a", partition="1", status=Status.RUNNING)
        current = await store.complete(new, Status.SUCCESS, lease=taken)
        with pytest.raises(fs.LeaseLost):
            await store.complete(old, Status.SUCCESS, lease=lease)
        assert (await store.get_by_id(current.id)).status is Status.SUCCESS

    async def test_renewal_keeps_a_lease_until_it_is_taken_over(self, store, age):
        _, lease = await store.begin("p1", 10, asset_name="a", partition="1", status=Status.RUNNING)
        await age(6)
        assert await store.renew_leases("p1", [lease.fence], 10) == {lease.fence}
        await age(6)  # 12 s after the grant, 6 after the renewal: still held
        with pytest.raises(LeaseHeld):
            await store.begin("p2", 10, asset_name="a", partition="1", status=Status.RUNNING)
        assert await store.renew_leases("p2", [lease.fence], 10) == set()  # only its owner renews it
        await age(11)
        await store.begin("p2", 10, asset_name="a", partition="1", status=Status.RUNNING)
        assert await store.renew_leases("p1", [lease.fence], 10) == set()

    async def test_wait_lease_returns_once_the_holder_is_done(self, store):
        record, lease = await store.begin("p1", 30, asset_name="a", partition="1", status=Status.RUNNING)
        waited = anyio.Event()

        async def waiter():
            await store.wait_lease("a", "1", lease.fence, 30)
            waited.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(waiter)
                await anyio.lowlevel.checkpoint()
                assert not waited.is_set()
                await store.complete(record, Status.SUCCESS, lease=lease)
        assert waited.is_set()
        assert (await store.latest_successes([("a", "1")]))[("a", "1")].id == record.id

    async def test_begin_unless_done_takes_a_success_finished_since_the_caller_looked(self, store):
        """A caller that looked before another process finished the partition (same
        dependency hash) gets that success instead of a lease: it does not compute again."""
        record, lease = await store.begin("p1", 30, asset_name="a", partition="1", status=Status.RUNNING,
                                          dependency_hash="h1")
        done = await store.complete(record, Status.SUCCESS, lease=lease)
        with pytest.raises(FinishedElsewhere) as finished:
            await store.begin("p2", 30, unless_done=(None, "h1"), asset_name="a", partition="1",
                              status=Status.RUNNING, dependency_hash="h1")
        assert finished.value.record.id == done.id
        assert [r.id for r in await store.list_all()] == [done.id]  # nothing written
        # The success the caller saw, or another hash, is no reason to stop it.
        await store.begin("p2", 30, unless_done=(done.id, "h1"), asset_name="a", partition="1",
                          status=Status.RUNNING, dependency_hash="h1")
        second, _ = await store.begin("p3", 30, unless_done=(None, "h2"), asset_name="a", partition="2",
                                      status=Status.RUNNING, dependency_hash="h2")
        assert second.partition == "2"

    async def test_concurrent_begins_of_one_partition_grant_exactly_one(self, store):
        granted, refused = [], []

        async def contender(owner):
            try:
                granted.append(await store.begin(owner, 30, asset_name="a", partition="1", status=Status.RUNNING))
            except LeaseHeld:
                refused.append(owner)

        async with anyio.create_task_group() as tasks:
            for index in range(20):
                tasks.start_soon(contender, f"p{index}")
        assert len(granted) == 1 and len(refused) == 19
        assert [r.id for r in await store.list_all()] == [granted[0][0].id]

    async def test_begin_many_begins_each_and_a_refused_one_changes_nothing_for_the_others(self, store):
        held, held_lease = await store.begin("p1", 30, asset_name="a", partition="2", status=Status.RUNNING)
        done, done_lease = await store.begin("p1", 30, asset_name="a", partition="3", status=Status.RUNNING,
                                             dependency_hash="h")
        success = await store.complete(done, Status.SUCCESS, lease=done_lease)
        starts = [
            Start({"asset_name": "a", "partition": "1", "status": Status.RUNNING, "dependency_hash": "h"}, (None, "h")),
            Start({"asset_name": "a", "partition": "2", "status": Status.RUNNING}),  # p1 holds it
            Start({"asset_name": "a", "partition": "3", "status": Status.RUNNING, "dependency_hash": "h"}, (None, "h")),
            Start({"asset_name": "a b", "partition": "4", "status": Status.RUNNING}),  # not a name
            Start({"asset_name": "a", "partition": "5", "status": Status.RUNNING}),
        ]
        first, refused, finished, invalid, last = await store.begin_many("p2", 30, starts)
        assert isinstance(refused, LeaseHeld) and refused.fence == held_lease.fence
        assert isinstance(finished, FinishedElsewhere) and finished.record.id == success.id
        assert isinstance(invalid, fs.InvalidIdentifier)
        for (record, lease), partition in [(first, "1"), (last, "5")]:
            assert (record.partition, record.status, lease.owner, lease.partition) == (partition, Status.RUNNING,
                                                                                       "p2", partition)
            assert (await store.get_by_id(record.id)).status is Status.RUNNING
        assert first[1].fence != last[1].fence
        assert {r.id for r in await store.list_all()} == {held.id, success.id, first[0].id, last[0].id}
        with pytest.raises(LeaseHeld):  # what begin_many granted is held
            await store.begin("p3", 30, asset_name="a", partition="5", status=Status.RUNNING)
        assert await store.begin_many("p2", 30, []) == []

    async def test_complete_many_completes_each_and_a_refused_one_changes_nothing_for_the_others(self, store, age):
        (one, one_lease), (two, two_lease), (three, three_lease) = await store.begin_many("p1", 10, [
            Start({"asset_name": "a", "partition": p, "status": Status.RUNNING}) for p in "123"])
        await age(11)
        _, _taken = await store.begin("p2", 10, asset_name="a", partition="2", status=Status.RUNNING)
        ended = await store.complete_many([
            End(one, Status.SUCCESS, one_lease, {"metadata": {"rows": 1}}),
            End(two, Status.SUCCESS, two_lease, {}),  # taken over: fenced out
            End(three, Status.STALE, three_lease, {}),  # not a move a running record makes
        ])
        assert isinstance(ended[0], fs.store.Materialization) and ended[0].status is Status.SUCCESS
        assert isinstance(ended[1], fs.LeaseLost)
        assert isinstance(ended[2], fs.InvalidTransition)
        assert await store.get_by_id(one.id) == ended[0]
        assert (await store.get_by_id(two.id)).status is Status.FAILED  # closed as an orphan by the takeover
        assert (await store.get_by_id(three.id)).status is Status.RUNNING
        failed = await store.complete_many([End(three, Status.FAILED, three_lease, {"error_message": "boom"})])
        assert failed[0].status is Status.FAILED and (await store.get_by_id(three.id)).error_message == "boom"
        assert await store.complete_many([]) == []

    async def test_a_second_round_of_many_takes_the_released_leases_and_supersedes_each_success(self, store):
        """A backfill run again: every lease was released with a success, every
        success gives way to the new one, and failures leave the old success current."""
        days = [f"2025-01-0{n}" for n in range(1, 7)]
        begun = await store.begin_many("p1", 30, [Start({"asset_name": "a", "partition": d, "status": Status.RUNNING,
                                                         "dependency_hash": "h1"}) for d in days])
        first = await store.complete_many([End(record, Status.SUCCESS, lease, {"duration_ms": 1.0})
                                           for record, lease in begun])
        again = await store.begin_many("p2", 30, [Start({"asset_name": "a", "partition": d, "status": Status.RUNNING,
                                                         "dependency_hash": "h2"}, (old.id, "h2"))
                                                  for d, old in zip(days, first, strict=True)])
        assert [lease.owner for _, lease in again] == ["p2"] * 6
        assert len({lease.fence for _, lease in begun + again}) == 12  # every grant a new fence
        ended = await store.complete_many([
            End(record, Status.SUCCESS if n % 2 == 0 else Status.FAILED, lease,
                {} if n % 2 == 0 else {"error_message": "boom"})
            for n, (record, lease) in enumerate(again)])
        for n, (day, old, new) in enumerate(zip(days, first, ended, strict=True)):
            current = await store.get("a", day)
            if n % 2 == 0:
                assert (current.id, (await store.get_by_id(old.id)).status) == (new.id, Status.SUPERSEDED)
            else:
                assert new.status is Status.FAILED and new.error_message == "boom"
                assert (await store.get_by_id(old.id)).status is Status.SUCCESS
        _, lease = await store.begin("p3", 30, asset_name="a", partition=days[1], status=Status.RUNNING)
        with pytest.raises(LeaseHeld):  # a failure released its lease too, and the new holder has it
            await store.begin("p4", 30, asset_name="a", partition=days[1], status=Status.RUNNING)
        assert lease.fence > max(taken.fence for _, taken in again)

    async def test_begin_many_grants_a_partition_asked_twice_once(self, store):
        begun = await store.begin_many("p1", 30, [
            Start({"asset_name": "a", "partition": "1", "status": Status.RUNNING}),
            Start({"asset_name": "a", "partition": "2", "status": Status.RUNNING}),
            Start({"asset_name": "a", "partition": "1", "status": Status.RUNNING}),
            Start({"asset_name": "a", "partition": None, "status": Status.RUNNING}),
            Start({"asset_name": "b", "partition": "1", "status": Status.RUNNING}),
        ])
        assert isinstance(begun[2], LeaseHeld) and begun[2].fence == begun[0][1].fence
        granted = [begun[i] for i in (0, 1, 3, 4)]
        assert [(record.asset_name, record.partition) for record, _ in granted] == [
            ("a", "1"), ("a", "2"), ("a", None), ("b", "1")]
        assert len({lease.fence for _, lease in granted}) == 4
        ended = await store.complete_many([End(record, Status.SUCCESS, lease, {}) for record, lease in granted])
        assert [record.status for record in ended] == [Status.SUCCESS] * 4
        assert (await store.get("a", None)).id == granted[2][0].id

    async def test_complete_many_given_a_job_twice_ends_it_once(self, store):
        (record, lease), = await store.begin_many("p1", 30, [Start({"asset_name": "a", "partition": "1",
                                                                    "status": Status.RUNNING})])
        first, second = await store.complete_many([End(record, Status.SUCCESS, lease, {}),
                                                   End(record, Status.SUCCESS, lease, {})])
        # The second is refused (its lease went with the first), or, where a store makes a
        # retried write a no-op (PostgreSQL: the same end again), the same success.
        assert first.status is Status.SUCCESS
        assert isinstance(second, fs.LeaseLost) or second == first, second
        assert (await store.get_by_id(record.id)).status is Status.SUCCESS

    async def test_begin_many_closes_what_a_dead_holder_left_open(self, store, age):
        (dead, _), = await store.begin_many("p1", 5, [Start({"asset_name": "a", "partition": "1",
                                                             "status": Status.RUNNING})])
        await age(6)
        begun = await store.begin_many("p2", 30, [
            Start({"asset_name": "a", "partition": p, "status": Status.RUNNING}) for p in "123"])
        assert [lease.owner for _, lease in begun] == ["p2"] * 3
        orphan = await store.get_by_id(dead.id)
        assert orphan.status is Status.FAILED and "orphaned" in orphan.error_message

    async def test_what_complete_many_writes_is_what_status_and_the_stale_cascade_read(self, store):
        raw = await store.create(asset_name="raw", partition="1", status=Status.SUCCESS)
        begun = await store.begin_many("p1", 30, [
            Start({"asset_name": "clean", "partition": p, "status": Status.RUNNING, "upstream_assets": ("raw",),
                   "upstream_partitions": {"raw": ("1",)}}) for p in "abc"])
        ended = await store.complete_many([
            End(record, Status.SUCCESS if record.partition != "c" else Status.FAILED, lease, {})
            for record, lease in begun])
        assert await store.partition_states("clean") == {"a": Status.SUCCESS, "b": Status.SUCCESS,
                                                          "c": Status.FAILED}
        await store.mark_stale("raw", raw.partition)
        assert [(await store.get_by_id(record.id)).status for record in ended] == [
            Status.STALE, Status.STALE, Status.FAILED]
        assert await store.partition_states("clean") == {"a": Status.STALE, "b": Status.STALE, "c": Status.FAILED}

    async def test_leases_and_their_fences_belong_to_one_tenant(self, store):
        with fs.tenant_scope("a"):
            record, lease = await store.begin("p1", 30, asset_name="x", partition="1", status=Status.RUNNING)
        with fs.tenant_scope("b"):
            _other, _ = await store.begin("p2", 30, asset_name="x", partition="1", status=Status.RUNNING)
            assert await store.renew_leases("p1", [lease.fence], 30) == set()
            with pytest.raises(fs.NotFound):
                await store.complete(record, Status.SUCCESS, lease=lease)
        with fs.tenant_scope("a"):
            assert await store.renew_leases("p1", [lease.fence], 30) == {lease.fence}
            assert (await store.get_by_id(record.id)).status is Status.RUNNING

    async def test_close_orphans_closes_every_open_record_of_that_owner_only(self, store):
        mine = [
            (await store.begin("dead:1:x", 30, asset_name=name, partition="1", status=status,
                               executor_node=f"dead:1:x/executor:{name}"))[0]
            for name, status in (("raw", Status.RUNNING), ("report", Status.PENDING))
        ]
        theirs, _ = await store.begin("dead:1:xy", 30, asset_name="other", status=Status.RUNNING,
                                      executor_node="dead:1:xy/executor:other")
        assert await store.close_orphans("dead:1:x", "orphaned: dead:1:x is gone") == 2
        assert [(await store.get_by_id(r.id)).status for r in mine] == [Status.FAILED, Status.CANCELLED]
        assert (await store.get_by_id(mine[0].id)).error_message == "orphaned: dead:1:x is gone"
        assert (await store.get_by_id(theirs.id)).status is Status.RUNNING
        await store.begin("new", 30, asset_name="raw", partition="1", status=Status.RUNNING)  # its leases are gone

    # ------------------------------------------------------- backfill owners

    def _saved(self, state="running"):
        backfill = uuid.uuid4()
        spec = BackfillSpec(
            id=backfill, asset="daily", partitions=("2025-01-01",), max_parallel=1, upstream="missing",
            force=False, io=None, context=None, tenant=fs.current_tenant(),
        )
        status = BackfillStatus(id=backfill, asset="daily", state=state, total=1, queued=1, running=0,
                                succeeded=0, failed=0, cancelled=0)
        return Saved(spec, status)

    async def test_a_backfill_with_a_live_owner_is_refused_naming_it(self, store):
        saved = self._saved()
        await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")
        with pytest.raises(fs.BackfillOwned, match="host:1:aa") as refused:
            await store.claim_backfill(saved.spec.id, "host:2:bb", stale_after=30)
        assert refused.value.owner == "host:1:aa" and refused.value.last_seen is not None
        await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")  # still its owner

    async def test_a_backfill_whose_owner_went_silent_is_taken_over_and_fences_it_out(self, store, age):
        saved = self._saved()
        await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")
        await age(31)
        claim = await store.claim_backfill(saved.spec.id, "host:2:bb", stale_after=30)
        assert claim.saved == saved and claim.previous_owner == "host:1:aa" and claim.last_seen is not None
        with pytest.raises(fs.LeaseLost):
            await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")
        await store.save_backfill(saved.spec.id, saved, owner="host:2:bb")

    async def test_a_finished_backfill_is_claimed_without_a_takeover(self, store):
        saved = self._saved("cancelled")
        await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")
        claim = await store.claim_backfill(saved.spec.id, "host:2:bb", stale_after=30)
        assert claim.previous_owner is None

    async def test_a_decision_is_kept_once_for_a_record_waiting_for_approval(self, store):
        waiting = await store.create(asset_name="publish", status=Status.WAITING_APPROVAL)
        assert await store.decision(waiting.id) is None
        assert (await store.decide(waiting.id, False, "numbers look wrong")).id == waiting.id
        assert await store.decision(waiting.id) == (False, "numbers look wrong")
        with pytest.raises(fs.InvalidTransition, match="decided already"):
            await store.decide(waiting.id, True)
        running = await store.create(asset_name="publish", status=Status.RUNNING)
        with pytest.raises(fs.InvalidTransition, match="not waiting for approval"):
            await store.decide(running.id, True)
        with fs.tenant_scope("other"):
            with pytest.raises(fs.NotFound):
                await store.decide(waiting.id, True)
            assert await store.decision(waiting.id) is None
        with pytest.raises(fs.NotFound):
            await store.decide(uuid.uuid4(), True)

    # ---------------------------------------------------------- one active daemon

    async def test_a_role_is_held_by_one_owner_until_it_expires_or_is_released(self, store, age):
        first = await store.claim_role("daemon", "a", 10)
        assert (first.owner, first.taken_from) == ("a", None) and first.expires_at.tzinfo is not None
        standby = await store.claim_role("daemon", "b", 10)
        assert (standby.owner, standby.fence) == ("a", first.fence)  # b sees who is active
        renewed = await store.claim_role("daemon", "a", 10)
        assert (renewed.owner, renewed.fence) == ("a", first.fence) and renewed.expires_at >= first.expires_at
        await age(11)  # a went quiet
        taken = await store.claim_role("daemon", "b", 10)
        assert (taken.owner, taken.taken_from) == ("b", "a") and taken.fence > first.fence
        assert (await store.claim_role("daemon", "a", 10)).owner == "b"  # a is a standby now
        await store.release_role("daemon", "a")  # not a's: nothing happens
        assert (await store.claim_role("daemon", "a", 10)).owner == "b"
        await store.release_role("daemon", "b")
        back = await store.claim_role("daemon", "a", 10)
        assert back.owner == "a" and back.fence > taken.fence and back.taken_from is None
        with pytest.raises(fs.DefinitionError):
            await store.claim_role("daemon", "a", 0)

    async def test_the_holder_of_a_role_and_its_heartbeat_are_read_without_claiming(self, store, age):
        assert await store.role_holder("daemon") is None  # never held
        first = await store.claim_role("daemon", "a", 10)
        seen = await store.role_holder("daemon")
        assert (seen.owner, seen.fence, seen.expires_at) == ("a", first.fence, first.expires_at)
        assert seen.heartbeat_at is not None and seen.heartbeat_at <= seen.expires_at
        renewed = await store.claim_role("daemon", "a", 10)
        assert (await store.role_holder("daemon")).heartbeat_at == renewed.heartbeat_at >= seen.heartbeat_at
        await age(11)  # a went quiet: still named (its hold lapsed), until someone takes it
        assert (await store.role_holder("daemon")).owner == "a"
        assert (await store.claim_role("daemon", "b", 10)).owner == "b"
        assert (await store.role_holder("daemon")).owner == "b"
        with fs.tenant_scope("other"):
            assert await store.role_holder("daemon") is None
        await store.release_role("daemon", "b")
        assert await store.role_holder("daemon") is None

    async def test_roles_belong_to_a_tenant_and_one_concurrent_claim_wins(self, store):
        await store.claim_role("daemon", "a", 30)
        with fs.tenant_scope("other"):
            assert (await store.claim_role("daemon", "b", 30)).owner == "b"
        holders = []

        async def claim(owner):
            holders.append((await store.claim_role("leader", owner, 30)).owner)

        async with anyio.create_task_group() as tasks:
            for index in range(10):
                tasks.start_soon(claim, f"p{index}")
        assert len(set(holders)) == 1  # everyone saw the same winner

    # ------------------------------------------------------------------ cursors

    async def test_a_cursor_is_kept_per_name_and_tenant_with_its_last_error(self, store):
        assert await store.load_cursor("sensor:new_files") is None
        await store.save_cursor("sensor:new_files", "s3://bucket/2026-11-30/0007.csv")
        saved = await store.load_cursor("sensor:new_files")
        assert (saved.name, saved.value, saved.error) == ("sensor:new_files", "s3://bucket/2026-11-30/0007.csv", None)
        assert saved.updated_at is not None and saved.updated_at.tzinfo is not None
        await store.save_cursor("sensor:new_files", saved.value, error="ConnectionError: bucket unreachable")
        failed = await store.load_cursor("sensor:new_files")
        assert (failed.value, failed.error) == (saved.value, "ConnectionError: bucket unreachable")
        await store.save_cursor("automation:report", None)
        assert [c.name for c in await store.list_cursors()] == ["automation:report", "sensor:new_files"]
        with fs.tenant_scope("other"):
            assert await store.load_cursor("sensor:new_files") is None and await store.list_cursors() == []

    @pytest.mark.parametrize("name, value", [
        ("", "x"), ("bad\nname", "x"), ("ok", 42), ("ok", "nul\x00inside"), ("ok", "x" * 1_000_001),
    ])
    async def test_a_cursor_that_cannot_be_kept_is_refused_and_the_old_one_stays(self, store, name, value):
        await store.save_cursor("ok", "kept")
        with pytest.raises(fs.DefinitionError):
            await store.save_cursor(name, value)
        assert (await store.load_cursor("ok")).value == "kept"

    # ------------------------------------------------------------ schedule ticks

    async def test_unfinished_ticks_are_those_claimed_and_not_ended_oldest_first(self, store):
        first = datetime(2026, 11, 1, 5, 0, tzinfo=timezone.utc)
        for minute in range(4):
            assert await store.claim_tick("every minute", first + timedelta(minutes=minute), "dead")
        assert await store.claim_tick("nightly", first + timedelta(seconds=30), "dead")
        await store.finish_tick("every minute", first, "succeeded")
        await store.finish_tick("every minute", first + timedelta(minutes=2), "cancelled")
        left = await store.unfinished_ticks()
        assert [(t.schedule, t.at, t.owner, t.state) for t in left] == [
            ("nightly", first + timedelta(seconds=30), "dead", "running"),
            ("every minute", first + timedelta(minutes=1), "dead", "running"),
            ("every minute", first + timedelta(minutes=3), "dead", "running"),
        ]
        assert len(await store.unfinished_ticks(limit=1)) == 1
        with fs.tenant_scope("other"):
            assert await store.unfinished_ticks() == []

    async def test_prune_finished_deletes_old_finished_backfills_and_ticks_but_no_schedules_newest(self, store):
        done, running = self._saved("succeeded"), self._saved()
        for saved in (done, running):
            await store.save_backfill(saved.spec.id, saved)
        with fs.tenant_scope("other"):
            theirs = self._saved("failed")
            await store.save_backfill(theirs.spec.id, theirs)
        first = datetime(2026, 11, 1, 5, 0, tzinfo=timezone.utc)
        minutes = [first + timedelta(minutes=minute) for minute in range(4)]
        for at in minutes:
            assert await store.claim_tick("every minute", at, "daemon")
        for at in (minutes[0], minutes[1], minutes[3]):  # minutes[2] is still running
            await store.finish_tick("every minute", at, "succeeded")
        assert await store.claim_tick("nightly", first, "daemon")
        await store.finish_tick("nightly", first, "failed")

        assert await store.prune_finished(first) == 0  # nothing is that old
        later = datetime.now(timezone.utc) + timedelta(days=1)
        assert await store.prune_finished(later, limit=2) == 2
        assert await store.prune_finished(later) == 1
        assert await store.prune_finished(later) == 0

        assert await store.load_backfill(done.spec.id) is None
        assert await store.load_backfill(running.spec.id) == running
        assert [t.at for t in await store.unfinished_ticks()] == [minutes[2]]
        last = await store.last_ticks()
        assert (last["every minute"].at, last["nightly"].at) == (minutes[3], first)
        assert not await store.claim_tick("every minute", minutes[3], "daemon")  # the newest still says it ran
        with fs.tenant_scope("other"):
            assert await store.load_backfill(theirs.spec.id) == theirs
        with pytest.raises(fs.DefinitionError):
            await store.prune_finished(datetime(2026, 11, 1))  # naive: which zone?
        with pytest.raises(fs.DefinitionError):
            await store.prune_finished(later, limit=0)

    async def test_a_tick_is_claimed_once_and_its_end_recorded(self, store):
        at = datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc)
        assert await store.claim_tick("nightly", at, "daemon-a")
        assert not await store.claim_tick("nightly", at, "daemon-a")  # a restart: not again
        assert not await store.claim_tick("nightly", at.astimezone(timezone(timedelta(hours=-4))), "daemon-b")
        run = uuid.uuid4()
        await store.finish_tick("nightly", at, "succeeded", run_id=run)
        [(name, tick)] = (await store.last_ticks()).items()
        assert (name, tick.at, tick.owner, tick.state, tick.run_id) == ("nightly", at, "daemon-a", "succeeded", run)
        assert tick.finished_at is not None and tick.claimed_at is not None
        with pytest.raises(fs.NotFound):
            await store.finish_tick("nightly", at + timedelta(days=1), "failed")
        with pytest.raises(fs.DefinitionError):
            await store.finish_tick("nightly", at, "running")
        with pytest.raises(fs.DefinitionError):
            await store.claim_tick("nightly", datetime(2026, 11, 1, 5, 30), "daemon-a")  # naive

    async def test_last_ticks_are_the_newest_per_schedule_and_per_tenant(self, store):
        day = datetime(2026, 1, 1, 6, tzinfo=timezone.utc)
        for offset in (0, 2, 1):
            await store.claim_tick("daily", day + timedelta(days=offset), "d")
        await store.claim_tick("hourly", day, "d")
        await store.finish_tick("daily", day + timedelta(days=1), "failed", error="boom")
        last = await store.last_ticks()
        assert {name: t.at for name, t in last.items()} == {"daily": day + timedelta(days=2), "hourly": day}
        assert last["daily"].state == "running"
        with fs.tenant_scope("other"):
            assert await store.last_ticks() == {}
            assert await store.claim_tick("daily", day, "d")  # another tenant's series

    async def test_concurrent_claims_of_one_tick_grant_exactly_one(self, store):
        at = datetime(2026, 1, 1, 6, tzinfo=timezone.utc)
        won = []

        async def claim(owner):
            if await store.claim_tick("daily", at, owner):
                won.append(owner)

        async with anyio.create_task_group() as tasks:
            for index in range(20):
                tasks.start_soon(claim, f"d{index}")
        assert len(won) == 1

    async def test_a_cancel_request_stops_the_owners_next_running_save_only(self, store):
        saved = self._saved()
        await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")
        assert (await store.request_cancel(saved.spec.id)).spec.id == saved.spec.id
        with pytest.raises(CancelRequested):
            await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")  # a checkpoint: stop
        assert (await store.load_backfill(saved.spec.id)).status.state == "running"  # nothing saved
        done = Saved(saved.spec, attrs.evolve(saved.status, state="cancelled", queued=0, cancelled=1))
        await store.save_backfill(saved.spec.id, done, owner="host:1:aa")  # the final save is kept
        assert (await store.load_backfill(saved.spec.id)).status.state == "cancelled"

    async def test_a_cancel_request_leaves_a_finished_backfill_alone_and_is_tenant_scoped(self, store):
        with fs.tenant_scope("a"):
            finished = self._saved("succeeded")
            await store.save_backfill(finished.spec.id, finished, owner="host:1:aa")
            assert (await store.request_cancel(finished.spec.id)).status.state == "succeeded"
            resumed = Saved(finished.spec, attrs.evolve(finished.status, state="running"))
            await store.save_backfill(finished.spec.id, resumed, owner="host:1:aa")  # no request was left behind
        with fs.tenant_scope("b"), pytest.raises(fs.BackfillNotFound):
            await store.request_cancel(finished.spec.id)
        with pytest.raises(fs.BackfillNotFound):
            await store.request_cancel(uuid.uuid4())

    async def test_backfills_are_invisible_to_other_tenants(self, store):
        with fs.tenant_scope("a"):
            saved = self._saved()
            await store.save_backfill(saved.spec.id, saved, owner="host:1:aa")
        with fs.tenant_scope("b"):
            assert await store.load_backfill(saved.spec.id) is None
            with pytest.raises(fs.BackfillNotFound):
                await store.claim_backfill(saved.spec.id, "host:2:bb", stale_after=0)

    # ------------------------------------------------------------ ids by tenant

    async def test_complete_writes_only_records_of_the_callers_tenant(self, store):
        with fs.tenant_scope("a"):
            record = await store.create(asset_name="orders", status=Status.RUNNING)
        with fs.tenant_scope("b"):
            with pytest.raises(fs.NotFound):
                await store.complete(record, Status.SUCCESS)
        with fs.tenant_scope("a"):
            assert (await store.get_by_id(record.id)).status is Status.RUNNING

    async def test_create_with_an_id_in_use_is_refused_whoever_uses_it(self, store):
        with fs.tenant_scope("a"):
            record = await store.create(asset_name="orders", status=Status.RUNNING)
        for tenant in ("a", "b"):
            with fs.tenant_scope(tenant), pytest.raises(fs.DefinitionError, match="already exists"):
                await store.create(id=record.id, asset_name="stolen", status=Status.SUCCESS)
        with fs.tenant_scope("a"):
            kept = await store.get_by_id(record.id)
            assert (kept.asset_name, kept.status) == ("orders", Status.RUNNING)


class _no_tenant:
    def __enter__(self):
        assert fs.current_tenant() is None

    def __exit__(self, *exc):
        return None


class DatabaseContract:
    """What the stores kept in a database (SQLite, PostgreSQL) refuse, beside the rest."""

    async def test_a_backfills_checkpoints_write_its_status_and_its_spec_once(self, store, tamper_backfill):
        """A running backfill saves itself every few seconds. Its spec lists every
        partition it was given (13 MB of JSON for a million), and never changes: the
        first save writes it, a checkpoint of the same backfill its status alone.
        Shown by changing the stored spec behind the store's back (``tamper_backfill``):
        a checkpoint leaves the change, a new spec (a resumed backfill's) replaces it,
        and a row that is gone is written whole again."""
        backfill = uuid.uuid4()
        spec = BackfillSpec(
            id=backfill, asset="daily", partitions=("2025-01-01", "2025-01-02"), max_parallel=4,
            upstream="missing", force=False, io=None, context={"who": "me"}, tenant=None,
        )
        running = BackfillStatus(id=backfill, asset="daily", state="running", total=2, queued=2, running=0,
                                 succeeded=0, failed=0, cancelled=0)
        await store.save_backfill(backfill, Saved(spec, running), owner="me")
        await tamper_backfill(backfill, max_parallel=9)
        later = attrs.evolve(running, queued=0, running=1, succeeded=1)
        await store.save_backfill(backfill, Saved(spec, later), owner="me")
        kept = await store.load_backfill(backfill)
        assert kept.status == later and kept.spec.max_parallel == 9  # the status saved; the spec not written again
        resumed = attrs.evolve(spec, context={"who": "you"})
        await store.save_backfill(backfill, Saved(resumed, later), owner="me")
        assert await store.load_backfill(backfill) == Saved(resumed, later)
        await tamper_backfill(backfill, drop=True)
        await store.save_backfill(backfill, Saved(resumed, running), owner="me")
        assert await store.load_backfill(backfill) == Saved(resumed, running)
        with pytest.raises(fs.LeaseLost):  # a checkpoint is refused on the same terms as a first save
            await store.save_backfill(backfill, Saved(resumed, later), owner="someone else")

    async def test_backfill_statuses_are_listed_without_reading_specs(self, store, tamper_backfill):
        """What the daemon, the web view and ``flowstone backfills`` list every few
        seconds: statuses, from the status alone. Shown with a spec broken behind the
        store's back: listing whole backfills fails on it, listing statuses does not."""
        backfill = uuid.uuid4()
        spec = BackfillSpec(id=backfill, asset="daily", partitions=("2025-01-01",), max_parallel=1,
                            upstream="missing", force=False, io=None, context=None, tenant=None)
        status = BackfillStatus(id=backfill, asset="daily", state="running", total=1, queued=1, running=0,
                                succeeded=0, failed=0, cancelled=0)
        await store.save_backfill(backfill, Saved(spec, status), owner="me")
        await tamper_backfill(backfill, unreadable=True)
        with pytest.raises(KeyError):
            await store.list_backfills()
        assert await store.list_backfill_statuses() == [status]
        assert await store.load_backfill_status(backfill) == status  # what a progress view polls

    async def test_a_job_a_batch_cannot_store_is_refused_alone(self, store):
        """A value no database holds (a NUL in a key, metadata that is not JSON) fails its
        own job in begin_many / complete_many; the others are written."""
        begun = await store.begin_many("p1", 30, [
            Start({"asset_name": "a", "partition": "1", "status": Status.RUNNING}),
            Start({"asset_name": "a", "partition": "nul\x00key", "status": Status.RUNNING}),
            Start({"asset_name": "a", "partition": "3", "status": Status.RUNNING}),
        ])
        assert isinstance(begun[1], fs.SerializationError)
        (one, one_lease), (three, three_lease) = begun[0], begun[2]
        ended = await store.complete_many([
            End(one, Status.SUCCESS, one_lease, {"metadata": {"when": date(2025, 1, 1)}}),
            End(three, Status.SUCCESS, three_lease, {"metadata": {"rows": 3}}),
        ])
        assert isinstance(ended[0], fs.SerializationError)
        assert ended[1].status is Status.SUCCESS
        assert (await store.get_by_id(one.id)).status is Status.RUNNING  # nothing written for it
        assert (await store.get_by_id(three.id)).metadata == {"rows": 3}
