"""A named collection of assets, checked as a whole.

Assets may name dependencies defined later in the module, so graph problems are
only knowable once every asset is in: :meth:`Pipeline.validate` (also run when a
runtime opens) reports all of them in one :class:`~flowstone.DefinitionError`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from .automation import Sensor
from .dag import AssetGraph
from .definitions import Asset, FieldError, asset, validate_asset
from .errors import CycleError, DefinitionError
from .partitions import PartitionsDefinition, can_map
from .schedules import Schedule

__all__ = ["Pipeline"]


class Pipeline:
    """Assets that belong together: ``pipeline = fs.Pipeline("analytics")``.

    ``@pipeline.asset(...)`` defines and adds an asset; ``Pipeline(name,
    assets=[...], schedules=[...])`` takes ready ``fs.Asset`` and ``fs.Schedule``
    objects; ``pipeline.schedule(asset, cron, ...)`` adds a schedule.
    """

    def __init__(
        self, name: str, assets: Iterable[Asset] = (), schedules: Iterable[Schedule] = (),
        sensors: Iterable[Sensor] = (),
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError([FieldError("pipeline", f"name must be a non-empty str, got {name!r}")])
        self.name = name
        self._assets: list[Asset] = []
        self._schedules: list[Schedule] = []
        self._sensors: list[Sensor] = []
        for item in assets:
            self.add(item)
        for schedule in schedules:
            self.add_schedule(schedule)
        for sensor in sensors:
            self.add_sensor(sensor)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, assets=[{', '.join(a.name for a in self._assets)}])"

    @property
    def assets(self) -> tuple[Asset, ...]:
        """Every asset in definition order."""
        return tuple(self._assets)

    def __iter__(self) -> Iterator[Asset]:
        return iter(self.assets)

    def __len__(self) -> int:
        return len(self._assets)

    def __contains__(self, name: object) -> bool:
        return any(a.name == name for a in self._assets)

    def add(self, item: Asset) -> Asset:
        """Add a ready ``Asset``; it is checked with the rest by :meth:`validate`."""
        if not isinstance(item, Asset):
            raise DefinitionError(
                [FieldError("assets", f"expected an fs.Asset, got {type(item).__name__}: {item!r}")]
            )
        self._assets.append(item)
        return item

    def asset(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """``fs.asset`` that also adds the asset to this pipeline; raises
        ``DefinitionError`` as ``fs.asset`` does."""
        if fn is not None:
            return self.add(asset(fn, **options))
        make = asset(**options)
        return lambda func: self.add(make(func))

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        """Every schedule, in the order added."""
        return tuple(self._schedules)

    def add_schedule(self, schedule: Schedule) -> Schedule:
        """Add a ready ``fs.Schedule``; its asset is checked by :meth:`validate`."""
        if not isinstance(schedule, Schedule):
            raise DefinitionError(
                [FieldError("schedules", f"expected an fs.Schedule, got {type(schedule).__name__}: {schedule!r}")])
        self._schedules.append(schedule)
        return schedule

    def schedule(self, asset: str, cron: str, **options: Any) -> Schedule:
        """Add ``fs.Schedule(asset, cron, **options)``; raises ``DefinitionError`` as it does."""
        return self.add_schedule(Schedule(asset, cron, **options))

    @property
    def sensors(self) -> tuple[Sensor, ...]:
        """Every sensor, in the order added."""
        return tuple(self._sensors)

    def add_sensor(self, sensor: Sensor) -> Sensor:
        """Add a ready ``fs.Sensor``; two sensors with one name are refused by :meth:`validate`."""
        if not isinstance(sensor, Sensor):
            raise DefinitionError(
                [FieldError("sensors", f"expected an fs.Sensor, got {type(sensor).__name__}: {sensor!r}")])
        self._sensors.append(sensor)
        return sensor

    def sensor(self, fn: Callable[..., Any] | None = None, *, interval: float = 30.0, name: str | None = None) -> Any:
        """``@pipeline.sensor`` or ``@pipeline.sensor(interval=30)`` on an async function
        ``(ctx)`` returning a list of ``fs.RunRequest``: the daemon calls it every
        ``interval`` seconds. Raises ``DefinitionError`` for a bad function or interval."""

        def add(func: Callable[..., Any]) -> Sensor:
            return self.add_sensor(Sensor(name or str(getattr(func, "__name__", "")), func, interval))

        return add if fn is None else add(fn)

    def get(self, name: str) -> Asset:
        """The asset called ``name``; :class:`~flowstone.NotFound` names it if unknown."""
        return self.graph().get(name)

    def graph(self) -> AssetGraph:
        """A snapshot of the current assets as an :class:`~flowstone.dag.AssetGraph`."""
        return AssetGraph(self._assets)

    def validate(
        self,
        *,
        io_managers: Collection[str] | None = None,
        resources: Collection[str] | None = None,
    ) -> None:
        """Raise one error naming every problem in the pipeline, or return ``None``.

        Checks each asset's fields, duplicate names, unknown dependencies, cycles
        and partition mappings; with ``io_managers`` / ``resources`` (the keys a
        runtime has), also that every key an asset names exists. The error is a
        :class:`~flowstone.CycleError` when any problem is a cycle, else a
        :class:`~flowstone.DefinitionError`; ``.errors`` lists them all.
        """
        self.checked_graph(io_managers=io_managers, resources=resources)

    def checked_graph(
        self,
        *,
        io_managers: Collection[str] | None = None,
        resources: Collection[str] | None = None,
    ) -> AssetGraph:
        """:meth:`validate`, and the graph it checked: a runtime opens with that one
        (its order and cycles are known by then: a first run does not sort it again)."""
        graph = self.graph()
        errors: list[FieldError] = []
        for item in self._assets:
            errors += validate_asset(item)
        errors += graph.problems()
        for item in graph.assets:
            errors += asset_problems(item, graph, io_managers=io_managers, resources=resources)
        errors += schedule_problems(self._schedules, graph)
        seen: set[str] = set()
        for sensor in self._sensors:
            if sensor.name in seen:
                errors.append(FieldError(
                    "sensors", f"two sensors are called {sensor.name!r}; their cursors would be one"))
            seen.add(sensor.name)
        raise_problems(errors, graph)
        return graph


def schedule_problems(schedules: Iterable[Schedule], graph: AssetGraph) -> list[FieldError]:
    """Schedules of unknown assets, of assets whose partitions a tick cannot name,
    and two schedules with one name (their ticks would be one)."""
    from .partitions import DailyPartitions, HourlyPartitions

    errors: list[FieldError] = []
    names: set[str] = set()
    for schedule in schedules:
        if schedule.asset not in graph:
            errors.append(FieldError("schedules", f"schedule {schedule.name!r}: unknown asset {schedule.asset!r}"))
        else:
            definition = graph.get(schedule.asset).partitioned_by
            if definition is not None and not isinstance(definition, (DailyPartitions, HourlyPartitions)):
                errors.append(FieldError(
                    "schedules", f"schedule {schedule.name!r}: a tick names no partition of "
                    f"{type(definition).__name__}; schedule an unpartitioned, daily or hourly asset",
                    schedule.asset,
                ))
        if schedule.name in names:
            errors.append(FieldError("schedules", f"two schedules are named {schedule.name!r}"))
        names.add(schedule.name)
    return errors


def addition_problems(
    graph: AssetGraph,
    item: Asset,
    *,
    io_managers: Collection[str] | None = None,
    resources: Collection[str] | None = None,
) -> tuple[AssetGraph, list[FieldError]]:
    """The graph with ``item`` added, and every problem adding it causes.

    ``graph`` is known to be sound, so every problem of the new graph is the
    new asset's; only its own fields and mappings need checking.
    """
    own = validate_asset(item)
    if item.name in graph:
        own.append(FieldError("name", "an asset with this name is already registered", item.name))
        return graph, own
    # Its mappings, IO manager and resources need only the assets it reads: checked
    # first, so that a graph grown in place (with_asset) is one that will be used.
    mapped = asset_problems(item, graph, io_managers=io_managers, resources=resources)
    bigger = graph.with_asset(item) if not own and not mapped else AssetGraph((*graph.assets, item))
    return bigger, own + bigger.problems() + mapped


def raise_problems(errors: list[FieldError], graph: AssetGraph) -> None:
    """Raise one error carrying every problem: ``CycleError`` if any is a cycle."""
    if not errors:
        return
    cycles = graph.cycles()
    if cycles:
        raise CycleError(cycles[0], errors)
    raise DefinitionError(errors)


def asset_problems(
    item: Asset,
    graph: AssetGraph,
    *,
    io_managers: Collection[str] | None,
    resources: Collection[str] | None,
) -> list[FieldError]:
    """Problems of one asset that need its graph or the runtime's keys."""
    errors = _mapping_problems(item, graph)
    if io_managers is not None and item.io_manager is not None and item.io_manager not in io_managers:
        errors.append(
            FieldError("io_manager", f"unknown IO manager {item.io_manager!r}; known: {sorted(io_managers)}", item.name)
        )
    if resources is not None:
        for key in item.requires:
            if key not in resources:
                errors.append(
                    FieldError("requires", f"unknown resource {key!r}; known: {sorted(resources)}", item.name))
    return errors


def _mapping_problems(item: Asset, graph: AssetGraph) -> list[FieldError]:
    errors = []
    for dep_name in item.depends_on:
        if dep_name not in graph:
            continue
        dep = graph.get(dep_name)
        if not _valid_partitions(dep) or not _valid_partitions(item):
            continue  # already reported by validate_asset
        if not can_map(dep.partitioned_by, item.partitioned_by):
            errors.append(
                FieldError(
                    "partitioned_by",
                    f"cannot read {dep_name!r}: its partitions {dep.partitioned_by!r} do not map "
                    f"onto {item.partitioned_by!r}; give both the same partitioning, or leave "
                    f"{item.name!r} unpartitioned to read every partition of {dep_name!r}",
                    item.name,
                )
            )
    return errors


def _valid_partitions(item: Asset) -> bool:
    return item.partitioned_by is None or isinstance(item.partitioned_by, PartitionsDefinition)
