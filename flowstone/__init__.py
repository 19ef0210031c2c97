"""FlowStone: an asset-first orchestration runtime for async Python.

Everything public is importable from here (``import flowstone as fs``); the
modules behind it are named for what they hold: definitions -> dag -> runtime
-> store and io.

Names are loaded when first used (PEP 562), so ``import flowstone`` costs
almost nothing and a command line that needs little loads little.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

_SUBMODULES = frozenset({"events", "io", "store"})

_NAMES: dict[str, str] = {
    "Context": ".context",
    "AssetGraph": ".dag",
    "check_cycles": ".dag",
    "dependencies": ".dag",
    "dependents": ".dag",
    "execution_layers": ".dag",
    "execution_order": ".dag",
    "Asset": ".definitions",
    "FieldError": ".definitions",
    "RetryPolicy": ".definitions",
    "Retention": ".definitions",
    "asset": ".definitions",
    "validate_asset": ".definitions",
    "AccessDenied": ".errors",
    "ActorCrashed": ".errors",
    "AssetTimeout": ".errors",
    "BackfillNotFound": ".errors",
    "BackfillOwned": ".errors",
    "CycleError": ".errors",
    "DatabaseError": ".errors",
    "DatabaseUnavailable": ".errors",
    "DefinitionError": ".errors",
    "FlowstoneError": ".errors",
    "InvalidIdentifier": ".errors",
    "InvalidPartition": ".errors",
    "InvalidTenant": ".errors",
    "InvalidTransition": ".errors",
    "LeaseLost": ".errors",
    "MaterializationFailed": ".errors",
    "NotFound": ".errors",
    "RuntimeClosed": ".errors",
    "SerializationError": ".errors",
    "StorageError": ".errors",
    "StorageUnavailable": ".errors",
    "TenancyNotEnforced": ".errors",
    "WorkerJobFailed": ".errors",
    "Guard": ".guards",
    "IOManager": ".io",
    "CompositePartitions": ".partitions",
    "DailyPartitions": ".partitions",
    "HourlyPartitions": ".partitions",
    "PartitionsDefinition": ".partitions",
    "StaticPartitions": ".partitions",
    "deserialize_partition": ".partitions",
    "partition_range": ".partitions",
    "serialize_partition": ".partitions",
    "Pipeline": ".pipeline",
    "Schedule": ".schedules",
    "Eager": ".automation",
    "OnMissing": ".automation",
    "RunRequest": ".automation",
    "Sensor": ".automation",
    "SensorContext": ".automation",
    "BackfillStatus": ".runtime.backfill",
    "run_daemon": ".runtime.daemon",
    "RunResult": ".runtime.run",
    "Runtime": ".runtime.runtime",
    "materialize": ".runtime.runtime",
    "open_runtime": ".runtime.runtime",
    "Materialization": ".store",
    "MaterializationStore": ".store",
    "Status": ".store",
    "current_tenant": ".tenancy",
    "tenant_scope": ".tenancy",
}
"""Each public name and the module that defines it."""

__all__ = sorted({*_NAMES, *_SUBMODULES})


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'flowstone' has no attribute {name!r}")
    globals()[name] = value  # found once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


if TYPE_CHECKING:  # what type checkers and editors see: the same names, eagerly
    from . import events as events
    from . import io as io
    from . import store as store
    from .automation import Eager as Eager
    from .automation import OnMissing as OnMissing
    from .automation import RunRequest as RunRequest
    from .automation import Sensor as Sensor
    from .automation import SensorContext as SensorContext
    from .context import Context as Context
    from .dag import AssetGraph as AssetGraph
    from .dag import check_cycles as check_cycles
    from .dag import dependencies as dependencies
    from .dag import dependents as dependents
    from .dag import execution_layers as execution_layers
    from .dag import execution_order as execution_order
    from .definitions import Asset as Asset
    from .definitions import FieldError as FieldError
    from .definitions import Retention as Retention
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
    from .errors import WorkerJobFailed as WorkerJobFailed
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
    from .runtime.daemon import run_daemon as run_daemon
    from .runtime.run import RunResult as RunResult
    from .runtime.runtime import Runtime as Runtime
    from .runtime.runtime import materialize as materialize
    from .runtime.runtime import open_runtime as open_runtime
    from .schedules import Schedule as Schedule
    from .store import Materialization as Materialization
    from .store import MaterializationStore as MaterializationStore
    from .store import Status as Status
    from .tenancy import current_tenant as current_tenant
    from .tenancy import tenant_scope as tenant_scope
