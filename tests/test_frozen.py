"""``builder``: frozen attrs objects made without attrs' ``__init__`` are the same objects."""

from __future__ import annotations

import copy
import pickle
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstone.context import Context
from flowstone.plumbing.frozen import builder, tuple_maker
from flowstone.plumbing.ids import new_uuid
from flowstone.runtime.executor import JobResult, new_job_result
from flowstone.runtime.run import RunResult
from flowstone.store import memory_actor as m
from flowstone.store.records import FIELDS, Materialization, Status, build


@attrs.frozen
class _Base:
    first: int


@attrs.frozen
class _Derived(_Base):
    second: Any = attrs.field(default=(), converter=tuple)


@given(st.integers(), st.lists(st.integers()))
def test_a_built_object_equals_the_one_its_class_makes(first: int, second: list[int]) -> None:
    built = builder(_Derived)(first, second)
    assert built == _Derived(first, second)
    assert type(built) is _Derived and built.second == tuple(second)  # the converter applied, as attrs applies it


def test_a_built_object_is_frozen_like_any_other() -> None:
    built = builder(_Derived)(1, [2])
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.first = 3  # type: ignore[misc]


def test_the_messages_and_results_a_job_makes_equal_their_classes_own() -> None:
    record = Materialization(id=new_uuid(), asset_name="a", partition=None, run_id=new_uuid(), status=Status.RUNNING)
    assert m.make_replace(None, record, Status.RUNNING, None) == m.Replace(record=record, expected=Status.RUNNING)
    assert m.make_create(None, record, None, True) == m.Create(record=record, fresh=True)
    assert m.make_put_value(None, "t", "a", "2024-01-01", 5) == m.PutValue(
        tenant="t", asset="a", partition="2024-01-01", value=5)
    assert builder(RunResult)(record.run_id, {"a": record}, ()) == RunResult(run_id=record.run_id,
                                                                               materializations={"a": record})


def test_a_record_built_from_its_values_equals_the_constructors() -> None:
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    made = Materialization(
        id=new_uuid(), asset_name="a", partition="p", run_id=new_uuid(), status=Status.SUCCESS, started_at=now,
        upstream_partitions={"up": ("p",)}, metadata={"rows": 3}, tenant_id="t",
    )
    again = build([getattr(made, name) for name in FIELDS])
    assert again == made
    assert type(again.metadata) is MappingProxyType and type(again.upstream_partitions) is MappingProxyType


def test_a_context_built_for_a_job_has_every_field() -> None:
    import logging

    log = logging.getLogger("flowstone.asset.a")
    asset: Any = object()
    built = builder(Context)(asset, None, None, new_uuid(), None, log, {}, {})
    assert built.metadata == {} and built.resources == {} and built.log is log and built.asset is asset


def test_a_class_the_builder_would_get_wrong_is_refused() -> None:
    @attrs.frozen
    class Checked:
        value: int = attrs.field(validator=attrs.validators.instance_of(int))

    @attrs.frozen
    class AfterInit:
        value: int

        def __attrs_post_init__(self) -> None:
            pass

    @attrs.frozen(slots=False)
    class Unslotted:
        value: int

    for cls in (Checked, AfterInit, Unslotted):
        with pytest.raises(TypeError):
            builder(cls)


def test_a_class_with_a_weakref_slot_beside_its_fields_is_refused_and_the_built_classes_have_none() -> None:
    # The builder fills an object of the class's layout and then assigns its class,
    # which CPython refuses when the class declares __weakref__ with its own slots.
    with pytest.raises(TypeError, match="weakref_slot=False"):
        builder(_Base)
    for cls in (Materialization, Context, RunResult):
        assert "__weakref__" not in cls.__dict__["__slots__"]
    built = builder(_Derived)(1, [2])  # a weakref in the base class is fine
    assert type(built) is _Derived and built.second == (2,)


def test_a_named_tuple_made_from_its_fields_is_the_one_its_class_makes() -> None:
    record = Materialization(id=new_uuid(), asset_name="a", partition=None, run_id=new_uuid(), status=Status.SUCCESS)
    made = new_job_result((record, None, 3, True, False))
    assert made == JobResult(record, value=3, has_value=True) and type(made) is JobResult
    assert made.value == 3 and made._replace(value=4).value == 4
    assert tuple_maker(JobResult)((record, None, None, False, True)).reused is True


@given(st.dictionaries(st.text(max_size=5), st.lists(st.integers(), max_size=3), max_size=3))
def test_a_record_survives_pickling_and_deep_copies_with_its_mappings_read_only(metadata: dict[str, Any]) -> None:
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    record = Materialization(
        new_uuid(), "report", "2026-01-01", new_uuid(), Status.SUCCESS, now, now, 1.5, ("events",),
        {"events": ("2026-01-01", "2026-01-02")}, "0" * 64, metadata, None, "here", "t1", now, now, None,
    )
    for again in (pickle.loads(pickle.dumps(record)), copy.deepcopy(record), copy.copy(record)):
        assert again == record and type(again) is Materialization
        assert dict(again.metadata) == metadata and dict(again.upstream_partitions) == {
            "events": ("2026-01-01", "2026-01-02")}
        assert type(again.metadata) is MappingProxyType and type(again.upstream_partitions) is MappingProxyType
    deep = copy.deepcopy(record)
    for name, values in metadata.items():  # a deep copy shares no mutable value with the record
        assert deep.metadata[name] == values and deep.metadata[name] is not values
