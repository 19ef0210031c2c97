"""``fs.io.ParquetIO``: tables as Parquet files, on a local root or on S3.

``ParquetIO(root=None, s3=None)``: with ``s3`` (an ``S3IO``) the files are objects
in ``config["bucket"]`` under ``config["prefix"]``; otherwise they live under
``root`` (default ``.flowstone/parquet``) as ``{tenant}/{asset}/{partition}.parquet``,
written atomically (temporary file, then rename). A value may be a
``pyarrow.Table``, a ``RecordBatch``, a list of row dicts or a dict of columns;
``load`` always returns a ``pyarrow.Table``. Encoding and decoding run in worker
threads.

An unpartitioned asset that reads a partitioned Parquet asset gets a
:class:`PartitionedTables`: the mapping key -> table every such reader gets, which
also reads as one dataset (``.dataset()``, ``.to_table()``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import anyio

from ..definitions import FieldError
from ..errors import DefinitionError, SerializationError
from ..partitions import serialize_partition
from .filesystem import FilesystemIO
from .protocol import Closeable
from .s3 import S3IO

__all__ = ["ParquetIO", "PartitionedTables"]

_NO_CONFIG: Mapping[str, Any] = {}


class PartitionedTables(Mapping[Any, Any]):
    """Every partition of a Parquet asset: ``tables[key]`` is one partition's table,
    ``dataset()`` all of them as one ``pyarrow.dataset.Dataset`` (backed by the files
    themselves when they are local), ``to_table()`` one table with a column naming
    each row's partition."""

    def __init__(self, tables: Mapping[str | None, Any], paths: Sequence[str] | None = None) -> None:
        self._tables = dict(tables)
        self._paths = list(paths) if paths is not None else None

    def __getitem__(self, key: Any) -> Any:
        return self._tables[serialize_partition(key)]

    def __iter__(self) -> Iterator[str | None]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def dataset(self) -> Any:
        import pyarrow.dataset as ds

        if self._paths is not None:
            return ds.dataset(self._paths, format="parquet")
        return ds.dataset(list(self._tables.values()))

    def to_table(self, partition_column: str | None = "partition") -> Any:
        """All partitions in one table (in key order), plus ``partition_column``
        holding each row's partition key unless it is ``None``."""
        import pyarrow as pa

        pieces = []
        for key, table in self._tables.items():
            if partition_column is not None:
                if partition_column in table.column_names:
                    raise SerializationError(
                        f"the tables already have a column {partition_column!r}; pass another partition_column"
                    )
                table = table.append_column(partition_column, pa.array([key] * table.num_rows, pa.string()))
            pieces.append(table)
        if not pieces:
            return pa.table({})
        return pa.concat_tables(pieces, promote_options="default")


class ParquetIO(Closeable):
    """Parquet files on a local root, or objects on S3 through an ``S3IO``."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, s3: S3IO | None = None, *, durable: bool = True
    ) -> None:
        if root is not None and s3 is not None:
            raise DefinitionError([FieldError("root", "give a local root or s3, not both")])
        self.s3 = s3
        self.root = None if s3 is not None else os.path.abspath(os.fspath(root or ".flowstone/parquet"))
        self._files = FilesystemIO(self.root, durable=durable) if self.root is not None else None

    async def close(self) -> None:
        """Closes the ``S3IO`` it was given, if any."""
        if self.s3 is not None:
            await self.s3.close()

    @property
    def _backend(self) -> Any:
        return self.s3 if self.s3 is not None else self._files

    @staticmethod
    def _parquet(config: Mapping[str, Any]) -> Mapping[str, Any]:
        if config.get("format", "parquet") != "parquet":
            raise DefinitionError([FieldError("format", "ParquetIO writes Parquet only")])
        return {**config, "format": "parquet"}

    # ----------------------------------------------------------- protocol

    async def store(
        self, asset: str, value: Any, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> None:
        await self._backend.store(asset, value, partition, self._parquet(config))

    async def load(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> Any:
        return await self._backend.load(asset, partition, self._parquet(config))

    async def delete(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> None:
        await self._backend.delete(asset, partition, self._parquet(config))

    async def exists(self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG) -> bool:
        return await self._backend.exists(asset, partition, self._parquet(config))

    async def metadata(
        self, asset: str, partition: Any = None, config: Mapping[str, Any] = _NO_CONFIG
    ) -> dict[str, Any]:
        return await self._backend.metadata(asset, partition, self._parquet(config))

    async def load_many(
        self, asset: str, partitions: Sequence[Any], config: Mapping[str, Any] = _NO_CONFIG
    ) -> PartitionedTables:
        """Every partition asked for, as one :class:`PartitionedTables`."""
        config = self._parquet(config)
        tables = await self._backend.load_many(asset, partitions, config)
        paths: list[str] | None = None
        if self._files is not None:
            files = self._files
            found = await anyio.to_thread.run_sync(
                lambda: [files.path_of(asset, key, config) for key in tables]
            )
            # one deleted since: the in-memory tables are what we have
            paths = [p for p in found if p is not None] if all(p is not None for p in found) else None
        return PartitionedTables(tables, paths)
