"""The registry actor: which assets exist, their executors, and live backfills.

Callers get an immutable :class:`Snapshot` (graph, executor handles, code
versions) and plan against it without further questions. ``Register`` is
validated and applied one at a time, so concurrent registrations cannot race
each other into a name clash or a cycle.

An asset's executor starts when something first asks for its handle (a run, a
backfill), not when the asset is registered: a runtime of 10,000
assets that runs ten of them holds ten executors, and registering one costs no
task (see :class:`Executors`).

Like the memory store, the state lives outside the incarnation: a restarted
registry still knows every executor that has started.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeVar

import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from ..actors.mailbox import Handle, Handlers, Message, serve
from ..dag import AssetGraph
from ..definitions import Asset
from ..pipeline import addition_problems, raise_problems
from .hashing import code_version, code_versions

__all__ = ["RegistryState", "Snapshot", "registry_actor"]


@attrs.frozen
class Snapshot:
    """The assets as of one moment; never changes, replaced on ``register``."""

    graph: AssetGraph
    executors: Executors
    versions: Mapping[str, str]


BackfillKey = tuple[str | None, uuid.UUID]
"""(tenant, backfill id): another tenant's id is one that does not exist."""

UNSAVED_KEPT = 1000


@attrs.define
class RegistryState:
    snapshot: Snapshot
    backfills: dict[BackfillKey, Handle] = attrs.field(factory=dict)
    unsaved: dict[BackfillKey, Any] = attrs.field(factory=dict)
    """Final statuses of backfills the store could not save: still known here."""


V = TypeVar("V")


_UNSEEN: Any = object()


class Known(Mapping[str, V]):
    """A dict that only grows (one entry per asset ever registered), seen as of one
    snapshot: the names its graph holds. Snapshots share the dict instead of each
    copying it, so a registration costs the same at 10 assets and at 10,000."""

    __slots__ = ("_graph", "_items", "_seen")

    def __init__(self, items: dict[str, V], graph: AssetGraph) -> None:
        self._items, self._graph = items, graph
        self._seen: dict[str, V] = {}
        """The names this snapshot was asked for and holds: each tested against its
        graph once (a run asks for each of its assets' executor and version)."""

    def __getitem__(self, name: str) -> V:
        value = self._seen.get(name, _UNSEEN)
        if value is not _UNSEEN:
            return value
        if name in self._graph:
            value = self._seen[name] = self._items[name]
            return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (asset.name for asset in self._graph.assets)

    def __len__(self) -> int:
        return len(self._graph)


Spawn = Callable[[Asset], Handle]
"""Starts an asset's executor under supervision; the handle works at once."""


class Executors(Known[Handle]):
    """Each asset's executor handle, the executor started on first use.

    Starting is synchronous (the actor's task is spawned, its mailbox takes
    messages at once) and the event loop runs one task at a time, so two callers
    asking for the same asset get the same executor. Observers that must not start
    one ask ``running``."""

    __slots__ = ("_spawn",)

    def __init__(self, items: dict[str, Handle], graph: AssetGraph, spawn: Spawn) -> None:
        super().__init__(items, graph)
        self._spawn = spawn

    def __getitem__(self, name: str) -> Handle:
        handle = self._seen.get(name)
        if handle is not None:
            return handle
        if name not in self._graph:
            raise KeyError(name)
        handle = self._items.get(name)
        if handle is None:
            handle = self._items[name] = self._spawn(self._graph.get(name))
        self._seen[name] = handle
        return handle

    def running(self, name: str) -> Handle | None:
        """The executor's handle if it has started, without starting it."""
        return self._items.get(name) if name in self._graph else None


def initial_snapshot(graph: AssetGraph, spawn: Spawn) -> Snapshot:
    return Snapshot(
        graph=graph,
        executors=Executors({}, graph, spawn),
        versions=Known(code_versions(graph.assets), graph),
    )


@attrs.frozen(kw_only=True)
class GetSnapshot(Message["Snapshot"]):
    pass


@attrs.frozen(kw_only=True)
class Register(Message["Snapshot"]):
    asset: Asset


@attrs.frozen(kw_only=True)
class AddBackfill(Message[None]):
    tenant: str | None
    id: uuid.UUID
    handle: Handle


@attrs.frozen(kw_only=True)
class DropBackfill(Message[None]):
    """Forget a finished backfill, if ``handle`` is still the one registered
    (a resumed backfill with the same id may already have replaced it).
    ``unsaved``: its final status, when the store could not save it."""

    tenant: str | None
    id: uuid.UUID
    handle: Handle
    unsaved: Any = None


@attrs.frozen(kw_only=True)
class GetBackfill(Message[Any]):
    """The running backfill's handle, or the final status the store could not save, or None."""

    tenant: str | None
    id: uuid.UUID


def registry_actor(
    state: RegistryState, io_managers: Collection[str], resources: Collection[str]
) -> Callable[[MemoryObjectReceiveStream[Message]], Any]:
    def register(message: Register) -> Snapshot:
        current = state.snapshot
        graph, errors = addition_problems(
            current.graph, message.asset, io_managers=io_managers, resources=resources
        )
        raise_problems(errors, graph)
        executors, versions = current.executors, current.versions
        assert isinstance(versions, Known)
        versions._items[message.asset.name] = code_version(message.asset)  # seen only by snapshots whose graph holds it
        state.snapshot = Snapshot(graph=graph, executors=Executors(executors._items, graph, executors._spawn),
                                  versions=Known(versions._items, graph))
        return state.snapshot

    def get_snapshot(message: GetSnapshot) -> Snapshot:
        return state.snapshot

    def add_backfill(message: AddBackfill) -> None:
        state.backfills[(message.tenant, message.id)] = message.handle
        state.unsaved.pop((message.tenant, message.id), None)

    def drop_backfill(message: DropBackfill) -> None:
        key = (message.tenant, message.id)
        if state.backfills.get(key) is message.handle:
            del state.backfills[key]
            if message.unsaved is not None:
                state.unsaved[key] = message.unsaved
                while len(state.unsaved) > UNSAVED_KEPT:
                    del state.unsaved[next(iter(state.unsaved))]

    def get_backfill(message: GetBackfill) -> Any:
        key = (message.tenant, message.id)
        return state.backfills.get(key) or state.unsaved.get(key)

    handlers: Handlers = {
        GetSnapshot: get_snapshot, Register: register, AddBackfill: add_backfill,
        DropBackfill: drop_backfill, GetBackfill: get_backfill,
    }

    async def incarnation(mailbox: MemoryObjectReceiveStream[Message]) -> None:
        await serve("registry", mailbox, handlers)

    return incarnation
