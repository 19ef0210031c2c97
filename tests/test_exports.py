"""Pins the public surface: what `import flowstone as fs` offers."""

import inspect
import json
import subprocess
import sys

import flowstone as fs

PUBLIC = {
    # definitions (SPEC 1)
    "Asset", "FieldError", "Pipeline", "RetryPolicy", "Retention", "asset", "validate_asset", "Context",
    # schedules and the daemon (SPEC 13)
    "Schedule", "run_daemon", "Eager", "OnMissing", "RunRequest", "Sensor", "SensorContext",
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
    "LeaseLost", "BackfillOwned", "AssetTimeout", "WorkerJobFailed",
}

ERRORS = {
    "AccessDenied", "ActorCrashed", "BackfillNotFound", "CycleError", "DefinitionError",
    "InvalidIdentifier", "InvalidPartition", "InvalidTenant", "InvalidTransition",
    "MaterializationFailed", "NotFound", "RuntimeClosed", "SerializationError",
    "DatabaseError", "DatabaseUnavailable", "TenancyNotEnforced", "StorageError", "StorageUnavailable",
    "LeaseLost", "BackfillOwned", "AssetTimeout", "WorkerJobFailed",
}


def public_names() -> set[str]:
    """Every public name the package offers (loaded on first use), modules aside."""
    return {
        name for name in dir(fs)
        if not name.startswith("_") and not inspect.ismodule(getattr(fs, name))
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


def test_every_name_in_all_resolves_and_unknown_names_are_attribute_errors():
    assert set(fs.__all__) == PUBLIC | {"events", "io", "store"}
    for name in fs.__all__:
        assert getattr(fs, name) is not None
    try:
        fs.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("an unknown name must be an AttributeError")


def test_importing_flowstone_loads_none_of_the_heavy_parts():
    """``import flowstone`` stays cheap for the command line: names load on first use."""
    code = (
        "import sys, json, flowstone\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('networkx', 'anyio', 'attrs', 'attr', 'asyncpg', 'pyarrow', 'trio', 'rich') or m.startswith('flowstone.'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == ["flowstone.version"]


def test_the_web_and_workers_extras_stay_optional():
    """The command line and the web view's data load without Starlette, Hypercorn,
    procrastinate or psycopg."""
    code = (
        "import sys, json, flowstone, flowstone.cli.commands, flowstone.web.data, flowstone.workers\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'hypercorn', 'procrastinate', 'psycopg'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == []
