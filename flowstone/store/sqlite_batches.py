"""The embedded store's connections: group-committed writes, reads that never wait.

stdlib ``sqlite3`` blocks. What blocks for long is waiting for another process's
write lock, the fsync of a commit, and reading many rows; these run on
FlowStone's daemon threads, so asyncio and trio callers alike keep their event
loop. The statements of a write, each a few tens of microseconds, run on the
event loop's thread itself: run on a worker thread, every statement released
and took back the GIL, and a busy event loop made the worker wait up to the
interpreter's switch interval (5 ms) each time; a 10,000-partition backfill ran
at 1,000 materializations a second instead of several thousand.

Group commit: a writer that finds no flush in progress leads one. It takes the
write lock (``BEGIN IMMEDIATE``: taken before anything is read, so two processes
never both read and then fail to upgrade), runs every queued write in its own
savepoint (one bad write is rolled back alone), and commits on a thread. Writes
queued meanwhile form the next batch. Reads use a second connection: in WAL mode
they see the last commit and wait for no writer.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import attrs

from ..errors import DatabaseError, DatabaseUnavailable
from ..plumbing import threads

__all__ = ["Connections", "Failed", "database_error", "in_savepoint"]

log = logging.getLogger("flowstone.store")

BUSY_TIMEOUT = 30.0
"""Seconds a writer waits for another process's write lock before giving up."""

READ_BUSY_TIMEOUT = 5.0
"""Readers wait for nobody in WAL mode, except while SQLite recovers the file."""

WRITE_TIMEOUT = BUSY_TIMEOUT + 30.0
"""Longest a caller waits for its write; the wait is shielded from cancellation
meanwhile, so a cancelled run still knows whether its record was written."""

CHECKPOINT_EVERY = 200
"""Commits between two checkpoints when commits are not fsynced one by one."""

BATCH_LIMIT = 2048
"""Writes per transaction at most: other processes get the write lock between batches."""

Work = Callable[[sqlite3.Connection], Any]

_inherited: list[sqlite3.Connection] = []
"""Connections a forked child inherited: held, so they are never closed in it."""


class _Write:
    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Work) -> None:
        self.fn = fn
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class Connections:
    """A writer and a reader connection to the file at ``path``, opened on first
    use (and again after a fork): ``check()`` first (is the location usable?),
    then ``prepare(connection)`` once, on a thread, before anything else
    (configure, migrate: it may wait for another process)."""

    def __init__(
        self, path: str, prepare: Callable[[sqlite3.Connection], None], *, fsync_each: bool,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self._path = path
        self._check = check
        self._prepare = prepare
        self._fsync_each = fsync_each
        self._commits = 0
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._opening: anyio.Event | None = None
        self._pid = 0
        self._queue: list[_Write] = []
        self._flushing: anyio.Event | None = None

    async def read(self, fn: Work) -> Any:
        """``fn(connection)`` on the reading connection, in this thread: for reads of
        a few rows (a read transaction in WAL mode never waits for a writer)."""
        await self._open()
        assert self._reader is not None
        try:
            return fn(self._reader)
        except sqlite3.Error as error:
            raise database_error(error) from None

    async def read_many(self, fn: Work) -> Any:
        """``fn(connection)`` on a thread, with a connection of its own: for reads of
        many rows, which would hold up the event loop."""
        await self._open()
        return await threads.run_sync(self._read_apart, fn)

    def _read_apart(self, fn: Work) -> Any:
        try:
            connection = self._connect(READ_BUSY_TIMEOUT)
            try:
                connection.execute("BEGIN")
                return fn(connection)
            finally:
                connection.close()
        except sqlite3.Error as error:
            raise database_error(error) from None

    async def write(self, fn: Work) -> Any:
        """``fn(connection)`` in a write transaction, committed before this returns.

        A caller cancelled while it waits still waits (shielded, up to
        ``WRITE_TIMEOUT``) for its write's outcome before the cancellation goes on:
        whoever called knows whether the record was written. The shield is made
        only then: a cancel scope per write cost more than the write's statements.
        """
        op = _Write(fn)
        self._queue.append(op)
        await self._settle((op,))
        if op.error is not None:
            error, op.error = op.error, None
            raise error
        return op.value

    async def write_many(self, fns: Sequence[Work]) -> list[Any]:
        """Each of ``fns`` as ``write`` runs it, queued at once so that they share
        a transaction and the caller wakes once: what each returned, or the
        exception it raised (which rolled back that one alone); a flush that was
        interrupted raises that."""
        ops = [_Write(fn) for fn in fns]
        self._queue.extend(ops)
        await self._settle(ops)
        for op in ops:
            if op.error is not None and not isinstance(op.error, Exception):
                raise op.error
        return [op.value if op.error is None else op.error for op in ops]

    async def _settle(self, ops: Sequence[_Write]) -> None:
        """Wait until every op is written or failed. A caller cancelled meanwhile
        still waits (shielded, up to ``WRITE_TIMEOUT``) for the outcome before the
        cancellation goes on; an op that never came fails as unavailable."""
        try:
            for op in ops:
                await self._until_done(op)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT):
                for op in ops:
                    await self._until_done(op)
            raise
        finally:
            for op in ops:
                if not op.done:  # only after a cancellation whose write never came
                    if op in self._queue:
                        self._queue.remove(op)
                    op.done, op.error = True, DatabaseUnavailable(
                        f"writing to SQLite took longer than {WRITE_TIMEOUT:g}s")

    async def _until_done(self, op: _Write) -> None:
        while not op.done:
            if self._flushing is None:
                await self._lead_flush()
            else:
                await self._flushing.wait()

    def close(self) -> None:
        """Close both connections; the next call opens them again."""
        for connection in (self._writer, self._reader):
            if connection is not None and self._pid == os.getpid():
                connection.close()
        self._writer = self._reader = None

    # ------------------------------------------------------------------ inner

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)

    async def _open(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: connections do not cross a fork
            # The parent's connections are kept, never closed here: closing their file
            # descriptors in the child would drop the parent's POSIX locks on the file.
            _inherited.extend(c for c in (self._writer, self._reader) if c is not None)
            self._writer = self._reader = self._opening = None
            self._pid = os.getpid()
        while self._writer is None:
            if self._opening is not None:  # another task is opening them
                await self._opening.wait()
                continue
            self._opening = anyio.Event()
            try:
                self._writer, self._reader = await threads.run_sync(self._open_both)
            finally:
                self._opening.set()
                self._opening = None

    def _open_both(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        self._check()
        try:
            writer = self._connect(BUSY_TIMEOUT)
        except sqlite3.Error as error:
            raise database_error(error) from None
        try:
            _retrying_busy(lambda: self._prepare(writer))
            # From here on the writer never waits on the event loop's thread: a
            # busy lock is waited for on a thread (see _run).
            writer.execute("PRAGMA busy_timeout = 0")
            if not self._fsync_each:  # checkpoints run on a thread, not inside a commit here
                writer.execute("PRAGMA wal_autocheckpoint = 0")
            reader = self._connect(READ_BUSY_TIMEOUT)
        except sqlite3.Error as error:
            writer.close()
            raise database_error(error) from None
        except BaseException:
            writer.close()
            raise
        return writer, reader

    async def _lead_flush(self) -> None:
        """Write what is queued in one transaction. Shielded: a batch, once begun, is
        committed or rolled back whole, whoever gets cancelled meanwhile."""
        event = self._flushing = anyio.Event()
        with anyio.CancelScope(shield=True):
            # Let the tasks that the last commit woke run first: their next writes
            # join this batch instead of each waiting for a commit of its own.
            await anyio.lowlevel.checkpoint()
            batch, self._queue = self._queue[:BATCH_LIMIT], self._queue[BATCH_LIMIT:]
            try:
                await self._open()
                connection = self._writer
                assert connection is not None
                await self._run(connection, batch)
            except BaseException as error:
                failed = database_error(error) if isinstance(error, sqlite3.Error) else error
                for op in batch:
                    if not op.done:
                        op.done, op.error = True, failed
                if not isinstance(error, (sqlite3.Error, DatabaseError)):
                    raise
            finally:
                self._flushing = None
                event.set()
            if self._commits >= CHECKPOINT_EVERY:
                self._commits = 0
                await threads.run_sync(self._checkpoint)

    def _checkpoint(self) -> None:
        """Copy the log into the database file (and fsync it), on a thread, with a
        connection of its own: a passive checkpoint waits for no reader or writer."""
        try:
            connection = self._connect(READ_BUSY_TIMEOUT)
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                connection.close()
        except sqlite3.Error as error:
            log.warning("SQLite checkpoint of %s failed (it is tried again later): %s", self._path, error)

    async def _run(self, connection: sqlite3.Connection, batch: list[_Write]) -> None:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            # Another process writes now: wait for its lock on a thread, not here.
            await threads.run_sync(_begin_waiting, connection)
        try:
            if not _apply_together(connection, batch):
                _apply_one_by_one(connection, batch)
            if self._fsync_each:
                await threads.run_sync(connection.execute, "COMMIT")  # the fsync
            else:
                connection.execute("COMMIT")  # appends to the log; no fsync (see checkpoint)
                self._commits += 1
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        for op in batch:
            op.done = True


def _apply_together(connection: sqlite3.Connection, batch: list[_Write]) -> bool:
    """Every write of the batch with no savepoint of its own (each costs two
    statements); False, with nothing applied, when one of them failed."""
    connection.execute("SAVEPOINT batch")
    for op in batch:
        try:
            op.value = op.fn(connection)
        except sqlite3.Error as error:
            if not connection.in_transaction or _aborts_transaction(error):
                raise
            break
        except Exception:
            break
    else:
        connection.execute("RELEASE batch")
        return True
    connection.execute("ROLLBACK TO batch")
    connection.execute("RELEASE batch")
    return False


def _apply_one_by_one(connection: sqlite3.Connection, batch: list[_Write]) -> None:
    """Each write in a savepoint: one that fails is rolled back alone and hears why."""
    for op in batch:
        op.value = None
        outcome = in_savepoint(connection, op.fn)
        if isinstance(outcome, Failed):
            op.error = outcome.error
        else:
            op.value = outcome


@attrs.frozen
class Failed:
    """What ``in_savepoint`` answers for a write that raised (and was rolled back)."""

    error: Exception


def in_savepoint(connection: sqlite3.Connection, fn: Work) -> Any:
    """``fn(connection)`` in a savepoint of the open transaction: what it returned,
    or ``Failed`` with what it raised after rolling it back alone (SQLite's errors
    as FlowStone's). An error after which SQLite may have dropped the whole
    transaction (disk full, I/O, busy) is raised: nothing of the batch stands."""
    connection.execute("SAVEPOINT op")
    try:
        value = fn(connection)
    except sqlite3.Error as error:
        if connection.in_transaction and not _aborts_transaction(error):
            connection.execute("ROLLBACK TO op")
            connection.execute("RELEASE op")
            return Failed(database_error(error))
        raise
    except Exception as error:
        connection.execute("ROLLBACK TO op")
        connection.execute("RELEASE op")
        return Failed(error)
    connection.execute("RELEASE op")
    return value


def _retrying_busy(step: Callable[[], None]) -> None:
    """``step()``, tried again while SQLite answers "busy" at once, up to the busy
    timeout (on a thread). Switching a new file to WAL needs the file alone and
    does not wait on the busy handler: two processes opening a new store at once
    met "database is locked"."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.005
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def _begin_waiting(connection: sqlite3.Connection) -> None:
    connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    try:
        connection.execute("BEGIN IMMEDIATE")
    finally:
        connection.execute("PRAGMA busy_timeout = 0")


def _aborts_transaction(error: sqlite3.Error) -> bool:
    """Errors after which SQLite may have rolled the whole transaction back."""
    code = getattr(error, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_NOMEM,
                    sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_READONLY)


def database_error(error: sqlite3.Error) -> DatabaseError:
    """A FlowStone error for what SQLite said: busy, read-only, full or unopenable
    is ``DatabaseUnavailable`` (the CLI's exit code 3); anything else ``DatabaseError``."""
    name = getattr(error, "sqlite_errorname", None)
    code = getattr(error, "sqlite_errorcode", None)
    message = f"SQLite: {error}"
    if code == sqlite3.SQLITE_BUSY:
        message += " (another process held the write lock past the busy timeout)"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
                sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM):
        return DatabaseUnavailable(message, sqlstate=name)
    return DatabaseError(message, sqlstate=name)
