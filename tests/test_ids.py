"""Record and run ids: time-ordered version-7 UUIDs, in the order they were made, never
the same twice, not even across a fork."""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import threading
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstone.plumbing.ids import new_uuid, uuid_of


def test_ids_are_version_7_uuids_that_start_with_the_time_they_were_made():
    before = time.time_ns() // 1_000_000
    made = [new_uuid() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    for one in made:
        assert one.version == 7 and one.variant == uuid.RFC_4122
        again = uuid.UUID(str(one))
        assert again == one and hash(again) == hash(one) and one.is_safe is uuid.SafeUUID.unknown
    # 2,000 ids may borrow a millisecond or two ahead, never more than one per 4,096 ids
    assert before <= made[0].int >> 80 and made[-1].int >> 80 <= after + 1


def test_ids_sort_in_the_order_they_were_made_even_many_in_one_millisecond():
    made = [new_uuid() for _ in range(20_000)]  # several thousand per millisecond here
    assert sorted(made) == made
    assert sorted(str(one) for one in made) == [str(one) for one in made]  # as text, as the stores index them


def test_ids_are_unique_within_a_process():
    assert len({new_uuid() for _ in range(50_000)}) == 50_000


def _ids(queue) -> None:
    queue.put([new_uuid().hex for _ in range(64)])


def test_a_forked_child_does_not_repeat_its_parents_ids():
    new_uuid()  # the parent's buffer holds unused bytes when it forks
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_ids, args=(queue,))
    child.start()
    theirs = queue.get(timeout=30)
    child.join(timeout=30)
    ours = [new_uuid().hex for _ in range(64)]
    assert child.exitcode == 0
    assert not set(theirs) & set(ours)


def test_a_threads_first_ids_carry_random_bits_as_every_later_one_does():
    """A thread (or a process) starts with no random bytes: its very first ids draw
    them too, so two processes starting in the same millisecond never make one id."""
    made: list[uuid.UUID] = []
    worker = threading.Thread(target=lambda: made.extend(new_uuid() for _ in range(300)))
    worker.start()
    worker.join(timeout=30)
    randoms = [one.int & ((1 << 62) - 1) for one in made]  # the 62 random bits of each
    assert len(randoms) == 300 and len(set(randoms)) == 300


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_a_uuid_made_from_its_integer_is_a_plain_immutable_uuid(value: int) -> None:
    made = uuid_of(value)
    assert type(made) is uuid.UUID and made == uuid.UUID(int=value) and hash(made) == hash(uuid.UUID(int=value))
    assert str(made) == str(uuid.UUID(int=value)) and made.is_safe is uuid.SafeUUID.unknown
    assert pickle.loads(pickle.dumps(made)) == made and copy.deepcopy(made) == made
    with pytest.raises(TypeError):
        made.int = 0  # type: ignore[misc]
