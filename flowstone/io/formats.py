"""How values become bytes and back: ``json``, ``parquet``, ``arrow`` (IPC file) and ``bytes``.

Nothing here unpickles. JSON is strict (``SerializationError`` for anything JSON
cannot hold, naming the asset and the type). Tables are pyarrow tables; a record
batch, a list of row dicts or a dict of columns is turned into one. Encoding
and decoding tables is CPU work: callers run these functions in worker threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import SerializationError
from ..plumbing.jsonvalues import to_json

__all__ = ["EXTENSIONS", "FORMATS", "decode", "encode", "format_of", "to_table"]

FORMATS = ("json", "parquet", "arrow", "bytes")
ROW_GROUP_ROWS = 128 * 1024
"""Parquet row groups of this many rows: the writer holds one row group's encoded
pages at a time, so a big table is not encoded whole in memory first (measured on a
1M-row table: peak 2.0x instead of 2.7x the table above it)."""
RELEASE_ABOVE_BYTES = 8 * 1024 * 1024
"""After writing a table this big, hand Arrow's freed buffers back to the system."""
EXTENSIONS = {"json": "json", "parquet": "parquet", "arrow": "arrow", "bytes": "bin"}


def check_format(name: Any) -> str:
    if name not in FORMATS:
        raise SerializationError(f"unknown format {name!r}; use one of {', '.join(FORMATS)}")
    return name


def format_of(value: Any) -> str:
    """The format that holds ``value`` best: bytes as they are, tables as Arrow, the rest JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if _is_table_like(value):
        return "arrow"
    return "json"


def _is_table_like(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("pyarrow") and type(value).__name__ in ("Table", "RecordBatch")


def to_table(value: Any, *, asset: str | None = None, partition: Any = None) -> Any:
    """A ``pyarrow.Table`` from a table, a record batch, a list of row dicts or a dict of columns."""
    import pyarrow as pa

    if isinstance(value, pa.Table):
        return value
    try:
        if isinstance(value, pa.RecordBatch):
            return pa.Table.from_batches([value])
        if isinstance(value, list) and all(isinstance(row, Mapping) for row in value):
            return pa.Table.from_pylist(value)
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            for name, column in value.items():
                # Text is iterable: pyarrow would silently make {"a": "hello"} five rows of letters.
                if isinstance(column, (str, bytes, bytearray, Mapping)) or not hasattr(column, "__len__"):
                    raise SerializationError(
                        f"column {name!r} holds a {type(column).__name__}, not a list of values "
                        "(a dict of columns maps each name to a list, an array or a pyarrow Array)",
                        asset=asset, partition=partition,
                    )
            return pa.table(dict(value))
    except OverflowError as error:  # an int beyond the column type's range (int64, uint64)
        raise SerializationError(
            f"a {type(value).__name__} value cannot be made a table: a number is beyond its column type's range "
            f"({error})", asset=asset, partition=partition,
        ) from error
    except (pa.ArrowException, TypeError, ValueError, RecursionError) as error:
        raise SerializationError(
            f"a {type(value).__name__} value cannot be made a table: {error}", asset=asset, partition=partition
        ) from error
    raise SerializationError(
        f"a {type(value).__name__} value is not a table (give a pyarrow Table or RecordBatch, "
        "a list of row dicts or a dict of columns)",
        asset=asset, partition=partition,
    )


def encode(fmt: str, value: Any, *, asset: str | None = None, partition: Any = None) -> Any:
    """``value`` in format ``fmt``: ``bytes`` or a ``pyarrow.Buffer`` (both support the buffer protocol)."""
    if fmt == "json":
        text = to_json(value, asset=asset, partition=partition, what=f"a {type(value).__name__} value",
                       for_postgres=False)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: escape everything instead (still valid JSON)
            return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if fmt == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SerializationError(
                f"format 'bytes' holds bytes, not a {type(value).__name__} value", asset=asset, partition=partition
            )
        return bytes(value) if not isinstance(value, bytes) else value
    import pyarrow as pa

    table = to_table(value, asset=asset, partition=partition)
    sink = pa.BufferOutputStream()
    write_table(fmt, table, sink, asset=asset, partition=partition)
    return sink.getvalue()


def write_table(fmt: str, table: Any, sink: Any, *, asset: str | None = None, partition: Any = None) -> None:
    """Write ``table`` to ``sink`` (a path or a pyarrow/file-like output stream) as ``fmt``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, use_dictionary=_dictionary_columns(table))
        elif fmt == "arrow":
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=ROW_GROUP_ROWS)
        else:
            raise SerializationError(f"format {fmt!r} does not hold tables", asset=asset, partition=partition)
    except pa.ArrowException as error:
        raise SerializationError(
            f"the table cannot be written as {fmt}: {error}", asset=asset, partition=partition
        ) from error
    finally:
        if table.nbytes > RELEASE_ABOVE_BYTES:
            pa.default_memory_pool().release_unused()


def _dictionary_columns(table: Any) -> list[str] | bool:
    """Text and binary columns, where Parquet's dictionary encoding pays. On numbers
    it rarely does, and trying costs a hash table of the column's distinct values:
    measured on a 1M-row table, writing peaked 1.3x the table above it with
    dictionaries on every column, 0.2x with them on text only."""
    import pyarrow.types as t

    names = [
        f.name for f in table.schema
        if t.is_string(f.type) or t.is_large_string(f.type) or t.is_binary(f.type) or t.is_large_binary(f.type)
    ]
    return names or False


def decode(fmt: str, data: Any, *, asset: str | None = None, partition: Any = None) -> Any:
    """The value ``encode`` made ``data`` from (``data``: bytes, a buffer, or a pyarrow input)."""
    if fmt == "bytes":
        return bytes(data)
    if fmt == "json":
        try:
            return json.loads(data if isinstance(data, (bytes, bytearray)) else bytes(data))
        except (ValueError, RecursionError) as error:
            raise SerializationError(f"stored JSON is damaged: {error}", asset=asset, partition=partition) from error
    return read_table(fmt, data, asset=asset, partition=partition)


def read_table(fmt: str, source: Any, *, asset: str | None = None, partition: Any = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = pa.BufferReader(source)
    elif isinstance(source, pa.Buffer):
        source = pa.BufferReader(source)
    try:
        if fmt == "parquet":
            # One row group at a time, single-threaded: decoding buffers stay one row
            # group big. Measured on a 1M-row table: peak 1.7x the table instead of 2.1x
            # with read_table (mostly freed buffers the allocator keeps).
            parquet = pq.ParquetFile(source)
            groups = [parquet.read_row_group(i, use_threads=False) for i in range(parquet.num_row_groups)]
            return pa.concat_tables(groups) if groups else parquet.schema_arrow.empty_table()
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowException as error:
        raise SerializationError(
            f"stored {fmt} data is damaged: {error}", asset=asset, partition=partition
        ) from error
