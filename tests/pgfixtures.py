"""PostgreSQL for the test suite: one throwaway cluster per session, a fresh database per test.

The cluster comes from ``flowstone.testing.postgres.TemporaryPostgres`` (fsync
off: tests need speed, not durability), or is the server named by
``FLOWSTONE_TEST_DSN`` (a role that may create databases and roles). Once per
session a template database is migrated and a plain role, ``flowstone_app``
(no superuser, no BYPASSRLS), is granted what the store needs; each test then
gets ``CREATE DATABASE ... TEMPLATE`` and a ``DROP`` afterwards.

Without PostgreSQL the tests that need it are skipped, except under ``CI=true``,
where that is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import pytest

from flowstone.testing.postgres import PostgresUnavailable, TemporaryPostgres

APP_ROLE = "flowstone_app"
TEMPLATE = "flowstone_template"
_numbers = itertools.count()


@attrs.frozen
class Server:
    """A reachable server: ``dsn(database, user=None)`` for the superuser or a role."""

    admin: str  # superuser dsn on its own database
    template: str = TEMPLATE
    """Our own throwaway cluster migrates template1 itself (one CREATE DATABASE less)."""

    def dsn(self, database: str, *, user: str | None = None) -> str:
        parts = urlsplit(self.admin)
        netloc = parts.netloc
        if user is not None:
            netloc = f"{user}@{netloc.rpartition('@')[2]}"
        return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, parts.fragment))


def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
    """``asyncio.run(fn(*args))`` on a thread of its own, whatever loop the caller is in."""
    outcome: dict[str, Any] = {}

    def main() -> None:
        try:
            outcome["value"] = asyncio.run(fn(*args))
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


async def admin(dsn: str, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _prepare_template(server: Server) -> None:
    import asyncpg

    from flowstone.postgres.schema import migrate

    statements = [
        f"""DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                  CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
              END IF;
            END $$""",
    ]
    if server.template != "template1":  # a server of the user's: a template of our own
        statements[:0] = [f"DROP DATABASE IF EXISTS {server.template}", f"CREATE DATABASE {server.template}"]
    await admin(server.admin, *statements)
    connection = await asyncpg.connect(server.dsn(server.template), timeout=10)
    try:
        await migrate(connection)
        await connection.execute(grants(APP_ROLE))
    finally:
        await connection.close()


def grants(role: str) -> str:
    """What a plain application role needs on FlowStone's tables (the guide shows the same)."""
    return f"""
        GRANT USAGE, CREATE ON SCHEMA public TO {role};
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
    """


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    cluster: TemporaryPostgres | None = None
    given = os.environ.get("FLOWSTONE_TEST_DSN")
    try:
        if given:
            server = Server(given)
        else:
            cluster = TemporaryPostgres(fsync=False).start()
            server = Server(cluster.dsn(), template="template1")
        run_sync(_prepare_template, server)
    except (PostgresUnavailable, OSError) as error:
        if cluster is not None:
            cluster.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI=true and did not start: {error}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {error}")
    try:
        yield server
    finally:
        if cluster is not None:
            cluster.stop()


@attrs.frozen
class Database:
    """A fresh database: ``dsn`` as the plain role, ``admin_dsn`` as the superuser."""

    name: str
    dsn: str
    admin_dsn: str


class Supply:
    """Fresh databases made ahead of need on worker threads: CREATE DATABASE takes
    about 0.3 s of mostly waiting, which runs in parallel with the tests."""

    AHEAD = 3

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pool = ThreadPoolExecutor(max_workers=self.AHEAD, thread_name_prefix="pg-supply")
        self.ready: deque[Future[str]] = deque()

    def _make(self) -> str:
        name = f"flowstone_test_{os.getpid()}_{next(_numbers)}"
        run_sync(admin, self.server.admin, f"CREATE DATABASE {name} TEMPLATE {self.server.template}")
        return name

    def take(self) -> str:
        while len(self.ready) < self.AHEAD + 1:
            self.ready.append(self.pool.submit(self._make))
        return self.ready.popleft().result()

    def drop(self, name: str) -> None:
        run_sync(admin, self.server.admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        for future in self.ready:
            if not future.cancel():
                try:
                    self.drop(future.result())
                except Exception:  # the server is going away with the session anyway
                    pass
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def pg_supply(pg_server: Server) -> Iterator[Supply]:
    supply = Supply(pg_server)
    try:
        yield supply
    finally:
        supply.close()


@pytest.fixture
def pg_database(pg_server: Server, pg_supply: Supply) -> Iterator[Database]:
    name = pg_supply.take()
    try:
        yield Database(name, pg_server.dsn(name, user=APP_ROLE), pg_server.dsn(name))
    finally:
        pg_supply.drop(name)


@pytest.fixture
def pg_dsn(pg_database: Database) -> str:
    """A fresh, migrated database, as the plain role."""
    return pg_database.dsn
