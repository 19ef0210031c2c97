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
from typing import Any

import anyio
import attrs
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import ActorCrashed, RuntimeClosed
from ..plumbing.interrupts import internal, protect_on_trio
from .mailbox import Handle, Message, fail_pending, open_mailbox

__all__ = ["RestartPolicy", "spawn", "supervise"]

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

    Start with ``handle = await tg.start(supervise, name, incarnation, policy)``, or
    without waiting with :func:`spawn`.
    """
    handle, send, receive = open_mailbox(name)
    await _supervised(name, incarnation, policy, send, receive, lambda: task_status.started(handle))


def spawn(
    tasks: TaskGroup, name: str, incarnation: Incarnation, policy: RestartPolicy, *, shared: Any = None
) -> Handle:
    """Supervise ``incarnation`` in ``tasks`` without waiting for its task to begin:
    the handle works at once (messages wait in the mailbox until the actor runs).
    A runtime starts one executor per asset; waiting for each (``tg.start``) cost
    two event-loop turns apiece. A task always begins (anyio cancels only tasks that
    have), so its mailbox is always closed by it. ``shared`` goes on the handle
    (``Handle.shared``)."""
    handle, send, receive = open_mailbox(name, shared)
    try:
        tasks.start_soon(_supervised, name, incarnation, policy, send, receive, None, name=name)
    except BaseException:
        send.close()
        receive.close()
        raise
    return handle


@internal  # Ctrl-C goes to the caller's task, not into this loop
async def _supervised(
    name: str,
    incarnation: Incarnation,
    policy: RestartPolicy,
    send: MemoryObjectSendStream[Message],
    receive: MemoryObjectReceiveStream[Message],
    started: Callable[[], None] | None,
) -> None:
    protect_on_trio()
    crashes: deque[float] = deque()
    try:
        if started is not None:
            started()
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
