"""A throwaway PostgreSQL cluster for tests and benchmarks.

``TemporaryPostgres`` runs the machine's own PostgreSQL binaries (``initdb`` and
``pg_ctl`` on PATH, or under ``/usr/lib/postgresql/*/bin``): a fresh cluster in a
temporary directory, listening on a free loopback port only (no Unix socket),
stopped and deleted on ``stop()``. Run as root, the binaries run as the
``postgres`` user through ``runuser``, as PostgreSQL refuses to run as root.

Used by FlowStone's test suite and ``python -m stress``; usable by anyone who
wants a real server in their own tests::

    with TemporaryPostgres() as pg:
        dsn = pg.dsn()                     # superuser, database "postgres"
        app = pg.dsn(user="app", database="db1")
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from types import TracebackType

__all__ = ["PostgresUnavailable", "TemporaryPostgres", "find_binaries"]

START_TIMEOUT = 30.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the cluster would not start (with why)."""


def find_binaries() -> str:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, then the
    newest ``/usr/lib/postgresql/<version>/bin``."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if not candidates:
        raise PostgresUnavailable("no initdb on PATH or under /usr/lib/postgresql/*/bin")
    return os.path.dirname(candidates[-1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ram_directory() -> str | None:
    """A writable RAM-backed directory (``/dev/shm`` on Linux), if there is one."""
    folder = "/dev/shm"
    return folder if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK) else None


class TemporaryPostgres:
    """One throwaway cluster. ``fsync=False`` trades durability for speed (tests);
    benchmarks keep the default, as shipped.

    ``parent`` is where its directory goes. By default a cluster without fsync
    lives in RAM when the machine has a RAM filesystem (``/dev/shm``): nothing it
    writes needs to survive it, and on a virtual disk ``initdb`` and each
    ``CREATE DATABASE`` take several times longer (measured: start 0.7 s instead
    of 1.0-1.3 s, a database 15 ms instead of 0.1-0.35 s). A cluster with fsync
    stays on disk, where fsync means something.
    """

    def __init__(
        self, *, fsync: bool = True, superuser: str = "postgres", parent: str | None = None,
        settings: Mapping[str, str] | None = None, program: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.fsync = fsync
        self.superuser = superuser
        self.parent = parent
        self.settings = dict(settings or {})
        """More server settings (``-c name=value``), after the defaults; plain words
        (they go through ``pg_ctl``'s command line unquoted)."""
        for name, value in self.settings.items():
            if not all(part and part.replace("_", "").replace(".", "").isalnum() for part in (name, value)):
                raise ValueError(f"a server setting must be plain words: {name}={value!r}")
        self.program = program
        """What ``pg_ctl`` runs instead of ``postgres`` (``pg_ctl -p``): a script that
        runs it under a profiler, say (``stress instructions --store postgres``)."""
        self.start_timeout = start_timeout
        self.port: int | None = None
        self._dir: str | None = None
        self._bin = ""
        self._as_postgres = os.geteuid() == 0

    # ------------------------------------------------------------- lifecycle

    def start(self) -> TemporaryPostgres:
        self._bin = find_binaries()
        parent = self.parent or (None if self.fsync else _ram_directory())
        self._dir = tempfile.mkdtemp(prefix="flowstone-pg-", dir=parent)
        data = os.path.join(self._dir, "data")
        if self._as_postgres:
            shutil.chown(self._dir, "postgres", "postgres")
        try:
            self._run(
                "initdb", "-D", data, "-U", self.superuser, "--auth=trust", "-E", "UTF8",
                "--locale=C", "--no-sync",
            )
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                f"-c max_connections=200 -c fsync={'on' if self.fsync else 'off'} "
                f"-c synchronous_commit={'on' if self.fsync else 'off'} "
                f"-c full_page_writes={'on' if self.fsync else 'off'}"
            )
            for name, value in self.settings.items():
                options += f" -c {name}={value}"
            program = ("-p", self.program) if self.program else ()
            self._run(
                "pg_ctl", "-D", data, *program, "-o", options, "-l", os.path.join(self._dir, "log"),
                "-w", "-t", str(int(self.start_timeout)), "start",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (immediately) and delete its files. Safe to call twice."""
        folder, self._dir = self._dir, None
        if folder is None:
            return
        data = os.path.join(folder, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            try:
                self._run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
            except PostgresUnavailable:
                pass  # already gone; the files still go
        shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- use

    def dsn(self, *, user: str | None = None, database: str = "postgres") -> str:
        if self.port is None:
            raise PostgresUnavailable("the cluster is not started")
        return f"postgresql://{user or self.superuser}@127.0.0.1:{self.port}/{database}"

    def cpu_seconds(self) -> float | None:
        """CPU time (user and system) the server's processes alive now have used so
        far, read from ``/proc`` (Linux); None where that cannot be read. A benchmark
        takes it before and after, with its connections open (a connection that ends
        takes its share with it)."""
        if self._dir is None:
            return None
        try:
            with open(os.path.join(self._dir, "data", "postmaster.pid"), encoding="ascii") as handle:
                postmaster = handle.readline().strip()
            ticks = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                        fields = handle.read().rpartition(")")[2].split()
                except OSError:  # gone meanwhile
                    continue
                # After the name: state, ppid, ..., utime and stime are the 12th and 13th.
                if pid == postmaster or fields[1] == postmaster:
                    ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            return None
        return ticks / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        """The server's log so far (for failure messages)."""
        if self._dir is None:
            return ""
        try:
            with open(os.path.join(self._dir, "log"), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def _run(self, program: str, *args: str) -> None:
        command = [os.path.join(self._bin, program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=self.start_timeout + 10, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PostgresUnavailable(f"{program} could not run: {error}") from error
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}\n"
                f"{self.log()[-2000:]}"
            )


if __name__ == "__main__":  # pragma: no cover - a manual check: start, print, stop
    began = time.perf_counter()
    with TemporaryPostgres(fsync=False) as cluster:
        print(cluster.dsn(), f"started in {time.perf_counter() - began:.2f}s under {cluster._dir}")
