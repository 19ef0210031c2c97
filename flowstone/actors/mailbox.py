"""How actors are talked to: handles, one-shot replies, and the serving loop.

An actor owns its state and a mailbox (a bounded anyio memory stream). The
outside world holds a :class:`Handle`, a frozen wrapper of the mailbox's send
side, and either *calls* (a request carrying a one-shot :class:`Reply` that the
caller owns and waits on) or *casts* (fire and forget; FIFO order still holds,
so a later call from anyone sees the effect of an earlier cast).

Two measured choices (stress/README.md): callers post with ``send_nowait`` and
only fall back to ``await send`` when the buffer is full, and :func:`serve`
drains every queued message before it yields. Both avoid event-loop round trips
that cost more than the work of a small message.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import ActorCrashed, FlowstoneError, RuntimeClosed
from ..plumbing.interrupts import internal

__all__ = [
    "CLEANUP_SECONDS", "DEFERRED", "CountedHandle", "Crash", "Handle", "Handlers", "Message", "Outcome", "Reply",
    "direct_reply", "open_mailbox", "serve",
]

log = logging.getLogger("flowstone.actors")

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

MAILBOX_SIZE = 1024
"""Messages an actor may have queued before senders wait: deep enough that a
burst of 20-way parallel work never blocks, small enough to bound memory."""

CLEANUP_SECONDS = 5.0
"""How long shielded cleanup (recording a cancelled run, telling an actor that a
waiter left) may take before it is abandoned: shutdown must end."""

DEFERRED: Any = type("Deferred", (), {"__repr__": lambda self: "DEFERRED"})()
"""Returned by a handler that will answer later (it kept the message's reply)."""

_YIELD_EVERY = 256
"""An actor with a full mailbox still yields after this many messages, so it
cannot starve the tasks that are waiting for its replies."""


@attrs.frozen
class Outcome(Generic[T]):
    """A reply: the value, or the error the caller should see."""

    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _Slot:
    """Where one answer goes: written once by the actor, read once by the caller.
    The caller waits on ``event`` only when the answer has not come yet."""

    __slots__ = ("done", "event", "left", "outcome")

    def __init__(self) -> None:
        self.outcome: Outcome[Any] | None = None
        self.done = False
        """Answered, or closed without an answer (the caller sees ``ActorCrashed``)."""
        self.left = False
        """The caller stopped listening: an answer now goes nowhere."""
        self.event: anyio.Event | None = None


class Reply:
    """The actor's end of a one-shot answer: used once; later uses do nothing.

    ``resolve`` says whether the caller got the answer: a caller that left (it was
    cancelled) gets nothing, and an actor that handed it something to give back
    (a lease) must take it back itself."""

    __slots__ = ("_slot",)

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot

    def resolve(self, value: Any) -> bool:
        return self._deliver(Outcome(value=value))

    def fail(self, error: BaseException) -> bool:
        return self._deliver(Outcome(error=error))

    def _deliver(self, outcome: Outcome[Any]) -> bool:
        slot = self._slot
        if slot.done:
            return False
        slot.done = True
        if slot.left:
            return False  # the caller stopped waiting (cancelled); nobody to tell
        slot.outcome = outcome
        if slot.event is not None:
            slot.event.set()
        return True

    def close(self) -> None:
        """Close without an answer: the waiting caller sees the actor as crashed."""
        slot = self._slot
        if not slot.done:
            slot.done = True
            if slot.event is not None:
                slot.event.set()


@attrs.frozen(kw_only=True)
class Message(Generic[R]):
    """Base of every message; ``R`` is what its handler answers (``None`` for a cast),
    so ``await handle.call(GetSnapshot)`` is typed as a ``Snapshot``. ``reply`` is
    ``None`` for casts."""

    reply: Reply | None = None

    def discard(self) -> None:
        """Release what the message owns when it will never be handled (shutdown)."""


@attrs.frozen(kw_only=True)
class Crash(Message[None]):
    """Makes the receiving actor crash as a bug would: for supervision tests and chaos."""

    reason: str = "crash requested"


class CrashRequested(RuntimeError):
    """What an actor raises on :class:`Crash`: an ordinary bug, as far as it knows."""


@attrs.frozen
class Handle:
    """What callers hold: the actor's name and the send side of its mailbox."""

    name: str
    _mailbox: MemoryObjectSendStream[Message] | None = attrs.field(repr=False)
    """None only for a handle that opens it on first use (``_opened``)."""
    shared: Any = attrs.field(default=None, repr=False, eq=False)
    """What the actor lets callers in its own event loop use without a message, if
    anything (the executor's gate: ``flowstone.runtime.executor.Door``). Such use is
    atomic (one thread, no await inside) and must keep the actor's guarantees."""

    async def call(self, message_type: Callable[P, Message[R]], /, *args: P.args, **fields: P.kwargs) -> R:
        """Send a request and wait for its answer; errors arrive as raised errors.

        The message's fields are checked against its class by the type checker,
        and the answer is typed by the class (``Message[R]`` answers ``R``).
        """
        pending = await self.request(message_type, *args, **fields)
        return await pending.result()

    async def request(
        self, message_type: Callable[P, Message[R]], /, *args: P.args, **fields: P.kwargs
    ) -> PendingCall[R]:
        """Post a request now and read its answer later (``PendingCall.result``).

        Lets a caller ask several actors at once and pay one event-loop turn for
        all the answers instead of one turn each.
        """
        slot = _Slot()
        reply = Reply(slot)
        make: Callable[..., Message[R]] = message_type  # the reply is the one field callers do not give
        try:
            await self._post(make(*args, reply=reply, **fields))
        except BaseException:
            slot.left = True
            raise
        return PendingCall(self.name, reply, slot)

    async def cast(self, message: Message) -> None:
        """Send without waiting for an answer (no yield while the mailbox has room)."""
        await self._post(message)

    def close(self) -> None:
        """Stop accepting messages; the actor answers what is queued, then ends."""
        self._opened().close()

    def _opened(self) -> MemoryObjectSendStream[Message]:
        """The mailbox's sending end."""
        assert self._mailbox is not None, "a handle without a mailbox opens it itself"
        return self._mailbox

    def try_cast(self, message: Message) -> bool:
        """Cast if the mailbox has room right now, without a checkpoint; False if full."""
        try:
            self._opened().send_nowait(message)
        except anyio.WouldBlock:
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise RuntimeClosed(f"{self.name} is not running (the runtime is closed)") from None
        return True

    async def _post(self, message: Message) -> None:
        mailbox = self._opened()
        try:
            try:
                mailbox.send_nowait(message)
            except anyio.WouldBlock:
                await mailbox.send(message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise RuntimeClosed(f"{self.name} is not running (the runtime is closed)") from None


class Counter(Protocol):
    casts: int

    def close(self) -> None:
        """The mailbox closed: nothing more may be posted."""


@attrs.frozen
class CountedHandle(Handle):
    """A handle that counts each cast it posts in ``shared.casts``; with a serve loop
    counting each cast it takes (``serve(taken=...)``), equal counts say that no
    cast is queued or on its way to the actor. (A call's caller waits for its
    answer, so nothing it does later can overtake it.)"""

    shared: Counter = attrs.field(repr=False, eq=False)

    async def cast(self, message: Message) -> None:
        self.shared.casts += 1
        try:
            await self._post(message)
        except BaseException:
            self.shared.casts -= 1
            raise

    def try_cast(self, message: Message) -> bool:
        self.shared.casts += 1
        sent = False
        try:
            sent = Handle.try_cast(self, message)
        finally:
            if not sent:
                self.shared.casts -= 1
        return sent

    def close(self) -> None:
        Handle.close(self)
        self.shared.close()


class PendingCall(Generic[R]):
    """A request already posted; its answer is read once, or the request handed back.

    Either :meth:`result` or :meth:`abandon` must be called, once.
    """

    __slots__ = ("_actor", "_reply", "_slot")

    def __init__(self, actor: str, reply: Reply, slot: _Slot) -> None:
        self._actor = actor
        self._reply = reply
        self._slot = slot

    async def result(
        self, on_cancel: Callable[[Reply, Outcome[Any] | None], Awaitable[None]] | None = None
    ) -> R:
        """The answer; no yield at all when it has already arrived."""
        slot = self._slot
        if not slot.done:
            slot.event = event = anyio.Event()
            try:
                await event.wait()
            except anyio.get_cancelled_exc_class():
                if on_cancel is not None:
                    await self._tell(on_cancel)
                else:
                    slot.left = True
                raise
        slot.left = True
        outcome = slot.outcome
        if outcome is None:
            raise ActorCrashed(self._actor)
        value: R = outcome.unwrap()
        return value

    @property
    def ready(self) -> bool:
        """Whether the answer has come (``result`` then returns it without waiting)."""
        return self._slot.done

    def discard(self) -> None:
        """Stop listening for the answer, telling the actor nothing (idempotent)."""
        self._slot.left = True

    async def abandon(self, on_abandon: Callable[[Reply, Outcome[Any] | None], Awaitable[None]]) -> None:
        """The answer will not be used: let the actor know (shielded, bounded)."""
        await self._tell(on_abandon)

    async def _tell(self, hook: Callable[[Reply, Outcome[Any] | None], Awaitable[None]]) -> None:
        """Stop listening, then give ``hook`` the answer that came (``late``) or None:
        an answer that comes after this goes nowhere, and the actor sees that."""
        slot = self._slot
        late = slot.outcome
        slot.left = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
            await hook(self._reply, late)


def open_mailbox(
    name: str, shared: Any = None, *, counted: bool = False
) -> tuple[Handle, MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]]:
    """A handle plus both ends of its mailbox, for the supervisor to own and close;
    ``counted``: a ``CountedHandle`` (``shared`` counts the casts)."""
    send, receive = anyio.create_memory_object_stream[Message](MAILBOX_SIZE)
    return (CountedHandle(name, send, shared) if counted else Handle(name, send, shared)), send, receive


def direct_reply(actor: str) -> tuple[Reply, PendingCall[Any]]:
    """A reply and the caller's end of it, for a handler called without a message
    (through ``Handle.shared``): it answers at once or keeps the reply for later,
    as it would a message's."""
    slot = _Slot()
    reply = Reply(slot)
    return reply, PendingCall(actor, reply, slot)


Handler = Callable[[Any], Any]
Handlers = Mapping[type[Message], Handler]
"""An actor's protocol in one place: the handler of each message type it takes."""


@internal  # Ctrl-C goes to the caller's task, not into this loop
async def serve(
    name: str, mailbox: MemoryObjectReceiveStream[Message], handlers: Handlers, *,
    taken: Callable[[Message], None] | None = None,
) -> None:
    """Answer each message with the handler of its type, until the mailbox closes.

    Every actor dispatches this one way: ``handlers`` maps each message type it
    takes (exactly, not subclasses) to a handler, which returns the reply value
    (or an awaitable of it, or ``DEFERRED`` to answer later). A message of another
    type is a bug. A
    ``FlowstoneError`` it raises is the caller's answer and the actor goes on;
    any other exception is a bug: the caller gets :class:`ActorCrashed` with the
    bug as ``__cause__``, and the exception propagates so the supervisor restarts
    the actor. ``taken`` is called as each message is taken from the mailbox.
    """
    handled = 0
    while True:
        try:
            message = mailbox.receive_nowait()
        except anyio.WouldBlock:
            message = None  # waited for below, outside this handler: an idle actor
            # would otherwise keep the exception, its traceback and frame alive
        except anyio.EndOfStream:
            return
        if message is None:
            try:
                message = await mailbox.receive()
            except anyio.EndOfStream:
                return
            handled = 0
        else:
            handled += 1
            if handled % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        if taken is not None:
            taken(message)
        # Handled inline rather than in a helper coroutine: most handlers are
        # plain functions, and a coroutine per message is measurable at this rate.
        reply = message.reply
        try:
            handler = handlers.get(message.__class__)
            if handler is None:
                if message.__class__ is Crash:
                    raise CrashRequested(message.reason)
                raise TypeError(f"{name} takes no {message.__class__.__name__} message")
            result = handler(message)
            if inspect.iscoroutine(result):  # an async handler
                result = await result
        except Exception as error:
            _handle_error(name, message, error)
            continue
        if reply is not None and result is not DEFERRED:
            reply.resolve(result)


def _handle_error(name: str, message: Message, error: Exception) -> None:
    """A FlowstoneError is the caller's answer; anything else is a bug: the caller
    gets ActorCrashed and the error propagates to the supervisor."""
    reply = message.reply
    if isinstance(error, FlowstoneError):
        if reply is None:
            log.warning("%s: cast %s failed: %s", name, type(message).__name__, error)
        else:
            reply.fail(error)
        return
    if reply is not None:
        crashed = ActorCrashed(name)
        crashed.__cause__ = error
        reply.fail(crashed)
    raise error


def fail_pending(name: str, mailbox: MemoryObjectReceiveStream[Message], error: Callable[[], BaseException]) -> None:
    """Answer every message still queued with ``error()``: nobody waits forever."""
    while True:
        try:
            message = mailbox.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return
        if message.reply is not None:
            message.reply.fail(error())
        message.discard()
