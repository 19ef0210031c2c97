"""The memory store passes the store contract (tests/contracts/store.py)."""

from datetime import datetime, timedelta, timezone

import anyio
import attrs
import pytest
from contracts.store import LeaseContract, StoreContract, kinds, pruned_history

import flowstone as fs

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


async def test_a_batch_write_the_store_refuses_does_not_drop_the_others(anyio_backend):
    """A batch's records reach the actor as one message; one it refuses (an id
    already taken, the caller's to choose) is that begin's answer, and the rest are stored."""
    from flowstone.store.leases import Start

    async with fs.store.MemoryStore() as store:
        taken = await store.create(asset_name="orders")
        begun = await store.begin_many("p1", 30, [
            Start({"asset_name": "orders", "partition": "1", "status": fs.Status.RUNNING, "id": taken.id}),
            Start({"asset_name": "orders", "partition": "2", "status": fs.Status.RUNNING}),
        ])
        assert isinstance(begun[0], fs.DefinitionError) and "already exists" in str(begun[0])
        second, _lease = begun[1]
        assert (await store.get_by_id(second.id)).partition == "2"
        assert (await store.get_by_id(taken.id)).partition is None  # not overwritten


async def test_a_write_is_handled_in_place_only_when_it_overtakes_no_other_write(anyio_backend):
    """A cast while no other cast is queued or on its way to the actor is the
    actor's next write, so the client handles it itself; behind a queued cast, it
    is queued too, as any cast. A queued call is overtaken, as if posted later."""
    from flowstone.store import memory_actor as m

    async with fs.store.MemoryStore() as store:
        await store.list_all()
        door = store.handle.shared
        assert door.idle()
        first = await store.create(asset_name="orders")
        assert first.id.int in store._data.records  # stored without an event-loop turn
        pending = await store.handle.request(m.ByStatus, tenant=None, status=fs.Status.PENDING, limit=10)
        second = await store.create(asset_name="orders")  # overtakes the call, posted before it
        assert second.id.int in store._data.records
        assert [r.id for r in await pending.result()] == [second.id, first.id]
        assert store.handle.try_cast(m.Create(record=_finished({"asset_name": "orders", "status": fs.Status.SUCCESS})))
        assert not door.idle()  # a cast is queued
        third = await store.create(asset_name="orders")
        assert third.id.int not in store._data.records  # queued behind it, not ahead
        assert len(await store.list_all()) == 4  # the actor took both, in order
        assert third.id.int in store._data.records and door.idle()


async def test_a_bug_in_a_write_handled_in_place_restarts_the_actor_and_keeps_the_data(anyio_backend, caplog,
                                                                                      monkeypatch):
    from flowstone.store import memory_actor as m

    async with fs.store.MemoryStore() as store:
        kept = await store.create(asset_name="orders")
        await store.list_all()

        def broken(message):
            raise KeyError("a bug")

        monkeypatch.setitem(store.handle.shared.dispatch, m.PutValue, broken)
        await store._cast(m.PutValue(tenant=None, asset="orders", partition=None, value=1))
        assert "restarting the actor" in caplog.text
        monkeypatch.undo()
        with anyio.fail_after(5):
            assert (await store.get_by_id(kept.id)).id == kept.id  # the restarted actor has the data


def _finished(fields):
    from flowstone.store.records import new_record

    return new_record(fields, fields.pop("tenant", None), datetime.now(timezone.utc))


def _packing():
    """Records that pack a finished record at once (the store waits for 1,024 newer)."""
    from flowstone.store.memory_actor import Records

    class Packing(Records):
        __slots__ = ()
        RECENT = 0

    return Packing()


@pytest.mark.parametrize("fields", [
    {"asset_name": "a", "partition": "2024-01-01", "status": fs.Status.SUCCESS},
    {"asset_name": "a", "status": fs.Status.FAILED, "error_message": "boom", "error_traceback": "Traceback ...",
     "metadata": {"rows": 3, "ok": True, "ratio": 1.0, "nested": {"list": [1, 2], "tuple": (1, "x")}}},
    {"asset_name": "b", "partition": "", "status": fs.Status.STALE, "upstream_assets": ("a", "c"),
     "upstream_partitions": {"a": ("2024-01-01", "2024-01-02"), "c": (None,)}, "dependency_hash": "h",
     "started_at": datetime(1901, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc), "duration_ms": 1.5, "tenant": "acme"},
])
def test_a_finished_record_is_kept_packed_and_reads_back_the_same(fields):
    """Finished records are kept as bytes the garbage collector never walks (at
    1,000,000 stored records, walking them was a third of each partition's time); each
    reads back equal, field by field and type, its times to the microsecond."""
    import gc

    record = _finished(fields)
    records = _packing()
    records.put(record)
    back = records[record.id.int]
    assert back == record and back is not record
    for name in ("id", "run_id", "status", "metadata", "upstream_partitions", "upstream_assets", "started_at"):
        assert type(getattr(back, name)) is type(getattr(record, name)), name
    assert (back.metadata, back.upstream_partitions, back.started_at) == (
        record.metadata, record.upstream_partitions, record.started_at)
    assert list(records._live) == [] and not gc.is_tracked(records._packed)
    assert records.asset_of(record.id.int) == record.asset_name  # read from the bytes, the record not built
    assert records.brief(record.id.int) == (record.asset_name, record.partition, record.status, record.inserted_at)


@pytest.mark.parametrize("fields", [
    {"asset_name": "a"},
    {"asset_name": "a", "partition": "2024-01-01", "status": fs.Status.SUCCESS, "metadata": {"rows": 3}},
    {"asset_name": "b", "status": fs.Status.STALE, "upstream_assets": ["a"], "upstream_partitions": {"a": ["x"]},
     "dependency_hash": "h", "duration_ms": 1.5, "error_message": "boom", "executor_node": "n/b", "tenant": "acme"},
])
def test_records_built_from_their_values_are_those_attrs_builds(fields):
    """The hot paths build records positionally (``build``), each slot set through its
    descriptor; the record is the one ``Materialization(...)`` builds from the same
    fields: defaults, read-only mappings and all."""
    from types import MappingProxyType

    from flowstone.store.records import FIELDS, POSITION, Materialization, build, values_of

    record = _finished(dict(fields))
    given = dict(zip(FIELDS, values_of(record), strict=True))
    by_attrs = Materialization(**{**given, "metadata": dict(record.metadata),
                                  "upstream_partitions": dict(record.upstream_partitions)})
    values = list(values_of(by_attrs))
    values[POSITION["metadata"]] = {"rows": 3}
    rebuilt = build(values)
    assert record == by_attrs and values_of(record) == values_of(by_attrs)
    assert type(record.metadata) is type(record.upstream_partitions) is MappingProxyType
    assert record.upstream_assets == tuple(fields.get("upstream_assets", ()))
    assert rebuilt.metadata == {"rows": 3} and type(rebuilt.metadata) is MappingProxyType
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        record.status = fs.Status.FAILED


@pytest.mark.parametrize("fields", [
    {"asset_name": "a", "status": fs.Status.RUNNING},  # still moving
    {"asset_name": "a", "status": fs.Status.SUCCESS, "started_at": datetime(2024, 1, 1)},  # a naive time
    {"asset_name": "a", "status": fs.Status.SUCCESS, "metadata": {"kind": fs.Status.SUCCESS}},  # not plain data
])
def test_a_record_that_is_moving_or_cannot_be_packed_exactly_is_kept_as_it_is(fields):
    record = _finished(fields)
    records = _packing()
    records.put(record)
    assert records[record.id.int] is record and record.id.int in records
    del records[record.id.int]
    assert record.id.int not in records and records.get(record.id.int) is None


def test_the_newest_finished_records_are_kept_as_they_are_and_the_older_packed_in_order():
    """A short run (a chain of assets) packs nothing; in a long one each finished
    record is packed once, when ``RECENT`` newer ones came after it."""
    from flowstone.store.memory_actor import Records
    from flowstone.store.records import evolve

    made = [_finished({"asset_name": "a", "partition": str(i), "status": fs.Status.SUCCESS})
            for i in range(Records.RECENT + 2)]
    records = Records()
    for record in made:
        records.put(record)
    assert sorted(records._packed) == sorted(r.id.int for r in made[:2])
    assert all(records[r.id.int] is r for r in made[2:]) and records[made[0].id.int] == made[0]
    moved = evolve(made[0], status=fs.Status.SUPERSEDED)
    records.put(moved)  # a packed record moved again is kept as it is, the newest
    assert records[moved.id.int] is moved and moved.id.int not in records._packed
    assert made[2].id.int in records._packed  # and the oldest kept one is packed in its place


@pytest.mark.parametrize("packed", [False, True])
async def test_retention_reads_packed_history_records_as_it_reads_live_ones(anyio_backend, packed):
    """Retention reads each history record's partition, status and time without
    building it back when it is packed (``Records.brief``): the same records go."""
    from flowstone.store.memory_actor import MemoryData

    data = MemoryData(records=_packing()) if packed else MemoryData()
    async with fs.store.MemoryStore(data=data) as store:
        for attempt in range(3):  # a/1 succeeds three times; a/2 succeeds, fails, succeeds
            for key in ("1", "2"):
                record = await store.create(asset_name="a", partition=key, status=fs.Status.RUNNING)
                failed = attempt == 1 and key == "2"
                await store.complete(record, fs.Status.FAILED if failed else fs.Status.SUCCESS)
        assert bool(data.records._packed) is packed

        def history():
            return sorted((r.partition, r.status.value) for r in records if r.status is not fs.Status.SUCCESS)

        records = await store.list_all(limit=100)
        assert history() == [("1", "superseded"), ("1", "superseded"), ("2", "failed"), ("2", "superseded")]
        assert await store.prune("a", keep_last=1) == 2  # the older of each partition's two
        records = await store.list_all(limit=100)
        assert history() == [("1", "superseded"), ("2", "failed")]
        assert await store.prune("a", before=datetime.now(timezone.utc) + timedelta(seconds=1)) == 2
        records = await store.list_all(limit=100)
        assert history() == [] and len(records) == 2


async def test_a_retention_deleted_a_limit_at_a_time_deletes_what_one_call_would(anyio_backend, monkeypatch):
    """Retention calls ``prune`` until fewer than its limit go; the store chooses once
    and deletes the rest of its choice at the next calls with the same arguments.
    Writes between the calls (new history, another asset's prune) change nothing of
    what goes, and the latest record of each partition stays."""

    async with fs.store.MemoryStore() as whole, fs.store.MemoryStore() as parts:
        await pruned_history(whole)
        await pruned_history(parts)
        assert await whole.prune("a", keep_last=1) == 10
        from flowstone.store.memory_actor import Records

        reads, brief = [], Records.brief
        monkeypatch.setattr(Records, "brief", lambda self, key: reads.append(key) or brief(self, key))
        counts = [await parts.prune("a", keep_last=1, limit=3)]
        assert len(reads) == 21  # every history record of the tenant once, grouped by asset
        record = await parts.create(asset_name="a", partition="0", status=fs.Status.RUNNING)
        await parts.complete(record, fs.Status.SUCCESS)  # one more superseded record of a/0, after the choice
        counts.append(await parts.prune("a", keep_last=1, limit=3))
        assert len(reads) == 21  # the rest of the choice: nothing read again
        assert await parts.prune("b", keep_last=1, limit=3) == 3  # another choice in between...
        assert len(reads) == 21 + 6  # ...from the same walk's groups: b's history read again, no other
        while counts[-1] == 3:
            counts.append(await parts.prune("a", keep_last=1, limit=3))
        assert counts == [3, 3, 3, 2]  # ...so a's was made again, with the new record: 11 in all
        record = await whole.create(asset_name="a", partition="0", status=fs.Status.RUNNING)
        await whole.complete(record, fs.Status.SUCCESS)
        assert await whole.prune("a", keep_last=1) == 1
        assert await whole.prune("b", keep_last=1) == 3
        assert kinds(await parts.list_all(limit=1000)) == kinds(await whole.list_all(limit=1000))
        states = await parts.partition_states("a")
        assert states == {"0": fs.Status.SUCCESS, "1": fs.Status.SUCCESS, "2": fs.Status.SUCCESS,
                          "3": fs.Status.SUCCESS, "4": fs.Status.FAILED}


async def test_a_backfill_leaves_the_collector_almost_nothing_to_walk_per_record(anyio_backend):
    """What the store keeps per partition (its records, their indexes, the values) is
    plain data in containers no new tuple enters: nothing the garbage collector must
    walk at each full collection. (Kept as objects, it was three per partition.)"""
    import gc
    from datetime import date, timedelta

    asset = fs.Asset(name="daily", execute_fn=lambda ctx, deps: 1,
                     partitioned_by=fs.DailyPartitions(start=date(2000, 1, 1)))
    days = [date(2000, 1, 1) + timedelta(days=i) for i in range(3_100)]
    async with fs.open_runtime([asset]) as rt:
        # First fill what is bounded: the leases keep the last 1,024 successes (so
        # that a success still queued for the actor is known to the next begin).
        await rt.wait_backfill(await rt.backfill("daily", partitions=days[:1_100]))
        gc.collect()
        before = len(gc.get_objects())
        status = await rt.wait_backfill(await rt.backfill("daily", partitions=days[1_100:]))
        gc.collect()
        grown = len(gc.get_objects()) - before
        assert status.succeeded == 2_000 and len(await rt.store.partition_states("daily")) == 3_100
    assert grown < 200, f"{grown} more tracked objects after 2,000 more partitions"
