"""The error hierarchy (SPEC 8): every message names what went wrong and where."""

import uuid
from datetime import date

import pytest

import flowstone as fs


def test_base_error_names_asset_partition_key_and_tenant():
    error = fs.FlowstoneError("boom", asset="report", partition=date(2025, 1, 15), tenant="acme")
    assert (error.asset, error.partition, error.tenant) == ("report", date(2025, 1, 15), "acme")
    assert str(error) == "boom [asset='report', partition='2025-01-15', tenant='acme']"


def test_base_error_without_context_is_just_the_message():
    assert str(fs.FlowstoneError("boom")) == "boom"


def test_unserializable_partition_in_a_message_falls_back_to_repr():
    assert "partition=3" in str(fs.FlowstoneError("x", partition=3))


def test_value_errors_are_also_value_errors_and_not_found_a_lookup_error():
    assert issubclass(fs.InvalidPartition, ValueError)
    assert issubclass(fs.InvalidTenant, ValueError)
    assert issubclass(fs.InvalidIdentifier, ValueError)
    assert issubclass(fs.DefinitionError, ValueError)
    assert issubclass(fs.NotFound, LookupError) and not issubclass(fs.NotFound, KeyError)
    assert issubclass(fs.SerializationError, TypeError)


def test_access_denied_carries_asset_action_tenant():
    error = fs.AccessDenied("report", "materialize", "acme")
    assert (error.asset, error.action, error.tenant) == ("report", "materialize", "acme")
    assert str(error) == "access denied: materialize [asset='report', tenant='acme']"


def test_materialization_failed_carries_asset_partition_result():
    result = object()
    error = fs.MaterializationFailed("report", date(2025, 1, 15), result, tenant="acme", error="ValueError: bad row")
    assert (error.asset, error.partition, error.result) == ("report", date(2025, 1, 15), result)
    assert "bad row" in str(error) and "2025-01-15" in str(error) and "acme" in str(error)


def test_invalid_transition_names_both_statuses():
    error = fs.InvalidTransition("success", "running", asset="report")
    assert (error.current, error.requested) == ("success", "running")
    assert "from success to running" in str(error) and "report" in str(error)


def test_backfill_not_found_names_the_id():
    backfill = uuid.uuid4()
    error = fs.BackfillNotFound(backfill)
    assert error.backfill_id == backfill and str(backfill) in str(error)


def test_actor_crashed_names_the_actor():
    error = fs.ActorCrashed("executor:report", asset="report")
    assert error.actor == "executor:report" and "executor:report" in str(error)


def test_definition_error_from_a_message_has_one_field_error():
    error = fs.DefinitionError("pipeline has no assets")
    assert [e.message for e in error.errors] == ["pipeline has no assets"]
    assert str(error) == "invalid definition: definition: pipeline has no assets"


def test_cycle_error_alone_describes_its_cycle():
    error = fs.CycleError(["a", "b"])
    assert error.cycle == ["a", "b"] and "a -> b -> a" in str(error)


@pytest.mark.parametrize(
    "call",
    [
        lambda: fs.deserialize_partition("2025-02-30", "date"),
        lambda: fs.serialize_partition(object()),
        lambda: fs.Pipeline("p").get("nope"),
        lambda: fs.execution_order("x", []),
        lambda: fs.DailyPartitions(start=None),
        lambda: fs.StaticPartitions(None),
        lambda: fs.Pipeline(None),
        lambda: fs.RetryPolicy(max_attempts=None),
        lambda: fs.partition_range(None, None),
        lambda: fs.execution_order("x", None),
        lambda: fs.check_cycles(3),
        lambda: fs.CompositePartitions(fs.StaticPartitions(["a"]), fs.StaticPartitions(["b"])).keys(start="a"),
    ],
)
def test_bad_input_raises_a_flowstone_error_never_a_bare_builtin(call):
    with pytest.raises(fs.FlowstoneError):
        call()


PASSWORD_FORMS = [
    "postgresql://app:s3cret-pw@127.0.0.1:1/db",
    "postgresql://app@127.0.0.1:1/db?password=s3cret-pw",
    "postgresql://app@127.0.0.1:1/db?password=s3cret%2Dpw",
    "host=127.0.0.1 port=1 user=app password=s3cret-pw dbname=db",
    "host=127.0.0.1 port=1 user=app password='s3cret-pw' dbname=db",
    "postgresql://app:s3cret-pw@127.0.0.1:notaport/db",
    "postgres://app:s3cret-pw@[::1/db",
    "postgresql://app@127.0.0.1:1/db?sslmode=bogus&password=s3cret-pw",
]


@pytest.mark.anyio
@pytest.mark.parametrize("dsn", PASSWORD_FORMS)
async def test_no_message_shows_the_password_whatever_form_the_dsn_carried_it_in(anyio_backend, dsn):
    """Nothing listens on port 1 (or the dsn is malformed): the error names where it
    tried to connect, never the password."""
    with pytest.raises(fs.DatabaseUnavailable) as info:
        async with fs.store.PostgresStore(dsn) as store:
            await store.list_all()
    assert "s3cret" not in str(info.value) and "cannot connect to PostgreSQL at" in str(info.value)


def test_a_wrapped_error_names_its_context_once():
    inner = fs.NotFound("no stored value", asset="daily", partition=date(2025, 1, 15))
    outer = fs.MaterializationFailed("daily", date(2025, 1, 15), tenant="acme", error=f"NotFound: {inner}")
    assert str(outer) == (
        "materialization failed: NotFound: no stored value [asset='daily', partition='2025-01-15'] [tenant='acme']"
    )
    same = fs.MaterializationFailed("daily", date(2025, 1, 15), error=f"NotFound: {inner}")
    assert str(same).count("asset='daily'") == 1
