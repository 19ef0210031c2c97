"""Materialization records and the stores that keep them."""

from .memory import MemoryStore as MemoryStore
from .postgres import PostgresStore as PostgresStore
from .protocol import MaterializationStore as MaterializationStore
from .records import TERMINAL as TERMINAL
from .records import TRANSITIONS as TRANSITIONS
from .records import Materialization as Materialization
from .records import Status as Status
from .sqlite import SqliteStore as SqliteStore
