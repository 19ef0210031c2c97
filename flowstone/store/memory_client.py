"""Clients of an actor that may run inside a runtime or on their own.

``fs.store.MemoryStore`` and ``fs.io.MemoryIO`` talk to the memory-store actor.
Inside ``open_runtime`` the runtime starts that actor and binds the clients to
it; used alone, ``async with MemoryStore() as store:`` starts a private one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from ..actors.mailbox import CLEANUP_SECONDS, Handle, Message
from ..actors.supervisor import RestartPolicy, supervise
from ..errors import RuntimeClosed

if TYPE_CHECKING:
    from .memory_actor import MemoryData

R = TypeVar("R")


class MemoryActorClient:
    """Base of the memory clients: holds the actor's handle once it is started."""

    def __init__(self, *, data: MemoryData | None = None) -> None:
        # Imported here: the actor module imports the store's records, whose
        # package imports this client (MemoryStore).
        from .memory_actor import MemoryData

        self._data = data if data is not None else MemoryData()
        self._handle: Handle | None = None
        self._own: tuple[AsyncExitStack, TaskGroup] | None = None  # the group of an "async with" of its own

    @property
    def handle(self) -> Handle:
        if self._handle is None:
            raise RuntimeClosed(
                f"{type(self).__name__} is not started: use it inside open_runtime(...) "
                f"or as 'async with {type(self).__name__}()'"
            )
        return self._handle

    @property
    def started(self) -> bool:
        return self._handle is not None

    def bind(self, handle: Handle) -> None:
        """Talk to an already running memory-store actor (the runtime's)."""
        self._handle = handle

    def unbind(self) -> None:
        """Forget the actor (it stopped with its runtime); the data is kept."""
        self._handle = None

    async def start(self, task_group: TaskGroup, policy: RestartPolicy) -> Handle:
        """Start the memory-store actor in ``task_group`` and bind to it."""
        from .memory_actor import InPlace, memory_actor

        door = InPlace(self._data)
        serve = functools.partial(supervise, shared=door, counted=True)
        handle = await task_group.start(serve, "memory-store", memory_actor(door), policy)
        self.bind(handle)
        return handle

    async def _cast(self, message: Message) -> None:
        """Cast ``message`` to the actor, or, when the actor serves and no other cast
        is queued or on its way to it, handle it here and now (``InPlace``): the
        order the mailbox would give it. A backfill's writes then never wait in the
        mailbox for every worker's turn to end, holding what they free until then
        (the garbage collector's young passes had cost ~8% of a partition)."""
        handle = self._cast_now(message)
        if handle is not None:
            await handle.cast(message)

    def _cast_now(self, message: Message) -> Handle | None:
        """``_cast`` without waiting: None when ``message`` was handled here and now,
        else the handle the caller casts it to (``await handle.cast(message)``). The
        three writes of each materialization come this way, without a coroutine
        each for a cast that is done before it could wait."""
        handle = self._handle
        if handle is None:
            handle = self.handle  # raises: not started
        door = handle.shared
        # door.idle(), inline
        if door is not None and door.open and door.serving and door.casts == door.taken:
            door.apply(handle, message)
            return None
        return handle

    async def _read(self, message_type: Callable[..., Message[R]], /, **fields: Any) -> R:
        """The answer to a read (``handle.call(message_type, **fields)``): handled here
        and now, without a turn in the mailbox, when the actor serves and no cast is
        queued or on its way to it (``InPlace.answer``), else asked through the
        mailbox. A job's input read that way waited for every backfill worker's turn,
        and the wait counted in its function's time: a reader's backfill took its
        partitions for slow ones and ran them one at a time, at three times a root
        asset's cost. For reads that other awaits follow (it does not yield)."""
        handle = self._handle
        if handle is None:
            handle = self.handle  # raises: not started
        door = handle.shared
        if door is not None and door.idle():
            answer: R = door.answer(handle, message_type(**fields))
            return answer
        return await handle.call(message_type, **fields)

    async def __aenter__(self) -> Any:
        if self._handle is None:
            async with AsyncExitStack() as stack:
                group = await stack.enter_async_context(anyio.create_task_group())
                await self.start(group, RestartPolicy())  # if this fails, the stack closes the group
                self._own = (stack.pop_all(), group)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        own, self._own = self._own, None
        if own is None:
            return None
        stack, group = own
        handle, self._handle = self._handle, None
        await stop_gracefully(group, [handle] if handle is not None else [])
        return await stack.__aexit__(exc_type, exc, tb)


async def stop_gracefully(group: TaskGroup, handles: list[Handle]) -> None:
    """Close the actors' mailboxes so they answer (and apply) what is queued, and
    give them until a deadline to finish before ``group`` is cancelled.

    Write-behind casts sit in those mailboxes: cancelling straight away would
    drop writes the caller was told are done.
    """
    for handle in handles:
        handle.close()
    group.cancel_scope.deadline = min(group.cancel_scope.deadline, anyio.current_time() + CLEANUP_SECONDS)
