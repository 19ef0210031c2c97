"""The executor actor: one per asset, the gate every materialization of it passes.

A caller asks to run a partition (``Submit``). The executor answers with:

- a :class:`Lease` when nobody is computing that partition for that tenant and a
  slot is free (the asset's ``max_concurrency``): the caller runs the job in its
  own task (``flowstone.runtime.job``) and reports ``Finished``;
- later, the leader's :class:`JobResult`, when the partition is already being
  computed: concurrent callers share one computation (single flight);
- later, a lease, when every slot is taken: callers queue in order.

A caller decides to run from a lookup made before it asks, so another caller's
job may have finished between the two steps. The store answers that, for callers
in this process and in others alike: the job asks it for the partition's lease
"unless done" (ADR 0009) and takes the success finished meanwhile instead of
computing it again.

Running the job in the caller's task, not in a task the actor spawns, is a
measured choice (ADR 0005): spawning a task costs more than everything else a
trivial materialization does, and cancelling a caller then cancels its job as
structured concurrency expects. If a leader is cancelled while others wait for
the same partition, the first of them is promoted to run it.

Runs in the runtime's own event loop do not post ``Submit`` and ``Finished``:
they call the gate directly through the handle's :class:`Door` (``submit`` and
``finish`` below). The gate's handlers are plain functions and the loop runs one
task at a time, so a direct call is as atomic as a message, and a free partition's
lease comes back with no event-loop turn: the round trip cost a 10,000-partition
backfill 38 us of its 167 per partition (ADR 0030). What must wait (a follower, a
caller queued for a slot) keeps its reply, answered when the leader finishes, as
before. While the actor restarts after a crash there is no gate: callers post
messages, which the next incarnation serves.

A crash of this actor fails every caller waiting on it (followers, queued
callers, jobs waiting for approval) with ``ActorCrashed``; jobs already running
finish in their callers' tasks. The supervisor restarts the actor.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..actors.mailbox import (
    CLEANUP_SECONDS,
    DEFERRED,
    Crash,
    Handle,
    Message,
    Outcome,
    PendingCall,
    Reply,
    direct_reply,
    serve,
)
from ..definitions import Asset
from ..errors import ActorCrashed, FlowstoneError, NotFound, RuntimeClosed
from ..io.protocol import IOManager
from ..plumbing.frozen import tuple_maker
from ..store.protocol import MaterializationStore
from ..store.records import Materialization
from .leases import LeaseKeeper
from .processes import ProcessPool
from .tracing import Tracing
from .watch import EventBus

if TYPE_CHECKING:
    from .job import BatchWriter

__all__ = [
    "AwaitApproval", "Decide", "Detach", "Door", "Env", "ExecutorStatistics", "Finished", "JobResult", "Lease",
    "Stats", "Submit", "ask", "executor_actor", "finish", "lease_now", "submit",
]

A = TypeVar("A")
R = TypeVar("R")

FlightKey = tuple[str | None, str | None]
"""(tenant, partition key)"""
Ended = tuple[FlightKey, Any, "JobResult | None", "uuid.UUID | None"]
"""A flight that ended: its key, its lease's token, the leader's result (None:
it did not end) and its record's id (``Finished``'s fields)."""


@attrs.frozen
class Env:
    """What every job needs from its runtime; shared, never changed."""

    store: MaterializationStore
    io_managers: Mapping[str, IOManager]
    default_io: str
    resources: Mapping[str, Any]
    limiter: anyio.CapacityLimiter | None
    thread_limiter: anyio.CapacityLimiter
    node: str
    """This runtime's owner id (``host:pid:random``): it owns leases and backfills, and
    its records' ``executor_node`` starts with it."""
    leases: LeaseKeeper
    processes: ProcessPool
    """Worker processes for ``executor="process"`` assets (none start until one runs)."""
    events: EventBus
    """Who watches this runtime (``rt.events``); publishers check for subscribers first."""
    tracing: Tracing | None = None
    """OpenTelemetry, when its API is installed (``flowstone.runtime.tracing``), else None."""
    writer: BatchWriter | None = None
    """Writes behind for the batches (``flowstone.runtime.job.BatchWriter``); None:
    a batch writes its ends when it has computed every job."""


class JobResult(NamedTuple):
    """The record a job left; the user's exception when it failed; the value when
    its IO manager returns stored objects as they are (so readers in the same run
    need not load it again)."""

    record: Materialization
    error: BaseException | None = None
    value: Any = None
    has_value: bool = False
    reused: bool = False
    """A success finished before this caller asked, taken instead of running."""


class Lease(NamedTuple):
    """Permission to run one partition's job; hand it back with ``Finished``."""

    token: Any


# Made once a materialization each: from every field in order (``tuple_maker``).
new_job_result = tuple_maker(JobResult)
_new_lease = tuple_maker(Lease)


@attrs.frozen(kw_only=True)
class Submit(Message["Lease | JobResult"]):
    tenant: str | None
    key: str | None


@attrs.frozen(kw_only=True)
class Finished(Message[None]):
    """The leader is done; ``result`` is ``None`` when the job was cancelled."""

    tenant: str | None
    key: str | None
    token: Any
    result: JobResult | None
    record_id: uuid.UUID | None = None


@attrs.frozen(kw_only=True)
class Detach(Message[None]):
    """A follower or queued caller stopped waiting (it was cancelled)."""

    tenant: str | None
    key: str | None
    waiter: Reply


@attrs.frozen(kw_only=True)
class AwaitApproval(Message[None]):
    """A leader waits for a decision on ``record_id``; decisions go into ``decisions``."""

    tenant: str | None
    record_id: uuid.UUID
    decisions: MemoryObjectSendStream[tuple[bool, str | None]]

    def discard(self) -> None:
        self.decisions.close()


@attrs.frozen(kw_only=True)
class Decide(Message[None]):
    tenant: str | None
    record_id: uuid.UUID
    approve: bool
    reason: str | None = None


@attrs.frozen(kw_only=True)
class Stats(Message["ExecutorStatistics"]):
    pass


@attrs.frozen
class ExecutorStatistics:
    """A snapshot of one executor: jobs running, callers sharing them, callers
    queued for a slot, and jobs waiting for approval."""

    asset: str
    in_flight: int
    followers: int
    queued: int
    awaiting_approval: int


_TOKENS = itertools.count()
"""Lease tokens, one series for every gate of the process: a token never comes
twice, so a lease from before a restart never matches a flight of the new gate
(an int, where a tuple naming the gate was one more tracked object a partition)."""


class _Gate:
    """The actor's state and behaviour for one incarnation."""

    # Slotted: a new runtime makes one for each asset of its first run, and a dict
    # for its attributes was one more object for the garbage collector to follow.
    __slots__ = ("approvals", "asset", "flights", "followers", "name", "queue", "slots")

    def __init__(self, asset: Asset) -> None:
        self.name = "executor:" + asset.name
        self.asset = asset
        self.slots = asset.max_concurrency
        self.flights: dict[FlightKey, Lease] = {}
        """Each partition running here, with the lease its leader holds."""
        self.followers: dict[FlightKey, list[Reply]] = {}
        """Callers waiting for a flight's result, for the flights that have some (a
        list per flight, and an object holding both, were two more objects a job)."""
        self.queue: deque[tuple[FlightKey, Reply]] | tuple[()] = ()
        """Callers waiting for a slot (a deque once the first one waits: most gates
        never have a slot limit, and a new runtime makes a gate for each asset)."""
        self.approvals: dict[tuple[str | None, uuid.UUID], MemoryObjectSendStream[tuple[bool, str | None]]] = {}

    def dispatch(self) -> dict[type[Message], Callable[[Any], Any]]:
        """The handler of each message, for the actor's task (made when it starts: a
        run's callers use the gate directly, and most executors never get a message)."""
        return {
            Submit: self.submit, Finished: self.finished, Detach: self.detach,
            AwaitApproval: self.await_approval, Decide: self.decide, Stats: self.stats,
        }

    def stats(self, _message: Stats) -> ExecutorStatistics:
        return ExecutorStatistics(
            asset=self.asset.name,
            in_flight=len(self.flights),
            followers=sum(len(waiting) for waiting in self.followers.values()),
            queued=len(self.queue),
            awaiting_approval=len(self.approvals),
        )

    def submit(self, message: Submit) -> Any:
        assert message.reply is not None
        key = (message.tenant, message.key)
        if key in self.flights:
            self.follow(key, message.reply)
        elif self.slots is not None and len(self.flights) >= self.slots:
            queue = self.queue
            if not isinstance(queue, deque):
                queue = self.queue = deque()
            queue.append((key, message.reply))
        else:
            self.grant(key, message.reply)
        return DEFERRED

    def follow(self, key: FlightKey, reply: Reply) -> None:
        waiting = self.followers.get(key)
        if waiting is None:
            self.followers[key] = [reply]
        else:
            waiting.append(reply)

    def lease_now(self, key: FlightKey) -> Lease | None:
        """A lease of ``key`` when ``submit`` would grant it at once (no flight of it,
        a slot free), without a reply to answer; None otherwise."""
        if key in self.flights or (self.slots is not None and len(self.flights) >= self.slots):
            return None
        return self.lease(key)

    def lease(self, key: FlightKey, followers: list[Reply] | None = None) -> Lease:
        lease = self.flights[key] = _new_lease((next(_TOKENS),))
        if followers:
            self.followers[key] = followers
        return lease

    def grant(self, key: FlightKey, reply: Reply, followers: list[Reply] | None = None) -> None:
        """Lease ``key`` to ``reply``'s caller. A caller that left meanwhile (it was
        cancelled) cannot run it or give it back: the next follower gets it, and
        with none left the flight ends here."""
        while not reply.resolve(self.lease(key, followers)):
            del self.flights[key]
            waiting = self.followers.pop(key, None)
            if not waiting:
                return
            reply, *followers = waiting

    def finished(self, message: Finished) -> None:
        self.end(((message.tenant, message.key), message.token, message.result, message.record_id))

    def end(self, ended: Ended) -> None:
        """A flight's leader is done (``Finished``'s fields, as ``finish`` hands them
        over directly): its followers get its result, the next queued caller its slot."""
        key, token, result, record_id = ended
        if record_id is not None:
            stale = self.approvals.pop((key[0], record_id), None)
            if stale is not None:
                stale.close()
        lease = self.flights.get(key)
        if lease is None or lease.token != token:
            return None  # a lease from before a restart
        del self.flights[key]
        waiting = self.followers.pop(key, None)
        if waiting:
            if result is None:
                promoted, *rest = waiting  # the leader was cancelled: the next one runs it
                self.grant(key, promoted, rest)
            else:
                for follower in waiting:
                    follower.resolve(result)
        self.grant_queued()
        return None

    def grant_queued(self) -> None:
        queue = self.queue
        while queue and (self.slots is None or len(self.flights) < self.slots):
            assert isinstance(queue, deque)  # not the empty tuple: it has callers
            key, reply = queue.popleft()
            if key in self.flights:
                self.follow(key, reply)
            else:
                self.grant(key, reply)

    def detach(self, message: Detach) -> None:
        key = (message.tenant, message.key)
        waiting = self.followers.get(key)
        if waiting is not None and message.waiter in waiting:
            waiting.remove(message.waiter)
            if not waiting:
                del self.followers[key]
        elif isinstance(self.queue, deque) and (key, message.waiter) in self.queue:
            self.queue.remove((key, message.waiter))
        message.waiter.close()

    def await_approval(self, message: AwaitApproval) -> None:
        self.approvals[(message.tenant, message.record_id)] = message.decisions

    def decide(self, message: Decide) -> None:
        decisions = self.approvals.pop((message.tenant, message.record_id), None)
        if decisions is None:
            raise NotFound(
                f"no materialization {str(message.record_id)!r} is waiting for approval here",
                asset=self.asset.name,
            )
        with decisions:
            try:
                decisions.send_nowait((message.approve, message.reason))
            except (anyio.BrokenResourceError, anyio.WouldBlock):
                raise NotFound(
                    f"materialization {str(message.record_id)!r} stopped waiting for approval",
                    asset=self.asset.name,
                ) from None

    def fail_waiters(self, error: Callable[[], FlowstoneError]) -> None:
        """Answer everyone still waiting on this incarnation (a no-op for replies
        already answered): followers and callers queued for a slot."""
        for waiting in self.followers.values():
            for follower in waiting:
                follower.fail(error())
        for _key, reply in self.queue:
            reply.fail(error())

    def crashed(self, error: BaseException) -> None:
        """Fail everyone who waits on this incarnation: nobody hangs on a dead actor.

        Approval streams are closed by the incarnation's finally: the waiting
        leader sees the end of the stream and fails its job with ActorCrashed.
        """

        def boxed() -> FlowstoneError:
            crash = ActorCrashed(self.name, asset=self.asset.name)
            crash.__cause__ = error
            return crash

        self.fail_waiters(boxed)


class Door:
    """The executor's current gate, for callers in the runtime's event loop (the
    handle's ``shared``). The first incarnation's gate is made with the door, so the
    first run of a new executor need not wait for its task to begin either."""

    __slots__ = ("asset", "gate")

    def __init__(self, asset: Asset) -> None:
        self.asset = asset
        self.gate: _Gate | None = _Gate(asset)

    async def __call__(self, mailbox: MemoryObjectReceiveStream[Message]) -> None:
        """The executor's incarnation (``executor_actor``): serve ``mailbox`` with the
        current gate, or a new one after a crash."""
        gate = self.gate if self.gate is not None else _Gate(self.asset)
        self.gate = gate  # before any await: direct callers and messages see one gate
        try:
            await serve(gate.name, mailbox, gate.dispatch())
        except Exception as error:
            gate.crashed(error)
            raise
        finally:
            if self.gate is gate:
                self.gate = None
            # Whatever ended this incarnation (a crash was answered above; a
            # shutdown is answered here), nobody may wait on it forever.
            gate.fail_waiters(lambda: RuntimeClosed(f"{gate.name} stopped"))
            for decisions in gate.approvals.values():
                decisions.close()

    def call(self, executor: Handle, handler: Callable[[_Gate, A], R], argument: A) -> R:
        """``handler(gate, argument)`` (a method of the gate: no closure to make per
        call), or ActorCrashed when it fails as a bug would: then the
        gate's waiters are failed, and ``executor`` (the actor) is told to crash, so
        its supervisor starts it again with a new gate (as a bug in a message does)."""
        gate = self.gate
        assert gate is not None
        try:
            return handler(gate, argument)
        except Exception as error:
            self.gate = None
            gate.crashed(error)
            executor.try_cast(Crash(reason="its gate failed a direct call"))
            raise ActorCrashed(gate.name, asset=self.asset.name) from error


def lease_now(executor: Handle, tenant: str | None, key: str | None) -> Lease | None:
    """The lease ``submit`` would answer at once, taken straight from the gate: for
    a partition nobody here runs, when a slot is free and the gate is up; None
    otherwise (then ``submit``). A batch asks this for each of its partitions, and
    the reply, the pending call and the message ``submit`` makes were a tenth of
    what the batch spent on a partition outside its store and function."""
    door = executor.shared
    if door is None or door.gate is None:
        return None
    return door.call(executor, _Gate.lease_now, (tenant, key))


async def submit(executor: Handle, tenant: str | None, key: str | None) -> PendingCall[Lease | JobResult]:
    """Ask ``executor`` to run partition ``key``: the answer is there at once when
    the gate is up and the partition is free, else later (see ``Submit``). Only
    from the runtime's event loop, as every run is: the gate is not thread-safe."""
    lease = lease_now(executor, tenant, key)
    if lease is not None:  # the usual answer, without a reply and a message to carry it
        return Granted(executor.name, lease)
    return await ask(executor, tenant, key)


async def ask(executor: Handle, tenant: str | None, key: str | None) -> PendingCall[Lease | JobResult]:
    """``submit`` once ``lease_now`` said no: a reply to wait on, from the gate
    directly or, while the gate is down, by message."""
    door = executor.shared
    if door is None or door.gate is None:
        return await executor.request(Submit, tenant=tenant, key=key)
    reply, pending = direct_reply(executor.name)
    door.call(executor, _Gate.submit, Submit(tenant=tenant, key=key, reply=reply))
    return pending


class Granted(PendingCall[Any]):
    """A ``submit`` the gate answered at once with a lease (``lease_now``): what a
    run of a chain gets for each asset, with no reply, slot or message made."""

    __slots__ = ("_lease",)

    def __init__(self, actor: str, lease: Lease) -> None:
        self._actor, self._lease = actor, lease

    async def result(self, on_cancel: Any = None) -> Any:
        return self._lease

    @property
    def ready(self) -> bool:
        return True

    def discard(self) -> None:
        raise AssertionError("a granted lease is handed back (abandon), never dropped")

    async def abandon(self, on_abandon: Any) -> None:
        """Hand the lease back through ``on_abandon`` as an answer that came (``hand_back``)."""
        waiter, _pending = direct_reply(self._actor)  # what the hook closes if the executor is gone
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
            await on_abandon(waiter, Outcome(self._lease))


def finish(
    executor: Handle, tenant: str | None, key: str | None, token: Any, result: JobResult | None
) -> Finished | None:
    """Hand the lease back with the job's result (None: it did not end): straight to
    the gate, without a message, while the gate is up; else as ``Finished``. None
    once done; the message when the mailbox is full (the gate is down and the
    message could not be posted without waiting)."""
    record_id = result.record.id if result is not None else None
    door = executor.shared
    if door is None or door.gate is None:
        finished = Finished(tenant=tenant, key=key, token=token, result=result, record_id=record_id)
        return None if executor.try_cast(finished) else finished
    try:
        door.call(executor, _Gate.end, ((tenant, key), token, result, record_id))
    except ActorCrashed:
        pass  # the lease went with the gate, and its followers were told: nothing to hand back
    return None


def executor_actor(asset: Asset, door: Door | None = None) -> Any:
    """The incarnation the supervisor restarts for ``asset``; ``door`` is the one on
    its handle, when callers may reach the gate directly. (The door itself, which
    is callable: a new runtime makes one for each asset of its first run, and a
    closure was a function and a cell for each variable it keeps.)"""
    return door if door is not None else Door(asset)
