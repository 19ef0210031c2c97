"""The current tenant, carried task-locally in a context variable.

A tenant is never a global: ``tenant_scope`` sets it for one block of one task (and
the tasks that block starts, which copy the context when they are spawned), and
restores the previous value on the way out, also when the block raises. Stores and
IO managers read :func:`current_tenant` at the moment they touch data, so scoping
is decided where the data is, never passed around by hand (docs/adr/0003).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import InvalidTenant

__all__ = ["MAX_TENANT_LENGTH", "current_tenant", "tenant_scope", "validate_tenant"]

MAX_TENANT_LENGTH = 128

_current: ContextVar[str | None] = ContextVar("flowstone.tenant", default=None)


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` if it is a usable tenant id, else raise :class:`InvalidTenant`.

    A tenant id is a string of 1 to 128 characters with no control characters
    (which would corrupt logs, keys and SQL settings) and no surrounding white
    space (which would make ``"acme"`` and ``"acme "`` two tenants by accident).
    """
    if not isinstance(tenant, str):
        raise InvalidTenant(f"tenant id must be a str, got {type(tenant).__name__}: {tenant!r}")
    if not tenant:
        raise InvalidTenant("tenant id is empty")
    if len(tenant) > MAX_TENANT_LENGTH:
        raise InvalidTenant(
            f"tenant id is {len(tenant)} characters long; the limit is {MAX_TENANT_LENGTH}: "
            f"{tenant[:32]!r}..."
        )
    for index, char in enumerate(tenant):
        # Cc: control characters; Cs: lone surrogates, which no store can encode.
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidTenant(
                f"tenant id {tenant!r} has a control character {char!r} at position {index}"
            )
    if tenant != tenant.strip():
        raise InvalidTenant(f"tenant id {tenant!r} has leading or trailing white space")
    return tenant


def current_tenant() -> str | None:
    """The tenant of the current task, or ``None`` outside any ``tenant_scope``."""
    return _current.get()


@contextmanager
def tenant_scope(tenant: str) -> Iterator[str]:
    """Make ``tenant`` the current tenant for the block (task-local, nestable).

    ``with fs.tenant_scope("acme"):`` — everything the block reads and writes is
    scoped to ``acme``. The id is validated before the block starts: an empty,
    over-long (more than 128 characters) or control-character id raises
    :class:`~flowstone.InvalidTenant`.
    """
    token = _current.set(validate_tenant(tenant))
    try:
        yield tenant
    finally:
        _current.reset(token)
