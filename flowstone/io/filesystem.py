"""``fs.io.FilesystemIO``: values as files under a root, the embedded default.

``{root}/{tenant}/{asset}/{partition}.{ext}`` (see ``flowstone.io.naming``): JSON
for JSON values, Arrow IPC for tables, raw bytes for bytes, or the format named
by ``config["format"]`` (``json``, ``arrow``, ``parquet``, ``bytes``). Each write
goes to a temporary file in the same directory, is flushed to disk (unless
``durable=False``) and renamed over the old one, so a reader or a crash sees the
old value or the new one, never half a file. Every file operation runs in a
worker thread, one hop per call. Nothing is pickled.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import anyio

from ..errors import NotFound, StorageError
from ..partitions import serialize_partition
from ..tenancy import current_tenant
from . import formats
from .many import load_concurrently
from .naming import object_path
from .protocol import Closeable

__all__ = ["FilesystemIO"]

_NO_CONFIG: Mapping[str, Any] = {}
_LOOKUP_ORDER = ("json", "arrow", "bytes", "parquet")


class FilesystemIO(Closeable):
    """``FilesystemIO(root=".flowstone/storage", durable=True)``.

    ``durable``: flush each file (and its directory) to disk before it replaces
    the old one, so a power loss cannot leave an empty file either; off, a
    process crash still never shows half a file.
    """

    def __init__(self, root: str | os.PathLike[str] = ".flowstone/storage", *, durable: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.durable = durable

    # ----------------------------------------------------------- protocol

    async def store(
        self, asset: str, value: Any, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> None:
        fmt = formats.check_format(config.get("format") or formats.format_of(value))
        where = self._where(asset, partition)
        await anyio.to_thread.run_sync(self._store, where, fmt, value, asset, serialize_partition(partition))

    async def load(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        where = self._where(asset, partition)
        return await anyio.to_thread.run_sync(
            self._load, where, asset, serialize_partition(partition), _formats(config)
        )

    async def load_many(
        self, asset: str, partitions: Sequence[Any], config: Mapping[str, Any] = _NO_CONFIG
    ) -> dict[str | None, Any]:
        """Several partitions' values by key, a few loads at a time."""
        return await load_concurrently(self.load, asset, [serialize_partition(p) for p in partitions], config)

    def path_of(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> str | None:
        """The file holding the value now (``None`` if there is none); blocking, for worker threads."""
        found = self._find(self._where(asset, partition), _formats(config))
        return found[1] if found is not None else None

    async def delete(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> None:
        where = self._where(asset, partition)
        await anyio.to_thread.run_sync(self._delete, where, asset, serialize_partition(partition))

    async def exists(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> bool:
        where = self._where(asset, partition)
        return await anyio.to_thread.run_sync(lambda: self._find(where, _formats(config)) is not None)

    async def metadata(
        self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> dict[str, Any]:
        where = self._where(asset, partition)
        return await anyio.to_thread.run_sync(
            self._metadata, where, asset, serialize_partition(partition), _formats(config)
        )

    # ---------------------------------------------------- worker threads

    def _where(self, asset: str, partition: Any) -> str:
        """The path of the value without its extension."""
        return os.path.join(self.root, *object_path(current_tenant(), asset, partition, None))

    def _refuse_links(self, where: str) -> None:
        """Raise ``StorageError`` when a folder between the root and ``where`` is a
        symbolic link: one planted inside the root could lead a write or a read outside
        it, or into another tenant's folder. (The root itself may be a link.)"""
        current = self.root
        for part in os.path.relpath(os.path.dirname(where), self.root).split(os.sep):
            if part in ("", "."):
                continue
            current = os.path.join(current, part)
            if os.path.islink(current):
                raise StorageError(
                    f"{current!r} is a symbolic link; FilesystemIO follows none inside its root", code="ELOOP"
                )

    def _find(self, where: str, candidates: tuple[str, ...] = _LOOKUP_ORDER) -> tuple[str, str] | None:
        self._refuse_links(where)
        for fmt in candidates:
            path = f"{where}.{formats.EXTENSIONS[fmt]}"
            if os.path.islink(path):
                raise StorageError(f"{path!r} is a symbolic link; FilesystemIO follows none inside its root",
                                   code="ELOOP")
            if os.path.isfile(path):
                return fmt, path
        return None

    def _store(self, where: str, fmt: str, value: Any, asset: str, key: str | None) -> None:
        folder, name = os.path.split(where)
        path = f"{where}.{formats.EXTENSIONS[fmt]}"
        with _storage_errors("store", asset, key):
            self._refuse_links(where)
            os.makedirs(folder, exist_ok=True)
            # One temporary name per object: only the lease holder writes an object, so
            # a file already there was left by a write that was interrupted (a killed
            # process) and is removed here instead of staying behind forever.
            temporary = os.path.join(folder, f".{name}.{formats.EXTENSIONS[fmt]}.tmp")
            _remove(temporary)
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(handle, "wb") as file:
                    if fmt in ("parquet", "arrow"):
                        formats.write_table(fmt, formats.to_table(value, asset=asset, partition=key), file,
                                            asset=asset, partition=key)
                    else:
                        file.write(formats.encode(fmt, value, asset=asset, partition=key))
                    if self.durable:
                        file.flush()
                        os.fsync(file.fileno())
                os.replace(temporary, path)
            except BaseException:
                _remove(temporary)
                raise
            for other in _LOOKUP_ORDER:  # a value stored earlier in another format is replaced too
                if other != fmt:
                    _remove(f"{where}.{formats.EXTENSIONS[other]}")
            if self.durable:
                _sync_directory(folder)

    def _load(self, where: str, asset: str, key: str | None, candidates: tuple[str, ...]) -> Any:
        found = self._find(where, candidates)
        if found is None:
            raise NotFound("no stored value", asset=asset, partition=key, tenant=current_tenant())
        fmt, path = found
        with _storage_errors("load", asset, key):
            try:
                if fmt == "arrow":  # the IPC file format maps straight into memory: no copy
                    import pyarrow as pa

                    return formats.read_table(fmt, pa.memory_map(path), asset=asset, partition=key)
                if fmt == "parquet":
                    return formats.read_table(fmt, path, asset=asset, partition=key)
                with open(path, "rb") as file:
                    return formats.decode(fmt, file.read(), asset=asset, partition=key)
            except FileNotFoundError:  # deleted between the lookup and the read
                raise NotFound("no stored value", asset=asset, partition=key, tenant=current_tenant()) from None

    def _delete(self, where: str, asset: str, key: str | None) -> None:
        with _storage_errors("delete", asset, key):
            self._refuse_links(where)
            for fmt in _LOOKUP_ORDER:
                _remove(f"{where}.{formats.EXTENSIONS[fmt]}")

    def _metadata(self, where: str, asset: str, key: str | None, candidates: tuple[str, ...]) -> dict[str, Any]:
        found = self._find(where, candidates)
        if found is None:
            raise NotFound("no stored value", asset=asset, partition=key, tenant=current_tenant())
        fmt, path = found
        with _storage_errors("read metadata of", asset, key):
            stat = os.stat(path)
        return {
            "size_bytes": stat.st_size,
            "updated_at": datetime.fromtimestamp(stat.st_mtime, timezone.utc),
            "format": fmt,
            "path": path,
        }


def _formats(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Where to look for a value: the configured format only, else every one."""
    fmt = config.get("format")
    return (formats.check_format(fmt),) if fmt else _LOOKUP_ORDER


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _sync_directory(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def _storage_errors(action: str, asset: str, key: str | None) -> Iterator[None]:
    """OSErrors as ``StorageError`` with the errno name as its code (not-found is the caller's)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StorageError(
            f"could not {action} the value: {error.strerror or error}",
            code=errno.errorcode.get(error.errno or 0), asset=asset, partition=key, tenant=current_tenant(),
        ) from error
