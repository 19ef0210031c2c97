"""``executor="process"``: a plain function run in a worker process.

CPU-bound Python holds the GIL, so worker threads take turns; worker processes
run side by side. Each runtime has its own pool (``ProcessPool``): at most one busy
worker per CPU, started on first use, reused, and stopped with the runtime. What
crosses the boundary is what storage would hold: each input and the result travel
encoded in a storage format (the asset's configured ``format``, else JSON, Arrow
for tables, bytes as they are), so a value that could not be
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

Parent and worker speak in frames of JSON plus raw byte blobs (the encoded
values), never pickles: nothing crosses that a storage format or JSON cannot
say. An exception comes back as its type's module and name, its arguments and
its traceback text, and is rebuilt from a class the calling process already has
loaded (else it is a ``WorkerFailure`` naming it).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import traceback
import types
import uuid
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from datetime import date, datetime
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.abc import Process

from ..context import Context
from ..definitions import Asset, RetryPolicy
from ..errors import SerializationError
from ..io import formats
from ..partitions import (
    CompositePartitions,
    DailyPartitions,
    HourlyPartitions,
    PartitionsDefinition,
    StaticPartitions,
    deserialize_partition,
    serialize_partition,
)
from ..plumbing import threads
from ..tenancy import tenant_scope

__all__ = ["ProcessPool", "WorkerFailure", "run_in_process"]

_HEADER = struct.Struct(">I")
_BLOB = "\u0000blob"
"""The key marking a byte blob's place in a frame's JSON (no JSON a user can store has it)."""
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
                await worker.exchange(["init", sys.path, _main_module()])
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
        from anyio.streams.buffered import BufferedByteReceiveStream  # only once a worker starts

        self.process = process
        assert process.stdout is not None
        self.replies = BufferedByteReceiveStream(process.stdout)

    async def exchange(self, request: Any) -> Any:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send(encode_frame(request))
            head = await self.replies.receive_exactly(_size(await self.replies.receive_exactly(_HEADER.size)))
            blobs = [
                await self.replies.receive_exactly(_size(await self.replies.receive_exactly(_HEADER.size)))
                for _ in range(_size(await self.replies.receive_exactly(_HEADER.size)))
            ]
            return decode_frame(head, blobs)
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
        "asset": asset.name, "partition_key": serialize_partition(ctx.partition),
        "partition_kind": _kind_of(ctx.partition),
        "run_id": str(ctx.run_id), "tenant": ctx.tenant, "format": asset.io_config.get("format"),
        "log_level": ctx.log.getEffectiveLevel(),
        # encoding is CPU work (JSON, Arrow): off the event loop, as IO managers do it
        "deps": await threads.run_sync(_pack_inputs, deps, every_partition),
    }
    reply = await pool.call(["call", fn.__module__, fn.__qualname__, call])
    for level, line in reply["log"]:
        ctx.log.log(level, "%s", line)
    ctx.metadata.update(reply["metadata"])
    if reply["ok"]:
        unpack = functools.partial(_unpack, reply["value"], asset=asset.name, partition=ctx.partition)
        return await threads.run_sync(unpack)
    raise _error(reply)


def _definition(asset: Asset) -> dict[str, Any]:
    """The asset's fields but its function, as JSON, so ``ctx.asset`` in the worker is
    the same definition (a mapping that JSON cannot hold is left empty)."""
    fields: dict[str, Any] = {}
    for field in attrs.fields(Asset):
        value = getattr(asset, field.name)
        if field.name == "execute_fn":
            continue
        if field.name == "partitioned_by":
            value = _partitions_json(value)
        elif field.name == "retry":
            value = attrs.asdict(value) if value is not None else None
        elif isinstance(value, Mapping):
            value = dict(value)
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = {}
        fields[field.name] = value
    return fields


def _asset_from(fields: dict[str, Any], fn: Callable[..., Any]) -> Asset:
    fields = dict(fields)
    fields["partitioned_by"] = _partitions_from(fields["partitioned_by"])
    fields["retry"] = RetryPolicy(**fields["retry"]) if fields["retry"] is not None else None
    return Asset(**fields, execute_fn=fn)


def _partitions_json(definition: PartitionsDefinition | None) -> Any:
    """The built-in partition definitions as JSON (another kind travels as None)."""
    if isinstance(definition, (DailyPartitions, HourlyPartitions)):
        return {"type": type(definition).__name__, "start": serialize_partition(definition.start),
                "end": serialize_partition(definition.end), "timezone": definition.timezone}
    if isinstance(definition, StaticPartitions):
        return {"type": "StaticPartitions", "keys": list(definition.partition_keys)}
    if isinstance(definition, CompositePartitions):
        dimensions = [_partitions_json(d) for d in definition.dimensions]
        return None if None in dimensions else {"type": "CompositePartitions", "dimensions": dimensions}
    return None


def _partitions_from(data: Any) -> PartitionsDefinition | None:
    if data is None:
        return None
    kind = data["type"]
    if kind == "StaticPartitions":
        return StaticPartitions(data["keys"])
    if kind == "CompositePartitions":
        dimensions = [_partitions_from(d) for d in data["dimensions"]]
        return CompositePartitions(*(d for d in dimensions if d is not None))  # never None: see _partitions_json
    window = DailyPartitions if kind == "DailyPartitions" else HourlyPartitions
    return window(data["start"], data["end"], data["timezone"])


def _kind_of(partition: Any) -> Any:
    """The kind ``deserialize_partition`` needs to read ``partition``'s key back."""
    if partition is None:
        return None
    if isinstance(partition, tuple):
        return [_kind_of(part) for part in partition]
    return "datetime" if isinstance(partition, datetime) else "date" if isinstance(partition, date) else "string"


def _partition_from(key: str | None, kind: Any) -> Any:
    if key is None:
        return None
    return deserialize_partition(key, _kind_tuple(kind))


def _kind_tuple(kind: Any) -> Any:
    return tuple(_kind_tuple(k) for k in kind) if isinstance(kind, list) else kind


def _pack_inputs(deps: Mapping[str, Any], every_partition: frozenset[str]) -> dict[str, Any]:
    return {name: _pack_input(name, value, name in every_partition) for name, value in deps.items()}


def _pack_input(name: str, value: Any, many: bool) -> Any:
    """One input: ``["one", packed]``, or ``["many", [[key, packed], ...]]`` for a
    mapping of every partition (by key)."""
    if many:
        return ["many", [[serialize_partition(key), _pack(one, None, asset=name, partition=key)]
                         for key, one in value.items()]]
    return ["one", _pack(value, None, asset=name, partition=None)]


def _pack(value: Any, fmt: str | None, *, asset: str, partition: Any) -> list[Any]:
    fmt = _transport(fmt, value)
    data = formats.encode(fmt, value, asset=asset, partition=partition)
    return [fmt, data if isinstance(data, bytes) else data.to_pybytes()]


def _transport(fmt: str | None, value: Any) -> str:
    """Tables travel as Arrow IPC whatever they are stored as (no compression work twice)."""
    if fmt is None:
        return formats.format_of(value)
    return "arrow" if fmt == "parquet" else formats.check_format(fmt)


def _unpack(packed: list[Any], *, asset: str, partition: Any) -> Any:
    fmt, data = packed
    return formats.decode(fmt, data, asset=asset, partition=partition)


def _error(reply: Mapping[str, Any]) -> BaseException:
    """The worker's exception, rebuilt from its class where this process has it loaded
    and its arguments were plain data; else a ``WorkerFailure`` naming it."""
    raised = reply["error"]
    error: BaseException | None = None
    cls: Any = sys.modules.get(raised["module"])
    for part in raised["qualname"].split(".") if cls is not None else ():
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, BaseException) and raised["args"] is not None:
        try:
            error = cls(*raised["args"])
        except Exception:
            error = None
    if error is None:
        error = WorkerFailure(raised["type"], raised["message"])
    error.add_note(f"raised in a worker process:\n{raised['traceback']}")
    return error


def encode_frame(message: Any) -> bytes:
    """``message`` (JSON, with bytes anywhere in it) as one frame: the JSON's length and
    text, then how many blobs, then each blob's length and bytes."""
    blobs: list[bytes] = []

    def lift(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            blobs.append(bytes(value))
            return {_BLOB: len(blobs) - 1}
        if isinstance(value, dict):
            return {key: lift(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [lift(item) for item in value]
        return value

    head = json.dumps(lift(message), separators=(",", ":")).encode("utf-8")
    parts = [_HEADER.pack(len(head)), head, _HEADER.pack(len(blobs))]
    for blob in blobs:
        parts += [_HEADER.pack(len(blob)), blob]
    return b"".join(parts)


def decode_frame(head: bytes, blobs: list[bytes]) -> Any:
    def lower(value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) == 1 and _BLOB in value:
                return blobs[value[_BLOB]]
            return {key: lower(item) for key, item in value.items()}
        if isinstance(value, list):
            return [lower(item) for item in value]
        return value

    return lower(json.loads(head))


def _size(header: bytes) -> int:
    return int(_HEADER.unpack(header)[0])


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
        replies.write(encode_frame(reply))


def _read_frame(stream: Any) -> Any:
    """The next frame, or None when the caller closed the pipe."""
    sizes = _read_exactly(stream, _HEADER.size)
    head = None if sizes is None else _read_exactly(stream, _size(sizes))
    count = None if head is None else _read_exactly(stream, _HEADER.size)
    if head is None or count is None:
        return None
    blobs = []
    for _ in range(_size(count)):
        size = _read_exactly(stream, _HEADER.size)
        blob = None if size is None else _read_exactly(stream, _size(size))
        if blob is None:
            return None
        blobs.append(blob)
    return decode_frame(head, blobs)


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
        function = found.execute_fn if isinstance(found, Asset) else found
        if not callable(function):
            raise ImportError(f"executor='process': {module}.{qualname} is not a function in a worker process")
        _functions[key] = function
    return _functions[key]


def _main() -> types.ModuleType:
    """The calling program's main module, loaded as ``__mp_main__`` (its ``if __name__ ==
    "__main__"`` block does not run), as ``multiprocessing`` does."""
    if "__mp_main__" not in sys.modules:
        how = _WORKER["main"]
        if how is None:
            raise ImportError("the program has no main module file (python -c?): define the function in a module")
        kind, where = how
        import runpy

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
    name = call["asset"]
    log = logging.getLogger(f"flowstone.asset.{name}")
    log.setLevel(call["log_level"])  # what the calling process would keep, it gets
    lines = _Lines()
    log.addHandler(lines)
    metadata: dict[str, Any] = {}
    try:
        fn = _function(module, qualname)
        partition = _partition_from(call["partition_key"], call["partition_kind"])
        ctx = Context(
            asset=_asset_from(call["definition"], fn),
            partition=partition, partition_key=call["partition_key"], run_id=uuid.UUID(call["run_id"]),
            tenant=call["tenant"], log=log, metadata=metadata,
        )
        deps = {dep: _unpack_input(dep, packed) for dep, packed in call["deps"].items()}
        with tenant_scope(call["tenant"]) if call["tenant"] is not None else nullcontext():
            value = fn(ctx, deps)
        packed = _pack(value, call["format"], asset=name, partition=partition)
        try:  # saved on the record: JSON only, said here rather than by the frame
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise SerializationError(f"ctx.metadata must hold JSON values: {error}", asset=name) from None
        return {"ok": True, "value": packed, "metadata": metadata, "log": lines.lines}
    except BaseException as error:
        kind = type(error)
        return {
            "ok": False, "metadata": _plain_or_empty(metadata), "log": lines.lines,
            "error": {"module": kind.__module__, "qualname": kind.__qualname__, "args": _plain_args(error),
                      "type": kind.__name__, "message": str(error),
                      "traceback": "".join(traceback.format_exception(error))},
        }
    finally:
        log.removeHandler(lines)


def _unpack_input(name: str, packed: list[Any]) -> Any:
    kind, payload = packed
    if kind == "many":
        return {partition: _unpack(one, asset=name, partition=partition) for partition, one in payload}
    return _unpack(payload, asset=name, partition=None)


def _plain_args(error: BaseException) -> list[Any] | None:
    """The exception's arguments when JSON holds them (to rebuild it on the other side)."""
    try:
        json.dumps(error.args)
    except (TypeError, ValueError):
        return None
    return list(error.args)


def _plain_or_empty(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError):
        return {}
    return metadata
