"""``executor="process"``: a plain function run in a worker process.

CPU-bound Python holds the GIL, so worker threads take turns; worker processes
run side by side. Each runtime has its own pool (``ProcessPool``): at most one busy
worker per CPU, started on first use, reused, and stopped with the runtime. What crosses the boundary is what storage would hold: each input and
the result travel encoded in a storage format (the asset's configured ``format``,
else JSON, Arrow for tables, bytes as they are), so a value that could not be
stored fails in the worker as a ``SerializationError`` instead of arriving as
something else. The function is found in the worker by its module and qualified
name (a module-level function; the module is imported there; a function of the
program's main module is found as ``multiprocessing`` finds it: ``python -m pkg``
imports ``pkg.__main__``, ``python script.py`` runs the script as ``__mp_main__``).

In the worker, ``ctx`` carries the asset, partition, run id and tenant; what the
function puts in ``ctx.metadata`` and logs on ``ctx.log`` comes back with the
result. Resources are live objects of the calling process and are not available.
Cancelling the call (a cancel, a shutdown, the asset's ``timeout``) kills the
worker process: unlike a thread, it really stops. Workers ignore Ctrl-C (the
calling process decides what stops), print to the caller's standard error, and
exit when the caller's end of their pipe closes, so none outlives its runtime.

Parent and worker speak in frames (a 4-byte length, then a pickle). Only these two
ends of one pipe read them: the worker's replies are the caller's own child's.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import pickle
import runpy
import signal
import struct
import subprocess
import sys
import traceback
import types
import uuid
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from ..context import Context
from ..definitions import Asset
from ..io import formats
from ..tenancy import tenant_scope
from . import threads

__all__ = ["ProcessPool", "WorkerFailure", "run_in_process"]

_HEADER = struct.Struct(">I")
START_SECONDS = 60.0
"""A worker that has not answered its first frame by then is given up on."""


class WorkerFailure(Exception):
    """A function in a worker process raised an exception that could not be sent back
    as itself (it does not survive pickling); its type, message and traceback are here."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}" if message else type_name)


class ProcessPool:
    """Worker processes for one runtime: at most ``size`` busy at once (default: one
    per CPU), idle ones reused, all stopped by ``aclose``."""

    def __init__(self, size: int | None = None) -> None:
        self.limiter = anyio.CapacityLimiter(size or os.cpu_count() or 1)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()

    async def call(self, request: Any) -> Any:
        """Send ``request`` to an idle worker (started if none is) and return its reply.
        Cancelled while the worker works, the worker is killed."""
        async with self.limiter:
            worker = self._idle.pop() if self._idle else await self._start()
            try:
                reply = await worker.exchange(request)
            except BaseException:
                self._all.discard(worker)
                with anyio.CancelScope(shield=True):
                    await worker.kill()
                raise
            self._idle.append(worker)
            return reply

    async def _start(self) -> _Worker:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        process = await anyio.open_process(
            [sys.executable, "-u", "-c", "from flowstone.runtime.processes import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env,
        )
        worker = _Worker(process)
        self._all.add(worker)
        try:
            with anyio.fail_after(START_SECONDS):
                await worker.exchange(("init", sys.path, _main_module()))
        except BaseException:
            self._all.discard(worker)
            with anyio.CancelScope(shield=True):
                await worker.kill()
            raise
        return worker

    async def aclose(self) -> None:
        """Stop every worker: idle ones and any still busy."""
        workers, self._all, self._idle = self._all, set(), []
        with anyio.CancelScope(shield=True):
            for worker in workers:
                await worker.kill()


def _main_module() -> tuple[str, str] | None:
    """How a worker finds the functions of this program's main module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return ("module", spec.name)  # python -m pkg: pkg.__main__
    path = getattr(main, "__file__", None)
    return ("path", os.path.abspath(path)) if path else None


class _Worker:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self.replies = BufferedByteReceiveStream(process.stdout)

    async def exchange(self, request: Any) -> Any:
        assert self.process.stdin is not None
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            await self.process.stdin.send(_HEADER.pack(len(data)) + data)
            (size,) = _HEADER.unpack(await self.replies.receive_exactly(_HEADER.size))
            return pickle.loads(await self.replies.receive_exactly(size))
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as error:
            code = self.process.returncode if self.process.returncode is not None else await self.process.wait()
            raise WorkerFailure("BrokenWorkerProcess", f"the worker process died (exit status {code})") from error

    async def kill(self) -> None:
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass
        await self.process.aclose()


async def run_in_process(
    pool: ProcessPool, asset: Asset, ctx: Context, deps: Mapping[str, Any], every_partition: frozenset[str]
) -> Any:
    """Call ``asset``'s function on ``deps`` in a worker process; its result, its
    ``ctx.metadata`` entries and its log lines come back to ``ctx``. The inputs named
    in ``every_partition`` are mappings of partition -> value (an unpartitioned
    asset reading a partitioned one)."""
    fn = asset.execute_fn
    assert fn is not None
    call = {
        "definition": _definition(asset),
        "asset": asset.name, "partition": ctx.partition, "partition_key": ctx.partition_key,
        "run_id": str(ctx.run_id), "tenant": ctx.tenant, "format": asset.io_config.get("format"),
        "log_level": ctx.log.getEffectiveLevel(),
        # encoding is CPU work (JSON, Arrow): off the event loop, as IO managers do it
        "deps": await threads.run_sync(_pack_inputs, deps, every_partition),
    }
    reply = await pool.call(("call", fn.__module__, fn.__qualname__, call))
    for level, line in reply["log"]:
        ctx.log.log(level, "%s", line)
    ctx.metadata.update(reply["metadata"])
    if reply["ok"]:
        return await threads.run_sync(functools.partial(_unpack, reply["value"], asset=asset.name, partition=ctx.partition))
    raise _error(reply)


def _definition(asset: Asset) -> dict[str, Any]:
    """The asset's fields but its function, as plain values, so ``ctx.asset`` in the
    worker is the same definition."""
    fields = {}
    for field in attrs.fields(Asset):
        if field.name != "execute_fn":
            value = getattr(asset, field.name)
            fields[field.name] = dict(value) if isinstance(value, Mapping) else value
    return fields


def _pack_inputs(deps: Mapping[str, Any], every_partition: frozenset[str]) -> dict[str, tuple[str, Any]]:
    return {name: _pack_input(name, value, name in every_partition) for name, value in deps.items()}


def _pack_input(name: str, value: Any, many: bool) -> tuple[str, Any]:
    """One input: ``("one", packed)``, or ``("many", [(partition, packed), ...])`` for
    a mapping of every partition."""
    if many:
        return ("many", [(key, _pack(one, None, asset=name, partition=key)) for key, one in value.items()])
    return ("one", _pack(value, None, asset=name, partition=None))


def _pack(value: Any, fmt: str | None, *, asset: str, partition: Any) -> tuple[str, bytes]:
    fmt = _transport(fmt, value)
    data = formats.encode(fmt, value, asset=asset, partition=partition)
    return fmt, data if isinstance(data, bytes) else data.to_pybytes()


def _transport(fmt: str | None, value: Any) -> str:
    """Tables travel as Arrow IPC whatever they are stored as (no compression work twice)."""
    if fmt is None:
        return formats.format_of(value)
    return "arrow" if fmt == "parquet" else formats.check_format(fmt)


def _unpack(packed: tuple[str, bytes], *, asset: str, partition: Any) -> Any:
    fmt, data = packed
    return formats.decode(fmt, data, asset=asset, partition=partition)


def _error(reply: Mapping[str, Any]) -> BaseException:
    error: BaseException | None = None
    if reply["pickled"] is not None:
        try:
            error = pickle.loads(reply["pickled"])
        except Exception:
            error = None
    if not isinstance(error, BaseException):
        error = WorkerFailure(reply["type"], reply["message"])
    error.add_note(f"raised in a worker process:\n{reply['traceback']}")
    return error


# ------------------------------------------------------------ in the worker

def serve() -> None:
    """The worker process's loop: a frame in, a frame out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the calling process's to handle
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # what the user's code prints goes to standard error, not into the pipe
    sys.stdin = open(os.devnull)
    while (request := _read_frame(requests)) is not None:
        if request[0] == "init":
            _, path, _WORKER["main"] = request
            sys.path[:] = path
            reply: Any = "ready"
        else:
            _, module, qualname, call = request
            reply = _call_in_worker(module, qualname, call)
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        replies.write(_HEADER.pack(len(data)) + data)


def _read_frame(stream: Any) -> Any:
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    data = _read_exactly(stream, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read_exactly(stream: Any, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None  # the caller closed the pipe: done
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


_WORKER: dict[str, Any] = {"main": None}
_functions: dict[tuple[str, str], Callable[..., Any]] = {}


def _function(module: str, qualname: str) -> Callable[..., Any]:
    """The function (the module's name for it may hold the ``Asset`` that ``@fs.asset`` made)."""
    key = (module, qualname)
    if key not in _functions:
        try:
            found: Any = _main() if module == "__main__" else importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except Exception as error:
            raise ImportError(
                f"executor='process': {module}.{qualname} cannot be found in a worker process: {error}"
            ) from error
        _functions[key] = found.execute_fn if isinstance(found, Asset) else found
    return _functions[key]


def _main() -> types.ModuleType:
    """The calling program's main module, loaded as ``__mp_main__`` (its ``if __name__ ==
    "__main__"`` block does not run), as ``multiprocessing`` does."""
    if "__mp_main__" not in sys.modules:
        how = _WORKER["main"]
        if how is None:
            raise ImportError("the program has no main module file (python -c?): define the function in a module")
        kind, where = how
        if kind == "module":
            module = importlib.import_module(where)
        else:
            module = types.ModuleType("__mp_main__")
            module.__dict__.update(runpy.run_path(where, run_name="__mp_main__"))
        sys.modules["__mp_main__"] = module
    return sys.modules["__mp_main__"]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def _call_in_worker(module: str, qualname: str, call: dict[str, Any]) -> dict[str, Any]:
    """Runs in the worker process: never raises, so the worker survives any failure."""
    name, partition = call["asset"], call["partition"]
    log = logging.getLogger(f"flowstone.asset.{name}")
    log.setLevel(call["log_level"])  # what the calling process would keep, it gets
    lines = _Lines()
    log.addHandler(lines)
    metadata: dict[str, Any] = {}
    try:
        fn = _function(module, qualname)
        ctx = Context(
            asset=Asset(**call["definition"], execute_fn=fn),
            partition=partition, partition_key=call["partition_key"], run_id=uuid.UUID(call["run_id"]),
            tenant=call["tenant"], log=log, metadata=metadata,
        )
        deps = {dep: _unpack_input(dep, packed) for dep, packed in call["deps"].items()}
        with tenant_scope(call["tenant"]) if call["tenant"] is not None else nullcontext():
            value = fn(ctx, deps)
        packed = _pack(value, call["format"], asset=name, partition=partition)
        return {"ok": True, "value": packed, "metadata": metadata, "log": lines.lines}
    except BaseException as error:
        return {
            "ok": False, "pickled": _pickled(error), "type": type(error).__name__, "message": str(error),
            "traceback": "".join(traceback.format_exception(error)), "metadata": metadata, "log": lines.lines,
        }
    finally:
        log.removeHandler(lines)


def _unpack_input(name: str, packed: tuple[str, Any]) -> Any:
    kind, payload = packed
    if kind == "many":
        return {partition: _unpack(one, asset=name, partition=partition) for partition, one in payload}
    return _unpack(payload, asset=name, partition=None)


def _pickled(error: BaseException) -> bytes | None:
    """The exception pickled, when it survives the round trip (custom constructors often do not)."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return None
