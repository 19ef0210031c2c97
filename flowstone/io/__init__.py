"""I/O managers: where asset values live (SPEC 5)."""

from .memory import MemoryIO as MemoryIO
from .protocol import IOManager as IOManager
from .postgres import PostgresIO as PostgresIO
from .filesystem import FilesystemIO as FilesystemIO
from .s3 import S3IO as S3IO
from .parquet import ParquetIO as ParquetIO
from .parquet import PartitionedTables as PartitionedTables
