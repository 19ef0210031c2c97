"""I/O managers: where asset values live."""

from .filesystem import FilesystemIO as FilesystemIO
from .memory import MemoryIO as MemoryIO
from .parquet import ParquetIO as ParquetIO
from .parquet import PartitionedTables as PartitionedTables
from .postgres import PostgresIO as PostgresIO
from .protocol import IOManager as IOManager
from .s3 import S3IO as S3IO
