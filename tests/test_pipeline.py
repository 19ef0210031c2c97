"""Pipelines: collections of assets validated as a whole (SPEC 1)."""

from datetime import date

import pytest

import flowstone as fs


def fn(ctx, deps):
    return None


def test_pipeline_asset_decorator_adds_in_definition_order():
    pipeline = fs.Pipeline("analytics")

    @pipeline.asset
    def raw(ctx, deps):
        return 1

    @pipeline.asset(depends_on=["raw"])
    def report(ctx, deps):
        return 2

    assert [a.name for a in pipeline.assets] == ["raw", "report"]
    assert isinstance(pipeline.assets, tuple)
    assert pipeline.get("report") is report
    assert "raw" in pipeline and len(pipeline) == 2
    pipeline.validate()


def test_pipeline_accepts_ready_assets():
    a = fs.Asset(name="a", execute_fn=fn)
    pipeline = fs.Pipeline("p", assets=[a])
    assert pipeline.assets == (a,)


def test_pipeline_refuses_non_assets_and_bad_names():
    with pytest.raises(fs.DefinitionError, match=r"expected an fs\.Asset"):
        fs.Pipeline("p", assets=[fn])
    with pytest.raises(fs.DefinitionError):
        fs.Pipeline("")


def test_get_unknown_asset_is_not_found_naming_it():
    with pytest.raises(fs.NotFound, match="'missing'"):
        fs.Pipeline("p").get("missing")


def test_validate_names_every_problem_at_once():
    pipeline = fs.Pipeline(
        "p",
        assets=[
            fs.Asset(name="a", execute_fn=fn, depends_on=("ghost",)),
            fs.Asset(name="a", execute_fn=fn),
            fs.Asset(name="b", execute_fn=fn, io_manager="nosuch", requires=("db",)),
            fs.Asset(name="c"),
        ],
    )
    with pytest.raises(fs.DefinitionError) as info:
        pipeline.validate(io_managers={"memory"}, resources=set())
    found = {(e.asset, e.field) for e in info.value.errors}
    assert found == {
        ("a", "depends_on"), ("a", "name"), ("b", "io_manager"), ("b", "requires"), ("c", "execute")
    }
    assert not isinstance(info.value, fs.CycleError)
    assert "5 problems" in str(info.value)


def test_checked_graph_is_the_graph_validate_checked():
    """A runtime opens with it: its order is known, and a broken pipeline raises as
    validate() does."""
    pipeline = fs.Pipeline("p", assets=[fs.Asset(name="a", execute_fn=fn),
                                        fs.Asset(name="b", execute_fn=fn, depends_on=("a",))])
    graph = pipeline.checked_graph(io_managers={"memory"}, resources=set())
    assert graph.execution_order("b") == ["a", "b"] and "_sorted" in graph.__dict__
    pipeline.add(fs.Asset(name="c", execute_fn=fn, depends_on=("ghost",)))
    with pytest.raises(fs.DefinitionError, match="ghost"):
        pipeline.checked_graph()


def test_unknown_keys_are_only_checked_when_the_runtime_names_its_keys():
    fs.Pipeline("p", assets=[fs.Asset(name="b", execute_fn=fn, io_manager="s3")]).validate()


def test_cycle_with_other_problems_raises_cycle_error_carrying_all():
    pipeline = fs.Pipeline(
        "p",
        assets=[
            fs.Asset(name="a", execute_fn=fn, depends_on=("b",)),
            fs.Asset(name="b", execute_fn=fn, depends_on=("a", "ghost")),
        ],
    )
    with pytest.raises(fs.CycleError) as info:
        pipeline.validate()
    assert info.value.cycle == ["a", "b"]
    assert {e.message for e in info.value.errors} >= {"unknown dependency 'ghost'"}


def test_same_partitioning_and_all_partitions_mappings_are_valid():
    daily = fs.DailyPartitions(start=date(2025, 1, 1))
    fs.Pipeline(
        "p",
        assets=[
            fs.Asset(name="raw", execute_fn=fn, partitioned_by=daily),
            fs.Asset(name="clean", execute_fn=fn, partitioned_by=daily, depends_on=("raw",)),
            fs.Asset(name="summary", execute_fn=fn, depends_on=("clean",)),
            fs.Asset(name="lookup", execute_fn=fn),
            fs.Asset(name="joined", execute_fn=fn, partitioned_by=daily, depends_on=("raw", "lookup")),
        ],
    ).validate()


def test_partitioning_that_cannot_be_mapped_is_a_definition_error():
    daily = fs.DailyPartitions(start=date(2025, 1, 1))
    regions = fs.StaticPartitions(["eu", "us"])
    pipeline = fs.Pipeline(
        "p",
        assets=[
            fs.Asset(name="raw", execute_fn=fn, partitioned_by=daily),
            fs.Asset(name="by_region", execute_fn=fn, partitioned_by=regions, depends_on=("raw",)),
            fs.Asset(name="more_regions", execute_fn=fn, partitioned_by=fs.StaticPartitions(["eu", "mars"]),
                     depends_on=("by_region",)),
        ],
    )
    with pytest.raises(fs.DefinitionError) as info:
        pipeline.validate()
    assert [(e.asset, e.field) for e in info.value.errors] == [
        ("by_region", "partitioned_by"), ("more_regions", "partitioned_by")
    ]
    assert "cannot read 'raw'" in str(info.value)
