"""``fs.store.MemoryStore``: records held by the memory-store actor."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any


from ..actors import memory as m
from ..actors.client import MemoryActorClient
from ..partitions import serialize_partition
from ..tenancy import current_tenant
from .records import Materialization, Status, check_limit, check_transition, evolve, new_record, parse_id, to_status, update_fields

__all__ = ["MemoryStore"]


class MemoryStore(MemoryActorClient):
    """The reference store: fast, in memory, lost when the process ends.

    ``create`` is a cast: it returns the record without waiting for the actor,
    and the mailbox's order makes it visible to every later call.
    """

    async def create(self, **fields: Any) -> Materialization:
        record = new_record(fields, current_tenant(), m.utcnow())
        await self.handle.cast(m.Create(record=record))
        return record

    async def get(self, asset_name: str, partition: Any = None) -> Materialization:
        return await self.handle.call(
            m.Latest, tenant=current_tenant(), asset=asset_name, partition=serialize_partition(partition)
        )

    async def get_by_id(self, id: uuid.UUID | str) -> Materialization:
        return await self.handle.call(m.ById, tenant=current_tenant(), id=parse_id(id))

    async def get_by_run_id(self, run_id: uuid.UUID | str) -> list[Materialization]:
        return await self.handle.call(m.ByRun, tenant=current_tenant(), run_id=parse_id(run_id, "run"))

    async def update_status(self, id: uuid.UUID | str, status: Status | str, **fields: Any) -> Materialization:
        return await self.handle.call(
            m.Update, tenant=current_tenant(), id=parse_id(id), status=to_status(status), fields=update_fields(fields)
        )

    async def complete(self, record: Materialization, status: Status, **fields: Any) -> Materialization:
        """The runtime's own transition of a record it holds the lease for: checked
        here, written behind (a cast); later calls see it, in mailbox order."""
        check_transition(record.status, status, record)
        new = evolve(record, status=status, updated_at=m.utcnow(), **update_fields(fields))
        await self.handle.cast(m.Replace(record=new, expected=record.status))
        return new

    async def exists(self, asset_name: str, partition: Any = None) -> bool:
        return await self.handle.call(
            m.Exists, tenant=current_tenant(), asset=asset_name, partition=serialize_partition(partition)
        )

    async def list_by_status(self, status: Status | str, *, limit: int = 100) -> list[Materialization]:
        return await self.handle.call(m.ByStatus, tenant=current_tenant(), status=to_status(status), limit=check_limit(limit))

    async def list_all(self, *, asset_name: str | None = None, limit: int = 1000) -> list[Materialization]:
        return await self.handle.call(m.All, tenant=current_tenant(), asset=asset_name, limit=check_limit(limit))

    async def latest_successes(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], Materialization]:
        return await self.handle.call(m.LatestSuccesses, tenant=current_tenant(), pairs=tuple(pairs))

    async def partitions_of(self, asset_name: str) -> dict[str | None, Materialization]:
        return await self.handle.call(m.AllPartitions, tenant=current_tenant(), asset=asset_name)

    async def mark_stale(self, asset_name: str, partition: str | None) -> None:
        await self.handle.cast(m.MarkStale(tenant=current_tenant(), asset=asset_name, partition=partition))

    async def save_backfill(self, id: uuid.UUID, state: Any) -> None:
        await self.handle.cast(m.SaveBackfill(tenant=current_tenant(), id=id, state=state))

    async def load_backfill(self, id: uuid.UUID) -> Any:
        return await self.handle.call(m.LoadBackfill, tenant=current_tenant(), id=id)
