"""FlowStone: an asset-first orchestration runtime for async Python.

Everything public is importable from here (``import flowstone as fs``); the
modules behind it are named for what they hold: definitions -> dag -> runtime
-> store and io.
"""

from . import events as events
from . import io as io
from . import store as store
from .context import Context as Context
from .dag import AssetGraph as AssetGraph
from .dag import check_cycles as check_cycles
from .dag import dependencies as dependencies
from .dag import dependents as dependents
from .dag import execution_layers as execution_layers
from .dag import execution_order as execution_order
from .definitions import Asset as Asset
from .definitions import FieldError as FieldError
from .definitions import RetryPolicy as RetryPolicy
from .definitions import asset as asset
from .definitions import validate_asset as validate_asset
from .errors import AccessDenied as AccessDenied
from .errors import ActorCrashed as ActorCrashed
from .errors import AssetTimeout as AssetTimeout
from .errors import BackfillNotFound as BackfillNotFound
from .errors import BackfillOwned as BackfillOwned
from .errors import CycleError as CycleError
from .errors import DatabaseError as DatabaseError
from .errors import DatabaseUnavailable as DatabaseUnavailable
from .errors import DefinitionError as DefinitionError
from .errors import FlowstoneError as FlowstoneError
from .errors import InvalidIdentifier as InvalidIdentifier
from .errors import InvalidPartition as InvalidPartition
from .errors import InvalidTenant as InvalidTenant
from .errors import InvalidTransition as InvalidTransition
from .errors import LeaseLost as LeaseLost
from .errors import MaterializationFailed as MaterializationFailed
from .errors import NotFound as NotFound
from .errors import RuntimeClosed as RuntimeClosed
from .errors import SerializationError as SerializationError
from .errors import StorageError as StorageError
from .errors import StorageUnavailable as StorageUnavailable
from .errors import TenancyNotEnforced as TenancyNotEnforced
from .guards import Guard as Guard
from .io import IOManager as IOManager
from .partitions import CompositePartitions as CompositePartitions
from .partitions import DailyPartitions as DailyPartitions
from .partitions import HourlyPartitions as HourlyPartitions
from .partitions import PartitionsDefinition as PartitionsDefinition
from .partitions import StaticPartitions as StaticPartitions
from .partitions import deserialize_partition as deserialize_partition
from .partitions import partition_range as partition_range
from .partitions import serialize_partition as serialize_partition
from .pipeline import Pipeline as Pipeline
from .runtime.backfill import BackfillStatus as BackfillStatus
from .runtime.run import RunResult as RunResult
from .runtime.runtime import Runtime as Runtime
from .runtime.runtime import materialize as materialize
from .runtime.runtime import open_runtime as open_runtime
from .store import Materialization as Materialization
from .store import MaterializationStore as MaterializationStore
from .store import Status as Status
from .tenancy import current_tenant as current_tenant
from .tenancy import tenant_scope as tenant_scope
from .version import __version__ as __version__

