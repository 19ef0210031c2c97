"""Supervision: an actor that crashes is restarted with the same mailbox.

The supervisor owns the mailbox, so the handle callers hold stays valid across
restarts and messages queued behind the crash are served by the next
incarnation. The caller whose message caused the crash has already been told
(``ActorCrashed``, by :func:`~flowstone.actors.mailbox.serve`). Too many crashes in
a window means restarting will not help: the supervisor raises, and the runtime's
task group fails loudly with it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import attrs
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import ActorCrashed, RuntimeClosed
from ..plumbing.interrupts import internal, protect_on_trio
from .mailbox import Handle, Message, fail_pending, open_mailbox

__all__ = ["RestartPolicy", "supervise"]

log = logging.getLogger("flowstone.actors")

Incarnation = Callable[[MemoryObjectReceiveStream[Message]], Awaitable[None]]


@attrs.frozen
class RestartPolicy:
    """At most ``max_restarts`` restarts of one actor within ``window`` seconds."""

    max_restarts: int = 5
    window: float = 60.0


@internal  # Ctrl-C goes to the caller's task, not into this loop
async def supervise(
    name: str,
    incarnation: Incarnation,
    policy: RestartPolicy,
    *,
    task_status: TaskStatus[Handle] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``incarnation(mailbox)`` until it returns, restarting it when it crashes.

    Start with ``handle = await tg.start(supervise, name, incarnation, policy)``.
    """
    protect_on_trio()
    handle, send, receive = open_mailbox(name)
    crashes: deque[float] = deque()
    try:
        task_status.started(handle)
        while True:
            try:
                await incarnation(receive)
                return
            except Exception as exc:
                now = anyio.current_time()
                crashes.append(now)
                while crashes and now - crashes[0] > policy.window:
                    crashes.popleft()
                if len(crashes) > policy.max_restarts:
                    raise ActorCrashed(
                        name,
                        detail=f"crashed {len(crashes)} times in {policy.window:g}s; giving up",
                    ) from exc
                log.error("actor %s crashed; restarting (%d in window)", name, len(crashes), exc_info=exc)
    finally:
        send.close()
        fail_pending(name, receive, lambda: RuntimeClosed(f"{name} stopped"))
        receive.close()
