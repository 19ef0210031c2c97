"""Pins the public surface: what `import flowstone as fs` offers."""

import inspect

import flowstone as fs

PUBLIC = {
    # definitions (SPEC 1)
    "Asset", "FieldError", "Pipeline", "RetryPolicy", "asset", "validate_asset", "Context",
    # graph (SPEC 2)
    "AssetGraph", "check_cycles", "dependencies", "dependents", "execution_layers", "execution_order",
    # partitions (SPEC 3)
    "CompositePartitions", "DailyPartitions", "HourlyPartitions", "PartitionsDefinition",
    "StaticPartitions", "deserialize_partition", "partition_range", "serialize_partition",
    # tenancy and guards (SPEC 4)
    "Guard", "current_tenant", "tenant_scope",
    # IO managers and records (SPEC 5, 6)
    "IOManager", "Materialization", "MaterializationStore", "Status",
    # the runtime (SPEC 7)
    "BackfillStatus", "RunResult", "Runtime", "materialize", "open_runtime",
    # errors (SPEC 8)
    "AccessDenied", "ActorCrashed", "BackfillNotFound", "CycleError", "DefinitionError",
    "FlowstoneError", "InvalidIdentifier", "InvalidPartition", "InvalidTenant",
    "InvalidTransition", "MaterializationFailed", "NotFound", "RuntimeClosed", "SerializationError",
    "DatabaseError", "DatabaseUnavailable", "TenancyNotEnforced", "StorageError", "StorageUnavailable",
    "LeaseLost", "BackfillOwned", "AssetTimeout",
}

ERRORS = {
    "AccessDenied", "ActorCrashed", "BackfillNotFound", "CycleError", "DefinitionError",
    "InvalidIdentifier", "InvalidPartition", "InvalidTenant", "InvalidTransition",
    "MaterializationFailed", "NotFound", "RuntimeClosed", "SerializationError",
    "DatabaseError", "DatabaseUnavailable", "TenancyNotEnforced", "StorageError", "StorageUnavailable",
    "LeaseLost", "BackfillOwned", "AssetTimeout",
}


def public_names() -> set[str]:
    return {
        name for name, value in vars(fs).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def test_top_level_exports_exactly_the_public_surface():
    assert public_names() == PUBLIC


def test_every_spec_error_derives_from_flowstone_error():
    for name in ERRORS:
        assert issubclass(getattr(fs, name), fs.FlowstoneError), name


def test_cycle_error_is_a_definition_error_and_backfill_not_found_a_not_found():
    assert issubclass(fs.CycleError, fs.DefinitionError)
    assert issubclass(fs.BackfillNotFound, fs.NotFound)


def test_flowstone_error_is_an_exception_not_a_base_exception_only():
    assert issubclass(fs.FlowstoneError, Exception)


def test_store_and_io_submodules_are_reachable_right_after_import():
    assert fs.store.MemoryStore and fs.store.Status is fs.Status
    assert fs.io.MemoryIO and fs.io.IOManager is fs.IOManager
