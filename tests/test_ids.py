"""Record and run ids: random version-4 UUIDs, never the same twice, not even across a fork."""

from __future__ import annotations

import multiprocessing
import uuid

from flowstone.plumbing.ids import new_uuid


def test_ids_are_version_4_uuids_like_uuid4_makes():
    for made in (new_uuid() for _ in range(2000)):
        assert made.version == 4 and made.variant == uuid.RFC_4122
        again = uuid.UUID(str(made))
        assert again == made and hash(again) == hash(made) and made.is_safe is uuid.SafeUUID.unknown


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
