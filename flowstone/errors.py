"""The one error root of FlowStone.

Everything public raises a :class:`FlowstoneError` subclass. Each error keeps the
asset, partition and tenant it concerns as attributes *and* names them in its
message, so a log line alone tells an operator where to look.

Where a Python built-in category fits (a malformed partition *is* a bad value, a
missing record *is* a failed lookup) the error also derives from that built-in, so
code written against ``ValueError`` or ``LookupError`` keeps working. ``KeyError``
is avoided on purpose: its ``str()`` wraps the message in quotes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .definitions import FieldError

__all__ = [
    "AccessDenied",
    "ActorCrashed",
    "AssetTimeout",
    "BackfillNotFound",
    "BackfillOwned",
    "CycleError",
    "DatabaseError",
    "DatabaseUnavailable",
    "DefinitionError",
    "FlowstoneError",
    "InvalidIdentifier",
    "InvalidPartition",
    "InvalidTenant",
    "InvalidTransition",
    "LeaseLost",
    "MaterializationFailed",
    "NotFound",
    "RuntimeClosed",
    "SerializationError",
    "StorageError",
    "StorageUnavailable",
    "TenancyNotEnforced",
    "WorkerJobFailed",
]

class FlowstoneError(Exception):
    """Root of every error FlowStone raises on purpose.

    ``asset``, ``partition`` and ``tenant`` are ``None`` when they do not apply.
    The message is built once, here, so every subclass names them the same way.
    """

    def __init__(
        self,
        message: str,
        *,
        asset: str | None = None,
        partition: Any = None,
        tenant: str | None = None,
    ) -> None:
        self.message = message
        self.asset = asset
        self.partition = partition
        self.tenant = tenant
        super().__init__(_with_context(message, asset, partition, tenant))


def _with_context(message: str, asset: Any, partition: Any, tenant: Any) -> str:
    parts = []
    if asset is not None:
        parts.append(f"asset={asset!r}")
    if partition is not None:
        parts.append(f"partition={_partition_repr(partition)}")
    if tenant is not None:
        parts.append(f"tenant={tenant!r}")
    if message.endswith("]") and " [" in message:
        # The message already ends with context (an inner error's text): name only
        # what it does not, so a wrapped error never reads "[asset='x'] [asset='x']".
        said = message[message.rindex(" [") + 2:-1].split(", ")
        parts = [part for part in parts if part not in said]
    return f"{message} [{', '.join(parts)}]" if parts else message


def _partition_repr(partition: Any) -> str:
    # A partition is shown in its string form when it has one, so the message
    # matches what is stored in records and what the CLI accepts.
    from .partitions import serialize_partition

    try:
        return repr(serialize_partition(partition))
    except FlowstoneError:
        return repr(partition)


class DefinitionError(FlowstoneError, ValueError):
    """An asset or pipeline definition is invalid: FlowStone's compile error.

    ``errors`` holds every :class:`~flowstone.FieldError` found, so one run shows
    every problem instead of the first.
    """

    def __init__(
        self,
        errors: Sequence[FieldError] | str,
        *,
        asset: str | None = None,
        partition: Any = None,
        tenant: str | None = None,
    ) -> None:
        from .definitions import FieldError

        if isinstance(errors, str):
            errors = [FieldError(field="definition", message=errors, asset=asset)]
        self.errors: list[FieldError] = list(errors)
        if len(self.errors) == 1:
            message = f"invalid definition: {self.errors[0]}"
        else:
            lines = "".join(f"\n  - {e}" for e in self.errors)
            message = f"{len(self.errors)} problems in definition:{lines}"
        super().__init__(message, partition=partition, tenant=tenant)
        # Each FieldError line already names its asset; keep it as an attribute
        # without repeating it in the message.
        named = {e.asset for e in self.errors}
        self.asset = asset if asset is not None else (named.pop() if len(named) == 1 else None)


class CycleError(DefinitionError):
    """The dependency graph has a cycle; ``cycle`` lists the names on one of them.

    The list is in dependency order and does not repeat its first name: for
    ``a -> b -> a`` it is ``["a", "b"]``; a self-loop gives ``["a"]``. ``errors``
    carries every problem found alongside, cycles and others.
    """

    def __init__(
        self, cycle: Sequence[str], errors: Sequence[FieldError] | None = None
    ) -> None:
        from .definitions import FieldError

        self.cycle = list(cycle)
        if errors is None:
            errors = [
                FieldError(
                    field="depends_on",
                    message=f"dependency cycle: {format_cycle(self.cycle)}",
                    asset=self.cycle[0] if self.cycle else None,
                )
            ]
        super().__init__(errors)


def format_cycle(cycle: Sequence[str]) -> str:
    """``["a", "b"]`` -> ``"a -> b -> a"``: the loop spelled out so it reads as one."""
    return " -> ".join([*cycle, cycle[0]]) if cycle else "(empty)"


class InvalidPartition(FlowstoneError, ValueError):
    """A partition value or key is malformed, of the wrong kind, or out of range."""


class InvalidTenant(FlowstoneError, ValueError):
    """A tenant id is empty, too long, not a string, or holds control characters."""


class InvalidIdentifier(FlowstoneError, ValueError):
    """A name that would reach SQL or a storage path is outside the allowed pattern."""


class SerializationError(FlowstoneError, TypeError):
    """A value cannot be held by the chosen format (names the asset and the type)."""


class NotFound(FlowstoneError, LookupError):
    """A record, value or asset that was asked for does not exist."""


class BackfillNotFound(NotFound):
    """No backfill has the given id."""

    def __init__(self, backfill_id: Any, *, tenant: str | None = None) -> None:
        self.backfill_id = backfill_id
        super().__init__(f"no backfill with id {str(backfill_id)!r}", tenant=tenant)


class BackfillOwned(FlowstoneError):
    """A backfill is still driven by a live process (its owner's heartbeat is recent),
    so it cannot be resumed here. ``owner`` names that process, ``last_seen`` is its
    last heartbeat. Cancel it there, or wait until it stops or its heartbeat is stale."""

    def __init__(self, backfill_id: Any, owner: str, last_seen: Any, *, tenant: str | None = None) -> None:
        self.backfill_id = backfill_id
        self.owner = owner
        self.last_seen = last_seen
        seen = last_seen.isoformat(timespec="seconds") if hasattr(last_seen, "isoformat") else str(last_seen)
        super().__init__(
            f"backfill {str(backfill_id)!r} is still running in {owner} (last seen {seen}); "
            "cancel it there, or resume it once that process has stopped",
            tenant=tenant,
        )


class LeaseLost(FlowstoneError):
    """This process no longer holds the lease it worked under: it expired and another
    process took the work over, so this process's record and value writes are refused
    (the other process's result stands)."""


class WorkerJobFailed(FlowstoneError):
    """A partition sent to ``flowstone worker`` processes got no outcome there: its job
    failed in the queue (a worker refused its tenant, does not know the asset, or
    broke) or disappeared without having run, each time it was sent. (An asset that
    fails on a worker is ``MaterializationFailed``, with the record's error.)"""


class AssetTimeout(FlowstoneError, TimeoutError):
    """The asset's function was still running after its ``timeout`` seconds: it was
    cancelled and the materialization failed. (A plain function in a worker thread
    cannot be stopped: the runtime stops waiting and the thread finishes on its own.)"""

    def __init__(
        self, seconds: float, *, executor: str, asset: str | None = None, partition: Any = None,
        tenant: str | None = None,
    ) -> None:
        self.seconds = seconds
        left = "; its thread runs on until the function returns (threads cannot be stopped)" \
            if executor == "thread" else ""
        super().__init__(
            f"still running after its timeout of {seconds:g}s: cancelled{left}",
            asset=asset, partition=partition, tenant=tenant,
        )


class AccessDenied(FlowstoneError):
    """The guard refused ``action`` on ``asset`` for ``tenant`` (or raised: fail closed)."""

    def __init__(
        self, asset: str, action: str, tenant: str | None, *, reason: str | None = None
    ) -> None:
        self.action = action
        self.reason = reason
        message = f"access denied: {action}"
        if reason:
            message = f"{message} ({reason})"
        super().__init__(message, asset=asset, tenant=tenant)


class InvalidTransition(FlowstoneError):
    """A status change that the status machine does not allow, or that lost a race."""

    def __init__(
        self,
        current: Any,
        requested: Any,
        *,
        asset: str | None = None,
        partition: Any = None,
        tenant: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.current = current
        self.requested = requested
        message = f"cannot move from {_status_name(current)} to {_status_name(requested)}"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message, asset=asset, partition=partition, tenant=tenant)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


class MaterializationFailed(FlowstoneError):
    """A materialization failed; ``result`` is the run's partial result.

    The user's exception, when there is one, is the ``__cause__``.
    """

    def __init__(
        self,
        asset: str,
        partition: Any = None,
        result: Any = None,
        *,
        tenant: str | None = None,
        error: str | None = None,
    ) -> None:
        self.result = result
        self.error = error
        message = "materialization failed"
        if error:
            message = f"{message}: {error}"
        super().__init__(message, asset=asset, partition=partition, tenant=tenant)


class ActorCrashed(FlowstoneError):
    """An actor died while a caller waited on it; the crash is the ``__cause__``.

    Also what a runtime fails with when one actor crashes too often to restart.
    """

    def __init__(
        self,
        actor: str,
        *,
        detail: str | None = None,
        asset: str | None = None,
        partition: Any = None,
        tenant: str | None = None,
    ) -> None:
        self.actor = actor
        message = f"actor {actor!r} crashed"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message, asset=asset, partition=partition, tenant=tenant)


class RuntimeClosed(FlowstoneError):
    """The runtime (or the actor asked) is no longer running."""


class DatabaseError(FlowstoneError):
    """The database refused or failed an operation (``sqlstate`` says how, when known)."""

    def __init__(self, message: str, *, sqlstate: str | None = None, **context: Any) -> None:
        self.sqlstate = sqlstate
        super().__init__(message, **context)


class DatabaseUnavailable(DatabaseError, ConnectionError):
    """The database could not be reached, or kept dropping the connection past the retries."""


class TenancyNotEnforced(DatabaseError):
    """A tenant is in use but the connection bypasses row-level security (a superuser
    or BYPASSRLS role), so the database would not keep tenants apart."""


class StorageError(FlowstoneError):
    """Object or file storage refused or failed an operation. ``code`` is the
    storage's own error code when it gave one (an S3 code such as ``AccessDenied``
    or ``NoSuchBucket``, an errno name such as ``ENOSPC``). ``transient`` is the
    storage adapter's answer to "may trying again help?" (a server restarting or
    throttling: yes; access denied: no); the runtime retries only those."""

    transient: bool = False

    def __init__(
        self, message: str, *, code: str | None = None, transient: bool | None = None, **context: Any
    ) -> None:
        self.code = code
        if transient is not None:
            self.transient = transient
        super().__init__(f"{message} [{code}]" if code else message, **context)


class StorageUnavailable(StorageError, ConnectionError):
    """The storage could not be reached (connection refused or dropped, timed out)."""

    transient = True


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one real error inside a task group's ``ExceptionGroup``, so that callers
    get the FlowStone error they can ``except`` (leaving out the cancellations the
    first failure caused); the group itself when it holds several real errors."""
    import anyio

    leaves = list(_leaves(group))
    real = [e for e in leaves if not isinstance(e, anyio.get_cancelled_exc_class())]
    if len(real) == 1:
        return real[0]
    flowstone = [e for e in real if isinstance(e, FlowstoneError)]
    return flowstone[0] if len(flowstone) == 1 else group


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
