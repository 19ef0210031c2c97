"""A lazily opened asyncpg pool that runs every unit of work as its tenant.

``Database.run(tenant, fn, *args)`` acquires a connection, opens a transaction,
sets ``flowstone.tenant_id`` for that transaction only (``set_config(..., true)``;
the row-level security policies read it), runs ``fn(connection, *args)`` and
commits. A connection the server drops (``pg_terminate_backend``, a restart) is
retried on a fresh one a few times; the work functions are written so that a
retry of a transaction whose COMMIT may or may not have landed changes nothing
twice. Postgres errors come out as ``DatabaseError`` subclasses.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from ..errors import DatabaseError, DatabaseUnavailable, FlowstoneError, TenancyNotEnforced
from ..plumbing.bridge import Bridge, LoopBound
from ..plumbing.closeable import Closeable

__all__ = ["Database", "PostgresClient"]

T = TypeVar("T")
log = logging.getLogger("flowstone.postgres")

RETRIES = 3
RETRY_DELAY = 0.05
"""First pause before retrying a dropped connection, doubling each time."""
CONNECT_TIMEOUT = 10.0


def _connection_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        asyncpg.PostgresConnectionError,  # class 08
        asyncpg.exceptions.OperatorInterventionError,  # class 57: admin shutdown, terminated backend
        asyncpg.InterfaceError,  # "connection is closed", a connection lost mid-operation
        # "cannot switch to state ...": what asyncpg says when the server dropped
        # the connection under an operation (connections are never shared here).
        asyncpg.exceptions.InternalClientError,
        ConnectionError,
        OSError,
        asyncio.TimeoutError,
    )


class Database:
    """One pool (made lazily on first use, or the caller's own), and the tenant's transactions."""

    def __init__(
        self,
        dsn: str | None = None,
        pool: Any = None,
        *,
        min_size: int = 1,
        max_size: int = 10,
        allow_bypass_rls: bool = False,
        retries: int = RETRIES,
    ) -> None:
        if dsn is None and pool is None:
            raise DatabaseError("give a PostgreSQL dsn or an asyncpg pool")
        self.dsn = dsn
        self._given_pool = pool
        self._own_pool: LoopBound[Any] = LoopBound(self._open_pool, _close_pool, _terminate)
        self.min_size, self.max_size = min_size, max_size
        self.allow_bypass_rls = allow_bypass_rls
        self.retries = retries
        self.bypasses_rls: bool | None = None
        self.bridge = Bridge(on_close=self._own_pool.close)
        self._arrays = _ArrayTypes()

    # ------------------------------------------------------------ public

    async def run(self, tenant: str | None, fn: Callable[..., Awaitable[T]], *args: Any, by_key: bool = False) -> T:
        """``fn(connection, *args)`` in one transaction as ``tenant``, retried on a dropped connection.

        ``by_key``: every statement of ``fn`` finds its rows by key (the batches of
        record writes): the transaction plans them without table scans, and each
        connection plans each of them once (see ``_begin_as``)."""
        return await self.bridge.run(self._run, tenant, fn, args, by_key)

    async def run_plain(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(connection, *args)`` on a pooled connection, outside any tenant (DDL, migrations)."""
        return await self.bridge.run(self._run_plain, fn, args)

    async def close(self) -> None:
        await self.bridge.close()

    # ------------------------------------------------------ asyncio side

    async def _run(
        self, tenant: str | None, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], by_key: bool = False
    ) -> T:
        pool = await self._get_pool()
        if tenant is not None and self.bypasses_rls and not self.allow_bypass_rls:
            raise TenancyNotEnforced(
                "the PostgreSQL role bypasses row-level security (superuser or BYPASSRLS), so tenants "
                "would not be kept apart; connect as a plain role, or pass allow_bypass_rls=True to accept it",
                tenant=tenant,
            )
        errors = _connection_errors()
        for attempt in range(self.retries + 1):
            try:
                async with pool.acquire() as connection:
                    try:
                        if by_key:
                            await self._arrays.teach(connection)
                        await connection.execute(_begin_as(tenant or "", by_key))
                        try:
                            result = await fn(connection, *args)
                        except BaseException:
                            if connection.is_in_transaction():
                                await connection.execute("ROLLBACK")
                            raise
                        await connection.execute("COMMIT")
                        return result
                    except errors:
                        _discard(connection)  # never handed out again: the pool opens a new one
                        raise
            except FlowstoneError:
                raise
            except errors as error:
                if attempt == self.retries:
                    raise DatabaseUnavailable(
                        f"PostgreSQL connection lost {attempt + 1} times in a row: {error}", tenant=tenant
                    ) from error
                log.warning("PostgreSQL connection lost (%s); retrying on a new one", error)
                await asyncio.sleep(RETRY_DELAY * 2**attempt)
            except Exception as error:
                raise _database_error(error, tenant) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run_plain(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        pool = await self._get_pool()
        try:
            async with pool.acquire() as connection:
                return await fn(connection, *args)
        except FlowstoneError:
            raise
        except _connection_errors() as error:
            raise DatabaseUnavailable(f"PostgreSQL connection failed: {error}") from error
        except Exception as error:
            raise _database_error(error, None) from error

    async def _get_pool(self) -> Any:
        if self._given_pool is not None:
            if self.bypasses_rls is None:  # the caller's pool is checked like our own
                try:
                    async with self._given_pool.acquire() as connection:
                        self.bypasses_rls = await _bypasses_rls(connection)
                except Exception as error:
                    raise _as_unavailable(error, None) from error
            return self._given_pool
        return await self._own_pool.get()

    async def _open_pool(self) -> Any:
        import asyncpg

        pool = None
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=self.min_size, max_size=self.max_size, init=_init_connection,
                reset=_reset_connection, timeout=CONNECT_TIMEOUT,
            )
            async with pool.acquire() as connection:
                self.bypasses_rls = await _bypasses_rls(connection)
        except BaseException as error:
            if pool is not None:
                pool.terminate()
            wrapped = _as_unavailable(error, self.dsn)
            if wrapped is error:
                raise
            raise wrapped from error
        return pool


@functools.lru_cache(maxsize=256)
def _begin_as(tenant: str, by_key: bool = False) -> str:
    """``BEGIN`` and the transaction's settings in one round trip (a unit of work
    is begin, its statements, commit: one fewer wait on a busy event loop).

    The simple query protocol takes no parameters, so the tenant is a dollar-quoted
    literal under a tag that first occurs where it closes: no tenant id, ``$`` and
    quotes included, can end it early. JIT is off: FlowStone's statements are
    short, and PostgreSQL compiled one (a stale cascade, whose recursion it cannot
    size) for 350 ms to run it in 5 ms.

    ``by_key`` (ADR 0029): no sequential scans, and the generic plan of each
    prepared statement. A batch completion was planned anew at almost every call
    (675 µs a plan, its arguments' shapes vary); its generic plan, made once per
    connection while the tables were nearly empty, scanned them whole ever after
    (4 ms a call at 10,000 records). Planned with table scans off, the generic
    plan goes through the keys at any size, and it is made once per connection."""
    n = 0
    while (tenant + (tag := f"$t{n}$")).find(tag) != len(tenant):
        n += 1
    return (
        f"BEGIN; SELECT set_config('flowstone.tenant_id', {tag}{tenant}{tag}, true), "
        f"set_config('jit', 'off', true){_BY_KEY if by_key else ''}"
    )


_BY_KEY = ", set_config('enable_seqscan', 'off', true), set_config('plan_cache_mode', 'force_generic_plan', true)"


def _discard(connection: Any) -> None:
    """Terminate a connection an error left in doubt, unless it is closed already or
    the pool took it back (a cancelled operation may have released it first)."""
    try:
        if not connection.is_closed():
            connection.terminate()
    except Exception as error:  # asyncpg: "connection has been released back to the pool"
        log.debug("connection not terminated: %s", error)


async def _bypasses_rls(connection: Any) -> bool:
    """Whether the connection's role skips row-level security (superuser or BYPASSRLS)."""
    return bool(await connection.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"))


async def _close_pool(pool: Any) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=5)
    except (TimeoutError, Exception):
        pool.terminate()


def _terminate(pool: Any) -> None:
    pool.terminate()


class PostgresClient(Closeable):
    """Base of ``PostgresStore`` and ``PostgresIO``: a lazily opened pool (or the
    caller's own), released by ``close()`` or by leaving ``async with``."""

    def __init__(self, dsn: str | None = None, pool: Any = None, **options: Any) -> None:
        self.db = Database(dsn, pool, **options)  # options: min_size, max_size, allow_bypass_rls

    async def close(self) -> None:
        await self.db.close()


async def _init_connection(connection: Any) -> None:
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


ARRAY_TYPES = (1000, 1016, 1022, 1185, 2951)
"""The oids of the array types the store's write batches send (``boolean[]``,
``bigint[]``, ``double precision[]``, ``timestamptz[]``, ``uuid[]``): PostgreSQL's
own, whose oids are fixed."""


class _ArrayTypes:
    """What asyncpg must learn of the array types of the write batches, learnt once.

    asyncpg has codecs of its own for few array types: it asks the server about the
    others on the first statement of each connection that sends them (its catalog
    query, with two more round trips to turn JIT off and on around it), and the
    batches' begin and end each sent new ones: a connection's first begin took
    17.6 ms instead of 1.5, its first end 6.9 instead of 1.4, and a short backfill
    spread over three connections paid that on each. The first connection that
    writes a batch asks for all five at once; each other connection is told the
    answer before its first batch. (The asyncpg methods for that are private: with
    an asyncpg that lacks them, each connection asks for itself, as before.)"""

    def __init__(self) -> None:
        self._types: Any = None
        self._usable = True

    async def teach(self, connection: Any) -> None:
        if not self._usable:
            return
        try:
            settings = connection._protocol.get_settings()
            if settings.get_data_codec(ARRAY_TYPES[-1]) is not None:
                return  # this connection knows them
            if self._types is None:
                self._types, _statement = await connection._introspect_types(ARRAY_TYPES, CONNECT_TIMEOUT)
            settings.register_data_types(self._types)
        except (AttributeError, TypeError, ValueError):  # another asyncpg's internals
            self._usable = False


async def _reset_connection(connection: Any) -> None:
    """Every unit of work is one transaction with transaction-local settings, so a
    released connection needs no RESET ALL round trip; only an aborted one is rolled back."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


def _as_unavailable(error: BaseException, dsn: str | None) -> BaseException:
    if isinstance(error, FlowstoneError) or not isinstance(error, Exception):
        return error
    return DatabaseUnavailable(redact(f"cannot connect to PostgreSQL at {dsn or 'the given pool'}: {error}", dsn))


_PASSWORD = re.compile(r"""password\s*=\s*('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^&\s]+)""", re.IGNORECASE)
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^@/?#]*)@")


def dsn_secrets(dsn: str | None) -> set[str]:
    """Every password a dsn carries, in the forms a message could show it: in the
    URL's user info, as a ``password=`` query parameter, or in keyword form
    (``host=... password=...``), quoted or not, percent-encoded or not."""
    if not dsn:
        return set()
    found: set[str] = set()
    userinfo = _USERINFO.match(dsn)
    if userinfo and ":" in userinfo.group(1):
        found.add(userinfo.group(1).split(":", 1)[1])
    for match in _PASSWORD.finditer(dsn):
        value = match.group(1)
        found.add(value)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            found.add(value[1:-1])
    found |= {unquote(secret) for secret in found}
    return {secret for secret in found if secret}


def redact(text: str, dsn: str | None) -> str:
    """``text`` with every password of ``dsn`` replaced by ``***`` (longest first, so a
    quoted or encoded form is not left half shown)."""
    for secret in sorted(dsn_secrets(dsn), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _database_error(error: Exception, tenant: str | None) -> DatabaseError:
    import asyncpg

    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(error, asyncpg.UndefinedTableError):
        return DatabaseError(
            f"FlowStone's tables are missing ({error}); run 'await store.migrate()' first",
            sqlstate=sqlstate, tenant=tenant,
        )
    if isinstance(error, asyncpg.InsufficientPrivilegeError):
        return DatabaseError(f"PostgreSQL refused: {error}", sqlstate=sqlstate, tenant=tenant)
    return DatabaseError(f"PostgreSQL error: {error}", sqlstate=sqlstate, tenant=tenant)
