"""Where a value lives in a file tree or a bucket: ``{tenant}/{asset}/{partition}.{ext}``.

Tenant ids and partition keys may hold any character (``/``, ``..``, ``|``,
unicode), so each becomes a path segment that cannot climb out of its place or
collide with another:

- ASCII letters, digits, ``-`` and ``_`` stay as they are (dates and most keys
  read as themselves); every other character, ``.`` and ``%`` included, is
  percent-encoded from its UTF-8 bytes (a lone surrogate from its
  ``surrogatepass`` bytes). A segment therefore never holds ``/``, ``.`` or ``..``
  and never starts with ``/``; decoding gives the text back exactly.
- "No tenant" is ``@shared``, an unpartitioned asset's value ``@all``, an empty
  partition key ``@empty``: ``@`` is always encoded in real ids and keys, so these
  cannot be produced by any of them.
- A file system allows 255 bytes per name, so a partition key longer than
  ``SEGMENT_BYTES`` once encoded is cut into several nested segments (each
  but the last ending in ``@``, which no encoded text can); the key comes back by
  joining them. The whole object key is limited to what S3 allows (1024 bytes).

The asset name is an identifier (checked here again) and is used as it is.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidPartition
from ..identifiers import check_identifier
from ..partitions import serialize_partition

__all__ = [
    "MAX_KEY_BYTES", "PREFIX_BYTES", "SEGMENT_BYTES", "decode_segment", "encode_segment", "object_path",
    "partition_from_parts",
    "partition_parts", "tenant_segment",
]

SHARED = "@shared"
UNPARTITIONED = "@all"
EMPTY = "@empty"
CONTINUED = "@"
SEGMENT_BYTES = 200
MAX_KEY_BYTES = 1024
PREFIX_BYTES = 100
"""What an object key keeps for a prefix (S3IO refuses longer ones); the rest is the path."""

_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ENCODED = re.compile(r"(?:%[0-9A-F]{2}|[A-Za-z0-9_-])*")


def encode_segment(text: str) -> str:
    """``text`` as a path segment: kept ASCII letters, digits, ``-`` and ``_``; the rest ``%XX``."""
    data = text.encode("utf-8", "surrogatepass")
    return "".join(chr(byte) if byte in _KEEP else f"%{byte:02X}" for byte in data)


def decode_segment(segment: str) -> str:
    """The text ``encode_segment`` made ``segment`` from; ``InvalidPartition`` for anything else."""
    if not _ENCODED.fullmatch(segment):
        raise InvalidPartition(f"{segment!r} is not an encoded path segment")
    data = bytearray()
    index = 0
    while index < len(segment):
        if segment[index] == "%":
            data.append(int(segment[index + 1:index + 3], 16))
            index += 3
        else:
            data.append(ord(segment[index]))
            index += 1
    return data.decode("utf-8", "surrogatepass")


def tenant_segment(tenant: str | None) -> str:
    return SHARED if tenant is None else encode_segment(tenant)


def partition_parts(partition: Any) -> list[str]:
    """The path segments naming a partition (its value or its key), extension not included."""
    key = serialize_partition(partition)
    if key is None:
        return [UNPARTITIONED]
    if key == "":
        return [EMPTY]
    encoded = encode_segment(key)
    parts = []
    while len(encoded) > SEGMENT_BYTES:
        cut = SEGMENT_BYTES
        while encoded[cut - 1] == "%" or encoded[cut - 2] == "%":  # never split an escape
            cut -= 1
        parts.append(encoded[:cut] + CONTINUED)
        encoded = encoded[cut:]
    parts.append(encoded)
    return parts


def partition_from_parts(parts: list[str]) -> str | None:
    """The partition key ``partition_parts`` made ``parts`` from (``None``: unpartitioned)."""
    if parts == [UNPARTITIONED]:
        return None
    if parts == [EMPTY]:
        return ""
    if not parts or any(not p.endswith(CONTINUED) for p in parts[:-1]) or parts[-1].endswith(CONTINUED):
        raise InvalidPartition(f"{'/'.join(parts)!r} does not name a partition")
    return decode_segment("".join(p.removesuffix(CONTINUED) for p in parts[:-1]) + parts[-1])


def object_path(tenant: str | None, asset: str, partition: Any, extension: str | None) -> list[str]:
    """``[tenant, asset, *partition]`` segments, the last one with ``.extension`` if given."""
    check_identifier(asset, "asset name")
    parts = [tenant_segment(tenant), asset, *partition_parts(partition)]
    if extension is not None:
        parts[-1] = f"{parts[-1]}.{extension}"
    size = sum(len(p) + 1 for p in parts) + (10 if extension is None else 0)  # room for an extension added later
    if size > MAX_KEY_BYTES - PREFIX_BYTES:  # room for a prefix
        raise InvalidPartition(
            f"the partition key is too long to name an object ({size} bytes once encoded)",
            asset=asset, partition=serialize_partition(partition), tenant=tenant,
        )
    return parts
