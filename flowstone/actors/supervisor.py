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
from ..plumbing.frozen import builder
from ..plumbing.interrupts import internal, protect_on_trio
from .mailbox import Handle, Message, fail_pending, open_mailbox

__all__ = ["RestartPolicy", "spawn", "spawn_on_demand", "supervise"]

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
    shared: Any = None,
    counted: bool = False,
    task_status: TaskStatus[Handle] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``incarnation(mailbox)`` until it returns, restarting it when it crashes.

    Start with ``handle = await tg.start(supervise, name, incarnation, policy)``, or
    without waiting with :func:`spawn`. ``shared`` goes on the handle (``Handle.shared``);
    ``counted``: the handle counts its casts there (``CountedHandle``).
    """
    handle, send, receive = open_mailbox(name, shared, counted=counted)
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


def spawn_on_demand(
    tasks: TaskGroup, name: str, incarnation: Incarnation, policy: RestartPolicy, *, shared: Any = None
) -> Handle:
    """As :func:`spawn`, but the actor's mailbox is opened and its task started by
    the first message posted to it: callers that only use ``shared`` (the executor's
    gate) never need either. Starting a task for each of a run's 100 assets cost 5.5
    of its 18 ms, and opening each one's mailbox another 0.5. Close the handle
    (``close``) when its task may never have started: it closes both ends of the
    mailbox then, if it was opened."""
    # Handle's fields in order (name, mailbox, shared), then the waking: a fresh runtime
    # makes one for each asset of its first run (see plumbing.frozen.builder).
    return _new_on_demand(name, None, shared, _Waking(tasks, name, incarnation, policy))


class _Waking:
    """What opens an on-demand actor's mailbox and starts its task, once."""

    __slots__ = ("closed", "incarnation", "name", "policy", "receive", "send", "started", "tasks")

    def __init__(self, tasks: TaskGroup, name: str, incarnation: Incarnation, policy: RestartPolicy) -> None:
        self.tasks, self.name, self.incarnation, self.policy = tasks, name, incarnation, policy
        self.send: MemoryObjectSendStream[Message] | None = None
        self.receive: MemoryObjectReceiveStream[Message] | None = None
        self.started = False
        self.closed = False

    def wake(self) -> MemoryObjectSendStream[Message]:
        """The mailbox, opened and its actor's task started on the first call. Once
        closed (``close``), a closed mailbox: posting to it raises ``RuntimeClosed``."""
        send, receive = self._open()
        if not self.started:
            self.started = True
            try:
                self.tasks.start_soon(
                    _supervised, self.name, self.incarnation, self.policy, send, receive, None, name=self.name
                )
            except RuntimeError:  # the task group is closed: so is the actor, for good
                send.close()
                receive.close()
        return send

    def close(self) -> None:
        """Close the mailbox: both ends when no task ever took the receiving one. One
        never opened is not opened now (a runtime closes an executor's handle for
        each asset, and opening a mailbox cost more than all the rest of an executor
        the run never asked anything of): a post after this opens it closed, so
        posting raises ``RuntimeClosed`` as it would have."""
        task_took_it, self.started, self.closed = self.started, True, True  # nothing may start it now
        send, receive = self.send, self.receive
        if send is None or receive is None:
            return
        send.close()
        if not task_took_it:
            receive.close()

    def _open(self) -> tuple[MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]]:
        send, receive = self.send, self.receive
        if send is None or receive is None:
            _, send, receive = open_mailbox(self.name)
            self.send, self.receive = send, receive
            if self.closed:  # closed before anything was ever posted
                send.close()
                receive.close()
        return send, receive


@attrs.frozen
class _OnDemand(Handle):
    waking: _Waking = attrs.field(kw_only=True, repr=False, eq=False)

    def _opened(self) -> MemoryObjectSendStream[Message]:
        return self.waking.wake()

    def close(self) -> None:
        self.waking.close()


_new_on_demand = builder(_OnDemand)

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
