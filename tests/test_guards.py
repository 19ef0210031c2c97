"""The Guard protocol and how its answers are read: fail closed (SPEC 4)."""

import anyio
import pytest

import flowstone as fs
from flowstone.guards import authorize

pytestmark = pytest.mark.anyio

ASSET = fs.Asset(name="report")
CONTEXT = {"tenant": "acme", "user": "ana"}


class Answer:
    """A guard that gives the same answer to both questions."""

    def __init__(self, answer):
        self.answer = answer
        self.asked = []

    def can_access(self, asset, context):
        self.asked.append(("access", asset.name, dict(context)))
        return self.answer

    def can_materialize(self, asset, context):
        self.asked.append(("materialize", asset.name, dict(context)))
        return self.answer


class AsyncAnswer(Answer):
    async def can_access(self, asset, context):
        await anyio.lowlevel.checkpoint()
        return Answer.can_access(self, asset, context)

    async def can_materialize(self, asset, context):
        await anyio.lowlevel.checkpoint()
        return Answer.can_materialize(self, asset, context)


def test_guard_protocol_is_checkable():
    assert isinstance(Answer(True), fs.Guard)
    assert not isinstance(object(), fs.Guard)


async def test_no_guard_allows(anyio_backend):
    await authorize(None, "materialize", ASSET, CONTEXT)


@pytest.mark.parametrize("guard_type", [Answer, AsyncAnswer])
async def test_true_allows_and_the_guard_sees_asset_and_context(anyio_backend, guard_type):
    guard = guard_type(True)
    await authorize(guard, "materialize", ASSET, CONTEXT)
    await authorize(guard, "access", ASSET, CONTEXT)
    assert guard.asked == [("materialize", "report", CONTEXT), ("access", "report", CONTEXT)]


@pytest.mark.parametrize("guard_type", [Answer, AsyncAnswer])
@pytest.mark.parametrize("answer", [False, None, 1, "yes"])
async def test_anything_but_true_denies(anyio_backend, guard_type, answer):
    with pytest.raises(fs.AccessDenied) as info:
        await authorize(guard_type(answer), "access", ASSET, CONTEXT)
    denied = info.value
    assert (denied.asset, denied.action, denied.tenant) == ("report", "access", "acme")
    assert "report" in str(denied) and "acme" in str(denied) and "access" in str(denied)


async def test_a_guard_that_raises_denies_and_keeps_the_cause(anyio_backend):
    class Broken(Answer):
        def can_materialize(self, asset, context):
            raise LookupError("policy store down")

    with pytest.raises(fs.AccessDenied, match="policy store down") as info:
        await authorize(Broken(True), "materialize", ASSET, CONTEXT)
    assert isinstance(info.value.__cause__, LookupError)


async def test_cancellation_inside_a_guard_is_not_turned_into_a_denial(anyio_backend):
    scope = anyio.CancelScope()

    class Cancelling(Answer):
        async def can_access(self, asset, context):
            scope.cancel()
            await anyio.lowlevel.checkpoint()
            return True  # pragma: no cover

    with scope:
        await authorize(Cancelling(True), "access", ASSET, CONTEXT)
    assert scope.cancelled_caught
