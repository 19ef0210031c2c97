"""``fs.io.S3IO``: values as objects in S3 (or anything that speaks its API), via aioboto3.

Keys are ``{prefix}/{tenant}/{asset}/{partition}.{ext}`` (``flowstone.io.naming``:
tenant ids and partition keys are percent-encoded, so no key climbs out of its
place, and they decode back exactly). Per-call ``config``: ``bucket`` (required),
``prefix`` and ``format`` (``json``, the default, ``parquet``, ``arrow`` or
``bytes``).

The client is opened lazily on the running event loop and reused; on trio it
lives on the same trio-asyncio bridge as asyncpg. Credentials come from the
standard AWS chain unless a ``session`` (an ``aioboto3.Session``) is given.

Large values are uploaded in parts (multipart upload) straight from the one
encoded buffer: each part is a view of it, never a copy. A missing key is
``fs.NotFound``; every other S3 failure is ``fs.StorageError`` with the S3 error
code, or ``fs.StorageUnavailable`` when the endpoint cannot be reached.
"""

from __future__ import annotations

import io
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from ..definitions import FieldError
from ..errors import DefinitionError, NotFound, StorageError, StorageUnavailable
from ..partitions import serialize_partition
from ..plumbing.bridge import Bridge, LoopBound
from ..tenancy import current_tenant
from . import formats
from .many import load_concurrently
from .naming import MAX_KEY_BYTES, PREFIX_BYTES, object_path
from .protocol import Closeable

__all__ = ["S3IO"]

_NO_CONFIG: Mapping[str, Any] = {}
MiB = 1024 * 1024
MAX_PREFIX_BYTES = PREFIX_BYTES
"""A prefix's share of an object key (its parts and their slashes)."""
READ_CHUNK_BYTES = 1 * MiB
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9_.=-]+")
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class S3IO(Closeable):
    """``S3IO(endpoint_url=None, region_name=None, session=None, client=None)``.

    ``client``: an S3 client you opened yourself (``async with session.client("s3")
    as client``), used as it is and never closed here; it belongs to its asyncio
    loop, so it serves runtimes on that loop only (on trio, give a ``session``).

    ``client_config``: a ``botocore.config.Config`` (timeouts, retries); the
    default retries twice and gives up connecting after 5 s. ``part_size`` and
    ``multipart_threshold`` (bytes) control multipart uploads.
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        session: Any = None,
        client: Any = None,
        *,
        client_config: Any = None,
        part_size: int = 8 * MiB,
        multipart_threshold: int = 16 * MiB,
    ) -> None:
        if part_size < 5 * MiB:
            raise DefinitionError([FieldError("part_size", "S3 parts are at least 5 MiB")])
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.session = session
        self._given_client = client
        self.client_config = client_config
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        self._client: LoopBound[Any] = LoopBound(_opener(self), _close_client, _abandon_client)
        self._bridge = Bridge(on_close=self._client.close)

    async def close(self) -> None:
        await self._bridge.close()

    # ----------------------------------------------------------- protocol

    async def store(
        self, asset: str, value: Any, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> None:
        bucket, key, fmt = self._locate(asset, partition, config)
        where = serialize_partition(partition)
        if fmt in ("parquet", "arrow"):
            body = await anyio.to_thread.run_sync(
                lambda: formats.encode(fmt, value, asset=asset, partition=where)
            )
        else:
            body = formats.encode(fmt, value, asset=asset, partition=where)
        await self._bridge.run(self._put, bucket, key, memoryview(body), asset, where)

    async def load(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        bucket, key, fmt = self._locate(asset, partition, config)
        where = serialize_partition(partition)
        data = await self._bridge.run(self._get, bucket, key, asset, where)
        if fmt in ("parquet", "arrow"):
            return await anyio.to_thread.run_sync(lambda: formats.decode(fmt, data, asset=asset, partition=where))
        return formats.decode(fmt, data, asset=asset, partition=where)

    async def load_many(
        self, asset: str, partitions: Sequence[Any], config: Mapping[str, Any] = _NO_CONFIG
    ) -> dict[str | None, Any]:
        """Several partitions' values by key, fetched a few at a time."""
        return await load_concurrently(self.load, asset, [serialize_partition(p) for p in partitions], config)

    async def delete(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> None:
        bucket, key, _ = self._locate(asset, partition, config)
        await self._bridge.run(
            self._call, "delete_object", asset, serialize_partition(partition), {"Bucket": bucket, "Key": key}
        )

    async def exists(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> bool:
        try:
            await self.metadata(asset, partition, config)
        except NotFound:
            return False
        return True

    async def metadata(
        self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> dict[str, Any]:
        bucket, key, fmt = self._locate(asset, partition, config)
        head = await self._bridge.run(
            self._call, "head_object", asset, serialize_partition(partition), {"Bucket": bucket, "Key": key}
        )
        return {
            "size_bytes": head["ContentLength"],
            "updated_at": head["LastModified"],
            "etag": head["ETag"].strip('"'),
            "format": fmt,
            "key": key,
        }

    # ------------------------------------------------------------ naming

    def _locate(self, asset: str, partition: Any, config: Mapping[str, Any]) -> tuple[str, str, str]:
        bucket = config.get("bucket")
        if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise DefinitionError(
                [FieldError("bucket", f"S3IO needs config['bucket'], a valid bucket name; got {bucket!r}")])
        prefix = config.get("prefix") or ""
        if not isinstance(prefix, str):
            raise DefinitionError([FieldError("prefix", f"must be a str, got {type(prefix).__name__}")])
        parts = [p for p in prefix.split("/") if p]
        if any(not _PREFIX_PART.fullmatch(p) or p in (".", "..") for p in parts):
            raise DefinitionError([FieldError(
                "prefix", f"{prefix!r}: use '/'-separated parts of letters, digits, '_', '.', '=' and '-'"
            )])
        if sum(len(p) + 1 for p in parts) > MAX_PREFIX_BYTES:
            raise DefinitionError([FieldError(
                "prefix", f"{prefix[:40]!r}... is {len(prefix)} characters; at most {MAX_PREFIX_BYTES} fit, "
                f"since S3 keys hold {MAX_KEY_BYTES} bytes and the rest names the tenant, asset and partition",
            )])
        fmt = formats.check_format(config.get("format") or "json")
        key = "/".join([*parts, *object_path(current_tenant(), asset, partition, formats.EXTENSIONS[fmt])])
        return bucket, key, fmt

    # ------------------------------------------------------ asyncio side

    async def _get_client(self) -> Any:
        if self._given_client is not None:
            return self._given_client
        _manager, client = await self._client.get()
        return client

    async def _open_client(self) -> Any:
        import aioboto3
        from botocore.config import Config

        session = self.session or aioboto3.Session()
        config = self.client_config or Config(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60
        )
        async with AsyncExitStack() as stack:  # held open across calls; closed by _close_client
            client = await stack.enter_async_context(session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region_name, config=config
            ))
            return stack.pop_all(), client

    async def _call(self, operation: str, asset: str, key: str | None, arguments: Mapping[str, Any]) -> Any:
        client = await self._get_client()
        try:
            return await getattr(client, operation)(**arguments)
        except Exception as error:
            raise _storage_error(error, operation, asset, key) from error

    async def _get(self, bucket: str, key: str, asset: str, where: str | None) -> bytearray:
        """The object's bytes, read into one buffer of its size as they arrive (no
        joined copy of the chunks)."""
        client = await self._get_client()
        try:
            answer = await client.get_object(Bucket=bucket, Key=key)
            data = bytearray(answer["ContentLength"])
            filled = 0
            body = answer["Body"]
            async with body:  # releases the connection, whatever happens
                async for chunk in body.iter_chunks(READ_CHUNK_BYTES):
                    data[filled:filled + len(chunk)] = chunk
                    filled += len(chunk)
            if filled != len(data):
                raise StorageUnavailable(
                    f"S3 get_object ended after {filled} of {len(data)} bytes", asset=asset, partition=where
                )
            return data
        except Exception as error:
            raise _storage_error(error, "get_object", asset, where) from error

    async def _put(self, bucket: str, key: str, body: memoryview, asset: str, where: str | None) -> None:
        client = await self._get_client()
        try:
            if len(body) <= self.multipart_threshold:
                await client.put_object(Bucket=bucket, Key=key, Body=_View(body))
                return
            upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
            try:
                parts = []
                for number, start in enumerate(range(0, len(body), self.part_size), 1):
                    part = await client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                        Body=_View(body[start:start + self.part_size]),
                    )
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
                await client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
                )
            except BaseException:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:  # no half upload left behind (storage is billed for parts)
                        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                    except Exception:
                        pass
                raise
        except Exception as error:
            raise _storage_error(error, "put_object", asset, where) from error


def _opener(manager: S3IO) -> Callable[[], Awaitable[Any]]:
    """What opens ``manager``'s client, without holding ``manager``: its bound method
    would make the manager and its ``LoopBound`` a cycle, left for the garbage
    collector by every runtime that registers the built-in ``s3`` manager."""
    ref = weakref.ref(manager)

    async def open_client() -> Any:
        alive = ref()
        if alive is None:  # only its own LoopBound calls this, while it lives
            raise StorageUnavailable("the S3 IO manager is gone")
        return await alive._open_client()

    return open_client


async def _close_client(opened: Any) -> None:
    stack, _client = opened
    await stack.aclose()


def _abandon_client(opened: Any) -> None:
    """Its loop is gone: nothing can be awaited, and its sockets went with the loop."""


class _View(io.RawIOBase):
    """A read-only file over a memoryview: botocore takes files, not views, and a
    view is not a copy."""

    def __init__(self, view: memoryview) -> None:
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), len(self._view) - self._position)
        buffer[:count] = self._view[self._position:self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def __len__(self) -> int:
        return len(self._view)


_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "500", "503",
})
"""S3 error codes that say "try again" rather than "this cannot work"."""


def _storage_error(error: Exception, operation: str, asset: str, key: str | None) -> Exception:
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    tenant = current_tenant()
    if isinstance(error, (NotFound, StorageError)):
        return error
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
        if code in _MISSING:
            return NotFound("no stored object", asset=asset, partition=key, tenant=tenant)
        return StorageError(
            f"S3 {operation} failed: {details.get('Message') or error}", code=code or None,
            transient=code in _TRANSIENT_CODES, asset=asset, partition=key, tenant=tenant,
        )
    if isinstance(error, (BotoConnectionError, HTTPClientError, OSError)):
        return StorageUnavailable(f"S3 {operation} failed: {error}", asset=asset, partition=key, tenant=tenant)
    return StorageError(f"S3 {operation} failed: {error!r}", asset=asset, partition=key, tenant=tenant)
