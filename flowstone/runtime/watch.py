"""The runtime's event bus: who watches, and handing each of them what happens.

Publishing is a plain loop over the subscribers, in the publisher's task: no
task, no channel, no await. With nobody subscribed, publishers check one list
and build no event at all, so watching costs nothing until someone watches.
Each subscriber has a bounded buffer; what does not fit is counted and
delivered as one ``EventsDropped`` where it was lost, so a slow watcher loses
events, never slows the runtime.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection

import anyio

from ..events import Event, EventsDropped
from ..plumbing.clock import utcnow

__all__ = ["EventBus", "Subscription"]

DEFAULT_BUFFER = 10_000


class EventBus:
    """The runtime's subscribers. Publishers check ``if bus.subscribers:`` first."""

    __slots__ = ("subscribers",)

    def __init__(self) -> None:
        self.subscribers: list[Subscription] = []

    def publish(self, event: Event) -> None:
        for subscription in self.subscribers:
            subscription.offer(event)

    def close(self) -> None:
        """The runtime stops: every subscriber's iteration ends after what it holds."""
        for subscription in list(self.subscribers):
            subscription.close()


class Subscription:
    """One watcher: an async iterator over the events it asked for, of its tenant."""

    def __init__(
        self,
        bus: EventBus,
        tenant: str | None,
        asset: str | None,
        kinds: Collection[type[Event]] | None,
        buffer: int,
        allowed: Callable[[str], Awaitable[bool]] | None,
    ) -> None:
        self._bus, self._tenant, self._asset = bus, tenant, asset
        self._kinds = tuple(kinds) if kinds is not None else None
        self._size = buffer
        self._allowed = allowed
        self._verdicts: dict[str, bool] = {}
        self._queue: deque[Event] = deque()
        self._dropped = 0
        self._wake = anyio.Event()
        self._closed = False

    def offer(self, event: Event) -> None:
        if event.tenant != self._tenant or (self._kinds is not None and not isinstance(event, self._kinds)):
            return
        if self._asset is not None and getattr(event, "asset", None) != self._asset:
            return
        if len(self._queue) >= self._size:
            self._dropped += 1
            return
        if self._dropped:  # room again: first say how many were lost here
            self._queue.append(EventsDropped(at=utcnow(), tenant=self._tenant, run_id=None, count=self._dropped))
            self._dropped = 0
        self._queue.append(event)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        if self in self._bus.subscribers:
            self._bus.subscribers.remove(self)
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            while not self._queue:
                if self._dropped:
                    count, self._dropped = self._dropped, 0
                    return EventsDropped(at=utcnow(), tenant=self._tenant, run_id=None, count=count)
                if self._closed:
                    raise StopAsyncIteration
                self._wake = anyio.Event()
                await self._wake.wait()
            event = self._queue.popleft()
            if await self._may_see(event):
                return event

    async def _may_see(self, event: Event) -> bool:
        """The guard's ``can_access`` for the event's asset, asked once per asset."""
        asset = getattr(event, "asset", None)
        if self._allowed is None or asset is None:
            return True
        verdict = self._verdicts.get(asset)
        if verdict is None:
            verdict = self._verdicts[asset] = await self._allowed(asset)
        return verdict

    @property
    def pending(self) -> int:
        """Events waiting in this subscriber's buffer."""
        return len(self._queue)

