"""The runtime's side of leases: which ones it holds, renewed together.

Jobs take a lease from the store when they start (``store.begin``) and hand it in
with their last record write. Meanwhile the :class:`LeaseKeeper` renews every lease
the runtime holds, a third of the lease's duration apart, in one store call per
tenant: a job pays no task and no round trip of its own for renewal.

The keeper also knows until when each lease is surely still ours: the moment the
grant or the last renewal was *asked for*, plus the lease's duration. The store
measures expiry from later (when it received the request), so no other process
can have taken a lease over before that moment. A job checks it before writing its
value; a lease that was lost, or that the store could not renew for most of its
duration, stops the job with ``LeaseLost`` before it writes anything (ADR 0009).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..errors import FlowstoneError, LeaseLost
from ..plumbing.interrupts import internal
from ..store.leases import Lease, lost
from ..tenancy import tenant_scope

__all__ = ["LEASE_SECONDS", "LeaseKeeper"]

log = logging.getLogger("flowstone.runtime")

LEASE_SECONDS = 30.0
"""How long a lease lasts unless renewed: how long others wait for a process that
died mid-job before they take its work over."""

SAFETY = 0.25
"""A value is written only while at least this share of the lease's duration is surely left."""


class _Held:
    __slots__ = ("ending", "lease", "lost", "valid_until")

    def __init__(self, lease: Lease, valid_until: float) -> None:
        self.lease = lease
        self.valid_until = valid_until
        self.lost = False
        self.ending = False
        """Its job is writing its last record, which releases it in the store."""


class LeaseKeeper:
    """Every lease one runtime holds; ``run`` renews them until cancelled."""

    def __init__(self, store: Any, owner: str, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.owner = owner
        self.seconds = seconds
        self.clock = clock
        self.held: dict[int, _Held] = {}
        self._stopping: anyio.Event | None = None

    def close(self) -> None:
        """Let go of the store and the leases once ``run`` has ended (its runtime closed).
        anyio keeps a cancelled task's exception in a reference cycle, and with it the
        task's frames: had ``run`` been cancelled (``stop`` came while it renewed), its
        ``self``, and through it the store's data, would wait for the garbage collector."""
        self.store = None
        self.held.clear()

    def hold(self, lease: Lease, asked_at: float) -> None:
        self.held[lease.fence] = _Held(lease, asked_at + self.seconds)

    def ending(self, lease: Lease) -> None:
        """The job's last write, which releases ``lease`` in the store, is on its way:
        a renewal that no longer finds it there is not a takeover."""
        held = self.held.get(lease.fence)
        if held is not None:
            held.ending = True

    def drop(self, lease: Lease) -> None:
        self.held.pop(lease.fence, None)

    def check(self, lease: Lease) -> None:
        """Raise ``LeaseLost`` unless ``lease`` is surely ours for a while yet."""
        held = self.held.get(lease.fence)
        if held is None or held.lost:
            raise lost(lease)
        if held.valid_until - self.clock() < self.seconds * SAFETY:
            raise lost(lease, f"it could not be renewed for {self.seconds * (1 - SAFETY):.0f}s")

    @internal  # Ctrl-C goes to the caller's task, not into this loop
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew every third of the lease's duration until cancelled, or until ``stop``."""
        stopping = self._stopping = anyio.Event()
        task_status.started()
        while True:
            with anyio.move_on_after(self.seconds / 3):
                await stopping.wait()
            if stopping.is_set():
                return
            await self.renew()

    def stop(self) -> None:
        """End ``run`` at its next wake-up, by returning: a runtime stops it so before
        cancelling its other tasks (see ``close``)."""
        if self._stopping is not None:
            self._stopping.set()

    async def renew(self) -> None:
        """Renew every lease held now, one store call per tenant."""
        by_tenant: dict[str | None, list[_Held]] = {}
        for held in list(self.held.values()):
            if not held.lost:
                by_tenant.setdefault(held.lease.tenant, []).append(held)
        for tenant, leases in by_tenant.items():
            asked = self.clock()
            try:
                with tenant_scope(tenant) if tenant is not None else nullcontext():
                    kept = await self.store.renew_leases(self.owner, [h.lease.fence for h in leases], self.seconds)
            except FlowstoneError as error:
                log.warning("could not renew %d leases of tenant %r: %s", len(leases), tenant, error)
                continue
            for held in leases:
                if held.lease.fence in kept:
                    held.valid_until = asked + self.seconds
                elif self.held.get(held.lease.fence) is held and not held.ending:  # not released: taken over
                    held.lost = True
                    log.warning("%s", LeaseLost(
                        "lease lost: another process took this partition over",
                        asset=held.lease.asset, partition=held.lease.partition, tenant=tenant,
                    ))
