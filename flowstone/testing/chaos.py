"""Chaos for tests and stress runs: kill actors, make IO managers fail or lag,
drop the store's database connections. Everything random takes a seed, so a run
that found a bug can be run again the same way.

- ``await kill_actor(rt)`` crashes one actor (named, or picked with ``seed``);
  ``ActorKiller(rt, every=0.05, seed=1)`` keeps doing it while a block runs.
- ``FaultyIO(io, failure_rate=0.1, latency=0.0, seed=1)`` wraps any IO manager.
- ``await terminate_connections(dsn)`` ends every other PostgreSQL connection of
  that database and role, as a server restart or a failover would.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from contextlib import AsyncExitStack
from types import MappingProxyType
from typing import Any

import anyio

from ..actors.mailbox import Crash
from ..errors import ActorCrashed, RuntimeClosed, StorageUnavailable
from ..io.protocol import returns_stored_object

_NO_CONFIG: Mapping[str, Any] = MappingProxyType({})

__all__ = ["ActorKiller", "FaultyIO", "InjectedFault", "kill_actor", "terminate_connections"]


class InjectedFault(StorageUnavailable):
    """The failure ``FaultyIO`` injects: a transient storage error, so an asset's
    retry policy treats it as it would a real outage."""


async def kill_actor(
    rt: Any, name: str | None = None, *, seed: int | random.Random | None = None, reason: str = "killed by chaos"
) -> str:
    """Crash one actor of ``rt`` as a bug would, and return its name: ``name``
    (``"memory-store"``, ``"registry"`` or ``"executor:<asset>"``), or one picked at
    random, reproducibly with ``seed``. Its supervisor restarts it (or, past its
    restart budget, fails the runtime). Returns once the actor has crashed; raises
    ``NotFound`` for a name the runtime has no actor for."""
    if name is None:
        chooser = seed if isinstance(seed, random.Random) else random.Random(seed)
        name = chooser.choice(await rt._actor_names())
    handle = await rt._actor(name)
    try:
        await handle.call(Crash, reason=reason)
    except ActorCrashed:
        return name
    raise AssertionError(f"{name} did not crash")  # pragma: no cover


class ActorKiller:
    """Kill a random actor every ``every`` seconds while the ``async with`` block runs.

    ``targets`` limits the choice (default: every executor, the only actors whose
    crash a runtime rides out without touching the records: the registry and the
    memory store restart too, but callers waiting on them at that moment fail).
    ``killed`` lists what was killed, in order.
    """

    def __init__(
        self, rt: Any, *, every: float = 0.05, seed: int = 0, targets: Sequence[str] | None = None, limit: int = 1000
    ) -> None:
        self.rt = rt
        self.every = every
        self.random = random.Random(seed)
        self.targets = list(targets) if targets is not None else None
        self.limit = limit
        self.killed: list[str] = []
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> ActorKiller:
        if self.targets is None:
            self.targets = [n for n in await self.rt._actor_names() if n.startswith("executor:")]
        async with AsyncExitStack() as stack:
            tasks = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tasks.cancel_scope.cancel)  # on the way out, before the group waits
            tasks.start_soon(self._loop)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        return await stack.__aexit__(*exc) if stack is not None else None

    async def _loop(self) -> None:
        while len(self.killed) < self.limit:
            await anyio.sleep(self.every)
            name = self.random.choice(self.targets or ["registry"])
            try:
                await kill_actor(self.rt, name)
            except (ActorCrashed, RuntimeClosed):
                return  # past its restart budget, or the runtime is stopping
            self.killed.append(name)


class FaultyIO:
    """Wrap an IO manager: each call in ``operations`` fails with ``InjectedFault``
    with probability ``failure_rate`` and is delayed by ``latency`` seconds (plus up
    to ``jitter``), drawn from ``random.Random(seed)``. The same seed and the same
    order of calls give the same faults. ``faults`` counts what was injected."""

    def __init__(
        self,
        inner: Any,
        *,
        failure_rate: float = 0.1,
        latency: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        operations: Collection[str] = ("load", "store"),
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate!r}")
        self.inner = inner
        self.failure_rate = failure_rate
        self.latency = latency
        self.jitter = jitter
        self.random = random.Random(seed)
        self.operations = frozenset(operations)
        self.faults: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        if returns_stored_object(inner):
            self.returns_stored_object = True

    async def _maybe_fail(self, operation: str, asset: str, partition: Any) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        if operation not in self.operations:
            return
        fail = self.random.random() < self.failure_rate
        delay = self.latency + (self.random.random() * self.jitter if self.jitter else 0.0)
        if delay > 0:
            await anyio.sleep(delay)
        if fail:
            self.faults[operation] = self.faults.get(operation, 0) + 1
            raise InjectedFault(f"injected {operation} fault", asset=asset, partition=str(partition))

    async def load(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        await self._maybe_fail("load", asset, partition)
        return await self.inner.load(asset, partition, config)

    async def store(
        self, asset: str, value: Any, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> None:
        await self._maybe_fail("store", asset, partition)
        await self.inner.store(asset, value, partition, config)

    async def delete(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> None:
        await self._maybe_fail("delete", asset, partition)
        await self.inner.delete(asset, partition, config)

    async def exists(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> bool:
        await self._maybe_fail("exists", asset, partition)
        return await self.inner.exists(asset, partition, config)

    async def metadata(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        await self._maybe_fail("metadata", asset, partition)
        return await self.inner.metadata(asset, partition, config)

    async def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped manager offers
        return getattr(self.inner, name)


async def terminate_connections(dsn: str) -> int:
    """End every connection to ``dsn``'s database made by its role, except this one
    (as a server restart would); how many were ended. The role may always signal
    its own backends, so no superuser is needed."""
    from ..plumbing.bridge import Bridge

    async def terminate() -> int:
        import asyncpg

        connection = await asyncpg.connect(dsn)
        try:
            return await connection.fetchval(
                """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid()"""
            )
        finally:
            await connection.close()

    bridge = Bridge()
    try:
        return await bridge.run(terminate)
    finally:
        await bridge.close()
