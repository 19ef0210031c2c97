"""Tenant scope on contextvars (SPEC 4): task-local, inherited, always restored."""

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowstone as fs
from flowstone.tenancy import validate_tenant

pytestmark = pytest.mark.anyio


def test_no_tenant_outside_any_scope():
    assert fs.current_tenant() is None


def test_scope_sets_and_restores():
    with fs.tenant_scope("acme") as tenant:
        assert tenant == "acme" and fs.current_tenant() == "acme"
    assert fs.current_tenant() is None


def test_nested_scopes_restore_the_outer_tenant():
    with fs.tenant_scope("outer"):
        with fs.tenant_scope("inner"):
            assert fs.current_tenant() == "inner"
        assert fs.current_tenant() == "outer"


def test_scope_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with fs.tenant_scope("acme"):
            raise RuntimeError("boom")
    assert fs.current_tenant() is None


@pytest.mark.parametrize(
    ("tenant", "why"),
    [
        ("", "empty"),
        ("x" * 129, "limit is 128"),
        ("acme\n", "control character"),
        ("ac\x00me", "control character"),
        ("ac\x1bme", "control character"),
        ("ac\ud800me", "control character"),
        (" acme", "white space"),
        (None, "must be a str"),
        (42, "must be a str"),
        (b"acme", "must be a str"),
    ],
)
def test_invalid_tenant_ids_are_refused_and_change_nothing(tenant, why):
    with fs.tenant_scope("kept"):
        with pytest.raises(fs.InvalidTenant, match=why):
            with fs.tenant_scope(tenant):
                pass  # pragma: no cover
        assert fs.current_tenant() == "kept"


def test_longest_allowed_and_unicode_tenants_are_fine():
    for tenant in ("x" * 128, "société-générale", "org/team@acme", "租户"):
        with fs.tenant_scope(tenant):
            assert fs.current_tenant() == tenant


@given(st.text(max_size=200))
def test_any_string_is_either_a_valid_tenant_or_invalid_tenant(text):
    try:
        assert validate_tenant(text) == text
    except fs.InvalidTenant:
        return
    assert 0 < len(text) <= 128 and text == text.strip()
    assert all(ord(c) >= 32 and not 0x7F <= ord(c) <= 0x9F for c in text)


async def test_child_tasks_inherit_the_tenant(anyio_backend):
    seen = []

    async def child():
        seen.append(fs.current_tenant())

    with fs.tenant_scope("acme"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
    assert seen == ["acme"]


async def test_tasks_spawned_inside_a_scope_inherit_it_from_an_outer_task_group(anyio_backend):
    """The task group was opened before the scope; the spawn happens inside it."""
    seen = {}

    async def child(label):
        seen[label] = fs.current_tenant()

    async with anyio.create_task_group() as tg:
        with fs.tenant_scope("acme"):
            tg.start_soon(child, "inside")
        tg.start_soon(child, "after")
    assert seen == {"inside": "acme", "after": None}


async def test_concurrent_tasks_never_see_each_others_tenant(anyio_backend):
    both_inside = anyio.Event()
    arrived = []
    seen = {}

    async def worker(tenant):
        with fs.tenant_scope(tenant):
            arrived.append(tenant)
            if len(arrived) == 2:
                both_inside.set()
            await both_inside.wait()  # both scopes are open at the same time here
            seen[tenant] = fs.current_tenant()

    async def bystander():
        await both_inside.wait()
        seen["bystander"] = fs.current_tenant()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "a")
        tg.start_soon(worker, "b")
        tg.start_soon(bystander)
    assert seen == {"a": "a", "b": "b", "bystander": None}


async def test_a_scope_inside_a_child_does_not_leak_to_the_parent(anyio_backend):
    async def child():
        with fs.tenant_scope("child"):
            await anyio.lowlevel.checkpoint()

    with fs.tenant_scope("parent"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        assert fs.current_tenant() == "parent"


async def test_worker_threads_see_the_tenant_of_the_task_that_started_them(anyio_backend):
    with fs.tenant_scope("acme"):
        assert await anyio.to_thread.run_sync(fs.current_tenant) == "acme"
    assert await anyio.to_thread.run_sync(fs.current_tenant) is None
