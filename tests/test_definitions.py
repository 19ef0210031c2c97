"""Asset definitions and their validation (SPEC 1)."""

from datetime import date

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowstone as fs


async def compute(ctx, deps):
    return 1


def test_bare_decorator_takes_name_docstring_and_location_from_the_function():
    @fs.asset
    def orders(ctx, deps):
        """All orders of the day."""
        return []

    assert isinstance(orders, fs.Asset)
    assert orders.name == "orders"
    assert orders.description == "All orders of the day."
    assert orders.module == __name__
    assert isinstance(orders.line, int) and orders.line > 0
    assert orders.execute_fn.__name__ == "orders"


def test_decorator_with_arguments_keeps_every_field():
    daily = fs.DailyPartitions(start=date(2025, 1, 1))
    retry = fs.RetryPolicy(max_attempts=2, backoff=0)

    @fs.asset(
        name="report", depends_on=["orders", "users"], description="d", io_manager="parquet",
        io_config={"root": "/tmp"}, partitioned_by=daily, requires=["db"], metadata={"owner": "bi"},
        tags=["report"], code_version="v2", requires_approval=True, retry=retry, max_concurrency=4,
    )
    async def build(ctx, deps):
        return {}

    assert build.name == "report"
    assert build.depends_on == ("orders", "users")
    assert build.io_manager == "parquet" and build.io_config == {"root": "/tmp"}
    assert build.partitioned_by == daily and build.requires == ("db",)
    assert build.metadata == {"owner": "bi"} and build.tags == ("report",)
    assert build.code_version == "v2" and build.requires_approval is True
    assert build.retry == retry and build.max_concurrency == 4


def test_asset_struct_constructs_without_validation_and_has_spec_defaults():
    bare = fs.Asset(name="x")
    assert bare.depends_on == () and bare.metadata == {} and bare.tags == ()
    assert bare.io_config == {} and bare.requires == () and bare.execute_fn is None
    assert bare.io_manager is None and bare.requires_approval is False
    assert [e.field for e in fs.validate_asset(bare)] == ["execute"]


def test_asset_has_every_spec_field():
    fields = [f.name for f in attrs.fields(fs.Asset)]
    assert fields == [
        "name", "description", "depends_on", "io_manager", "io_config", "partitioned_by",
        "execute_fn", "requires", "metadata", "tags", "code_version", "requires_approval",
        "retry", "max_concurrency", "timeout", "executor", "automation", "retention", "module", "line",
    ]


def test_asset_is_immutable_including_its_mappings():
    item = fs.Asset(name="x", metadata={"a": 1})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        item.name = "y"
    with pytest.raises(TypeError):
        item.metadata["a"] = 2


def test_assets_are_hashable_and_compare_by_value():
    assert fs.Asset(name="x", metadata={"a": 1}) == fs.Asset(name="x", metadata={"a": 1})
    assert len({fs.Asset(name="x"), fs.Asset(name="x")}) == 1


def test_depends_on_accepts_asset_objects():
    @fs.asset
    def upstream(ctx, deps):
        return 1

    @fs.asset(depends_on=[upstream])
    def downstream(ctx, deps):
        return 2

    assert downstream.depends_on == ("upstream",)


def test_valid_asset_has_no_errors():
    assert fs.validate_asset(fs.Asset(name="ok", execute_fn=compute)) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "1abc"}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "drop table;--"}, "name"),
        ({"name": None}, "name"),
        ({"depends_on": "raw"}, "depends_on"),
        ({"depends_on": ("a", "a")}, "depends_on"),
        ({"depends_on": ("ok",)}, "depends_on"),  # itself
        ({"depends_on": ("not-an-identifier",)}, "depends_on"),
        ({"depends_on": 5}, "depends_on"),
        ({"execute_fn": None}, "execute"),
        ({"execute_fn": "fn"}, "execute"),
        ({"execute_fn": lambda ctx: 1}, "execute"),
        ({"execute_fn": lambda ctx, deps, extra: 1}, "execute"),
        ({"execute_fn": lambda *args: 1}, "execute"),
        ({"io_manager": 3}, "io_manager"),
        ({"io_manager": ""}, "io_manager"),
        ({"io_config": [("a", 1)]}, "io_config"),
        ({"partitioned_by": "daily"}, "partitioned_by"),
        ({"tags": ("ok", "")}, "tags"),
        ({"tags": "report"}, "tags"),
        ({"metadata": {"x": object()}}, "metadata"),
        ({"metadata": {1: "x"}}, "metadata"),
        ({"metadata": {"x": float("nan")}}, "metadata"),
        ({"retry": 3}, "retry"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"requires_approval": "yes"}, "requires_approval"),
        ({"code_version": 2}, "code_version"),
        ({"description": 2}, "description"),
        ({"requires": ("a b",)}, "requires"),
    ],
)
def test_each_invalid_field_is_reported_by_name(changes, field):
    item = attrs.evolve(fs.Asset(name="ok", execute_fn=compute), **changes)
    errors = fs.validate_asset(item)
    assert field in [e.field for e in errors], errors
    assert all(e.message for e in errors)


def test_generator_functions_are_refused():
    def gen(ctx, deps):
        yield 1

    errors = fs.validate_asset(fs.Asset(name="g", execute_fn=gen))
    assert [e.field for e in errors] == ["execute"]


def test_decorator_raises_definition_error_listing_every_problem():
    with pytest.raises(fs.DefinitionError) as info:
        @fs.asset(name="bad name", depends_on="raw", max_concurrency=-1)
        def broken(ctx):
            return 1

    fields = {e.field for e in info.value.errors}
    assert fields == {"name", "depends_on", "max_concurrency", "execute"}
    message = str(info.value)
    assert "4 problems" in message and "did you mean ['raw']" in message


def test_decorator_error_names_the_asset():
    with pytest.raises(fs.DefinitionError) as info:
        @fs.asset(tags=[""])
        def tagged(ctx, deps):
            return 1

    assert info.value.asset == "tagged"
    assert "asset 'tagged'" in str(info.value)


def test_positional_arguments_to_the_decorator_are_refused_clearly():
    with pytest.raises(fs.DefinitionError, match="keywords"):
        fs.asset("name")


def test_validate_asset_on_a_non_asset_returns_an_error_not_a_crash():
    assert [e.field for e in fs.validate_asset("nope")] == ["asset"]


@given(st.text())
def test_arbitrary_names_are_accepted_only_if_they_are_identifiers(name):
    errors = fs.validate_asset(fs.Asset(name=name, execute_fn=compute))
    accepted = not errors
    ascii_identifier = name.isascii() and name.isidentifier() and len(name) <= 128
    assert accepted == ascii_identifier


anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
    st.lists(st.one_of(st.text(), st.integers(), st.none()), max_size=4),
    st.dictionaries(st.one_of(st.text(), st.integers()), st.one_of(st.text(), st.floats()), max_size=3),
    st.builds(object),
)
FIELDS = [f.name for f in attrs.fields(fs.Asset)]


@given(st.dictionaries(st.sampled_from(FIELDS), anything))
def test_validate_asset_reports_garbage_in_any_field_without_raising(fields):
    errors = fs.validate_asset(fs.Asset(**{"name": "ok", "execute_fn": compute, **fields}))
    assert all(isinstance(e, fs.FieldError) and e.message for e in errors)


# ------------------------------------------------------------------ retry


def test_retry_policy_defaults_and_doubling_backoff():
    policy = fs.RetryPolicy()
    assert (policy.max_attempts, policy.backoff, policy.jitter) == (3, 1.0, True)
    plain = fs.RetryPolicy(backoff=0.5, jitter=False)
    assert [plain.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]


def test_retry_jitter_stays_within_half_to_one_and_a_half():
    policy = fs.RetryPolicy(backoff=2.0, jitter=True)
    assert policy.delay(1, rand=lambda: 0.0) == 1.0
    assert policy.delay(1, rand=lambda: 0.999) == pytest.approx(2.998)


def test_zero_backoff_retries_at_once():
    assert fs.RetryPolicy(backoff=0).delay(3) == 0


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"max_attempts": 1.5}, {"backoff": -1}, {"backoff": float("inf")}, {"jitter": "no"}]
)
def test_invalid_retry_policy_is_a_definition_error(kwargs):
    with pytest.raises(fs.DefinitionError, match="retry"):
        fs.RetryPolicy(**kwargs)


def _shapes():
    import functools

    def plain(ctx, deps):
        return 1

    async def coroutine(ctx, deps, /):
        return 1

    def defaults(ctx, deps=None):
        return 1

    def keyword_only(ctx, deps, *, extra=1):
        return 1

    def variadic(ctx, *deps):
        return 1

    def keywords(ctx, deps, **more):
        return 1

    def three(ctx, deps, extra):
        return 1

    @functools.wraps(plain)
    def wrapper(*args, **kwargs):  # inspect follows __wrapped__ to (ctx, deps)
        return plain(*args, **kwargs)

    def renamed(*args):
        return 1

    import inspect

    renamed.__signature__ = inspect.signature(plain)  # type: ignore[attr-defined]

    class Callable:
        def __call__(self, ctx, deps):
            return 1

    return [plain, coroutine, defaults, keyword_only, variadic, keywords, three, wrapper, renamed, Callable(),
            Callable().__call__, functools.partial(three, extra=1), lambda ctx, deps: 1, lambda ctx: 1]


@pytest.mark.parametrize("fn", _shapes())
def test_the_quick_signature_check_agrees_with_inspect(fn):
    # Registration reads a plain function's code object instead of calling
    # inspect.signature; whatever it accepts, inspect accepts too.
    import inspect

    from flowstone.definitions import _plainly_two_positional

    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    valid = len(params) == 2 and len(positional) == 2
    if _plainly_two_positional(fn):
        assert valid
    problems = [e.field for e in fs.validate_asset(fs.Asset(name="shape", execute_fn=fn))]
    assert ("execute" in problems) is not valid
