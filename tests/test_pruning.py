"""A retention pass's choice, kept between a SQL store's ``prune`` calls."""

from __future__ import annotations

import pytest

import flowstone as fs
from flowstone.store import SqliteStore, Status
from flowstone.store.pruning import Choice, prune_key

KEY = prune_key(None, "a", 1, None, ())


def test_a_choice_is_handed_out_a_limit_at_a_time_for_its_own_key():
    choice = Choice()
    assert choice.take(KEY, 3) is None  # nothing chosen yet: choose
    assert choice.keep(KEY, [1, 2, 3, 4, 5, 6, 7], 3) == [1, 2, 3]
    assert choice.take(prune_key(None, "b", 1, None, ()), 3) is None  # another asset's: choose for it
    assert choice.take(prune_key("t", "a", 1, None, ()), 3) is None  # another tenant's
    assert choice.take(prune_key(None, "a", 1, None, ["1"]), 3) is None  # other records spared
    assert choice.take(KEY, 3) == [4, 5, 6]
    assert choice.take(KEY, 3) == [7]  # fewer than the limit: the pass ends here
    assert choice.take(KEY, 3) is None  # used up: the next pass chooses again
    assert choice.keep(KEY, [], 3) == []


def test_a_choice_cut_at_its_most_is_chosen_again_before_it_runs_short():
    choice = Choice(most=4)
    assert choice.keep(KEY, [1, 2, 3, 4], 3) == [1, 2, 3]  # cut: there may be more past 4
    assert choice.take(KEY, 3) is None  # one left, fewer than the limit: choose again (4 and what follows)
    assert choice.keep(KEY, [4, 5, 6], 3) == [4, 5, 6]  # whole (fewer than most)
    assert choice.take(KEY, 3) is None
    assert Choice(most=2).keep(KEY, [1, 2], 3) == [1, 2]  # a limit above most: all of the choice at once


def test_spared_partitions_are_one_key_whatever_their_order():
    assert prune_key(None, "a", 1, None, ["1", None, "2"]) == prune_key(None, "a", 1, None, ("2", "1", None))


async def _history(store, partitions: int, attempts: int) -> None:
    for _ in range(attempts):
        for key in map(str, range(partitions)):
            record = await store.create(asset_name="a", partition=key, status=Status.RUNNING)
            await store.complete(record, Status.SUCCESS)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_stores_share_a_pass_and_a_cut_choice_goes_on(anyio_backend, tmp_path):
    """Two stores on one file (two processes' worth): what one deletes out of the
    other's choice is not counted twice, and the other chooses anew; a choice cut at
    its most goes on past the cut. Every history record goes once, no current one."""
    path = tmp_path / "flowstone.db"
    async with SqliteStore(path) as one, SqliteStore(path) as other:
        await _history(one, partitions=4, attempts=5)  # 16 superseded, 4 current
        assert await one.prune("a", keep_last=0, limit=3) == 3  # chose all 16, deleted the 3 oldest
        assert await other.prune("a", keep_last=0, limit=4) == 4  # chose the 13 left, deleted 4
        assert await one.prune("a", keep_last=0, limit=3) == 0  # its next 3 were gone: its pass ends
        one._pruning.most = 4
        assert await one.prune("a", keep_last=0, limit=3) == 3  # chosen anew: the 4 oldest left (cut)
        counts = [await one.prune("a", keep_last=0, limit=3)]  # 1 left of a cut choice: chosen anew
        while counts[-1] == 3:
            counts.append(await one.prune("a", keep_last=0, limit=3))
        assert counts == [3, 3, 0]  # the last 6 (3 + 3), then nothing: 3 + 4 + 3 + 6 = all 16 once
        left = await one.list_all(asset_name="a", limit=100)
        assert sorted((r.partition, r.status) for r in left) == [(key, Status.SUCCESS) for key in "0123"]
        with fs.tenant_scope("t"):
            assert await one.prune("a", keep_last=0) == 0
