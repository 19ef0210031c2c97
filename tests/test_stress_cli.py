"""The stress scenarios stay runnable: a short run of each, as CI's smoke test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_stress(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stress", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_list_names_every_scenario():
    listing = run_stress("list")
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()] == [
        "backfill", "cancel-storm", "cascade", "chaos", "checkpoints", "core", "daemon", "dagster", "dags",
        "executors", "flights-dagster", "follow", "instructions", "io", "memory", "postgres", "processes", "ranges",
        "registrations", "retention", "runtime", "scale", "schedules", "soak", "sqlite", "startup", "store-writes",
        "web", "workers",
    ]


def test_core_scenario_prints_a_table_and_a_json_line():
    result = run_stress("core", "--repeat", "2", "--keys", "200")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["scenario"] == "core" and record["options"] == {"repeat": 2, "keys": 200}
    measures = {row["measure"] for row in record["rows"]}
    assert "plan on built graph: 100-asset chain" in measures
    assert all(row["median_ms"] > 0 for row in record["rows"])
    assert lines[1].split()[0] == "measure"  # the table's header


def test_executors_scenario_compares_threads_and_processes():
    result = run_stress("executors", "--partitions", "2", "--work", "1000", "--repeat", "2", "--backend", "trio")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["executor"]: row for row in record["rows"]}
    assert set(rows) == {"thread", "process, first (starts workers)", "process", "speed-up, process over thread"}
    assert rows["process"]["partitions"] == 2 and rows["process"]["seconds"] > 0


def test_ranges_scenario_starts_a_big_backfill_lazily():
    result = run_stress("ranges", "--hours", "100000", "--run", "0", "--no-postgres")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert row["store"] == "memory" and row["partitions"] == row["resumed_total"] == 100_000


def test_sqlite_scenario_compares_with_the_memory_store():
    result = run_stress("sqlite", "--repeat", "1", "--big", "300", "--status", "500", "--tune-gc")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["options"]["tune_gc"] is True
    rows = {row["scenario"]: row for row in record["rows"]}
    assert rows["366 daily partitions, max_parallel=20, SQLite (synchronous=NORMAL)"]["per_second"] > 0
    assert rows["300 partitions on the memory store (the runtime's own share)"]["per_second"] > 0
    assert rows["status of 500 partitions (one asset)"]["median_ms"] > 0


def test_startup_scenario_times_import_and_help():
    result = run_stress("startup", "--repeat", "2", "--no-example")
    assert result.returncode == 0, result.stderr
    rows = {row["scenario"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])["rows"]}
    assert rows["import flowstone"]["median_ms"] > 0 and rows["flowstone --help"]["target_ms"] == 150


def test_schedules_scenario_checks_every_tick():
    result = run_stress("schedules", "--schedules", "6", "--minutes", "15", "--store", "sqlite")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert row["ticks"] == 2 * 15 + 2 * 3 + 2 * 1 and row["doubled"] == row["missing"] == 0


def test_daemon_scenario_measures_real_daemon_processes():
    result = run_stress("daemon", "--idle-seconds", "2", "--sample", "1", "--ticks", "3", "--hold", "1.5",
                        "--takeovers", "1")
    assert result.returncode == 0, result.stderr
    latency, takeover, idle = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert latency["median_ms"] >= 0 and latency["exit"] == 0
    assert takeover["ticks_missing"] == takeover["ticks_unfinished"] == 0 and 0 < takeover["max_s"] < 60
    assert idle["rss_first_mb"] > 0 and idle["samples"] >= 2 and idle["exit"] == 0


def test_web_scenario_times_pages_of_a_real_server():
    result = run_stress("web", "--partitions", "300", "--assets", "20", "--repeat", "1")
    assert result.returncode == 0, result.stderr
    rows = {row["scenario"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])["rows"]}
    page = rows["asset page, 300 partitions (HTML), first look: health read now"]
    assert 0 < page["first_byte_ms"] <= page["full_load_ms"] and page["kb"] > 0
    assert rows["server RSS (MB) at start / after the requests"]["rss_after_mb"] > 0


def test_workers_scenario_runs_real_worker_processes(pg_server):
    result = run_stress("workers", "--dsn", pg_server.admin, "--cpu-partitions", "4", "--work", "1000",
                        "--partitions", "20", "--latency-samples", "2")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [row["per_second"] > 0 for row in rows[:4]] == [True] * 4 and rows[1]["speedup"] > 0
    assert rows[4]["median_ms"] > 0


def test_unknown_scenario_exits_non_zero():
    assert run_stress("nope").returncode == 2


@pytest.mark.parametrize("tune", [False, True])
def test_runtime_scenario_short_run_reports_every_figure(tune):
    result = run_stress("runtime", "--repeat", "1", "--big", "500", *(["--tune-gc"] if tune else []))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["options"]["tune_gc"] is tune
    scenarios = [row["scenario"] for row in record["rows"]]
    assert scenarios[:3] == [
        "100-asset chain, one materialize", "1-200-1 fan, one materialize", "366 daily partitions, max_parallel=20"
    ]
    assert "500 daily partitions, max_parallel=20" in scenarios
    assert any(s.startswith("cost: actor round trip") for s in scenarios)


def test_memory_scenario_short_run_attributes_memory():
    result = run_stress("memory", "--small", "50", "--large", "150")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    parts = {row["allocated_by"]: row for row in record["rows"]}
    assert set(parts) == {"store", "runtime", "other"}
    assert parts["store"]["bytes_at_150"] > parts["store"]["bytes_at_50"]


def test_scale_scenario_short_run_reports_each_size():
    result = run_stress("scale", "--sizes", "50,150")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row["partitions"] for row in record["rows"]] == [50, 150]
    for row in record["rows"]:
        assert row["us_per_partition"] > 0 and row["peak_rss_mb"] > 0
        assert row["full_gc_us_per_partition"] >= 0 and row["full_collections"] >= 0


def test_dagster_scenario_needs_a_python_with_dagster():
    """Not run in CI: Dagster is not a dependency (its 366 partitions on SQLite alone take minutes)."""
    result = run_stress("dagster", "--help")
    assert result.returncode == 0 and "--dagster-python" in result.stdout
    assert run_stress("dagster").returncode == 2  # without it: a usage error


def test_dagster_scenario_runs_flowstones_half():
    """FlowStone's half of the comparison, tiny: it runs without Dagster, so a change
    to the scenarios it borrows cannot break it unseen until someone has Dagster."""
    from stress.dagster import FLOWSTONE, _measure

    chain, fan, partitions, sqlite_partitions, repeat, big = 3, 4, 5, 6, 1, 7
    out = _measure(sys.executable, FLOWSTONE, [chain, fan, partitions, sqlite_partitions, repeat, big], timeout=120)
    assert set(out) == {"chain", "fan", "partitions_memory", "partitions_sqlite", "partitions_big"}
    assert all(seconds > 0 for seconds in out.values())


def test_instructions_scenario_parses_its_options():
    """Not run in CI: under callgrind even a tiny run takes ~1.5 minutes."""
    result = run_stress("instructions", "--help")
    assert result.returncode == 0 and "callgrind" in result.stdout and "--allocator" in result.stdout


def test_postgres_scenario_short_run_reports_both_figures(pg_server):
    result = run_stress("postgres", "--dsn", pg_server.admin, "--repeat", "1", "--big", "300", "--tune-gc")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["options"]["tune_gc"] is True
    rows = {row["scenario"].split(",")[0]: row for row in record["rows"]}
    assert set(rows) == {"366 daily partitions", "300 partitions", "300 partitions of a reader",
                         "floor: the store alone"}
    assert all(row["per_second"] > 0 and 0 < row["client_cpu_share"] for row in rows.values())
    assert all(row["client_cpu_us"] > 0 for row in rows.values())
    assert not any("server_cpu_us" in row for row in rows.values()), "a given server's CPU is not read here"


def test_checkpoints_scenario_times_saves_and_listings_on_each_store(pg_server):
    result = run_stress("checkpoints", "--dsn", pg_server.admin, "--sizes", "100,2000")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [(row["store"], row["partitions"]) for row in rows] == [
        (store, size) for store in ("memory", "sqlite", "postgres") for size in (100, 2000)]
    assert all(row["first_save_ms"] > 0 and row["checkpoint_ms"] > 0 and row["list_statuses_ms"] > 0
               and row["load_status_ms"] > 0 for row in rows)


def test_follow_scenario_times_the_eager_look_on_each_store(pg_server):
    result = run_stress("follow", "--dsn", pg_server.admin, "--sizes", "100,1200", "--behind", "300")
    assert result.returncode == 0, result.stderr
    *rows, behind = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [(row["store"], row["partitions"]) for row in rows] == [
        (store, size) for store in ("memory", "sqlite", "postgres") for size in (100, 1200)]
    assert all(row["look_ms"] > 0 and row["every_partition_ms"] > 0 for row in rows)
    assert (behind["store"], behind["partitions"]) == ("memory, behind a backfill", 300)
    assert 0 < behind["upstream_s"] <= behind["all_followed_s"] and behind["cpu_s"] > 0


def test_io_scenario_short_run_measures_round_trips_and_a_backfill():
    result = run_stress("io", "--rows", "20000", "--partitions", "20", "--repeat", "1")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["scenario"]: row for row in record["rows"]}
    trips = [row for name, row in rows.items() if "round trip" in name]
    assert len(trips) == 2 and all(row["store_ms"] > 0 and row["peak_x_table"] > 0 for row in trips)
    assert rows["20 partitions, S3IO(json), max_parallel=20"]["per_second"] > 0


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_harness_scenarios_short_runs_check_what_they_leave():
    registrations = last_json(run_stress("registrations", "--count", "100", "--threads", "10"))
    assert registrations["rows"][0]["operations"] == 100 and registrations["rows"][0]["failed"] == 0
    writes = last_json(run_stress("store-writes", "--count", "500", "--threads", "20"))
    assert writes["rows"][0]["operations"] == 500 and writes["rows"][0]["failed"] == 0


def test_backfill_dags_and_cancel_storm_short_runs():
    backfill = last_json(
        run_stress("backfill", "--count", "100", "--repeat", "1", "--stores", "memory,filesystem,postgres"))
    assert [row["per_second"] > 0 for row in backfill["rows"]] == [True, True, True]
    dags = last_json(run_stress("dags", "--width", "50", "--depth", "30", "--repeat", "1"))
    assert len(dags["rows"]) == 2
    storm = last_json(run_stress("cancel-storm", "--rounds", "2"))
    assert "none open" in storm["rows"][0]["note"]


def test_chaos_short_run_passes_its_integrity_check():
    chaos = last_json(run_stress("chaos", "--partitions", "40", "--no-combined"))
    assert [row["integrity"] for row in chaos["rows"]] == ["ok"] * 4
    assert {row["scenario"].split(",")[0] for row in chaos["rows"]} == {
        "chaos: actors", "chaos: io", "chaos: postgres", "chaos: s3",
    }


def test_soak_short_run_samples_memory_and_judges_it():
    soak = last_json(run_stress("soak", "--minutes", "0.1", "--sample", "1", "--store", "memory", "--allow-mb", "50"))
    row = soak["rows"][0]
    assert row["verdict"] == "flat" and row["records_written"] > 0 and len(soak["options"]["samples"]) >= 3


def test_chaos_runs_on_trio_too():
    chaos = last_json(run_stress("chaos", "--partitions", "30", "--kinds", "actors,io,postgres", "--backend", "trio"))
    assert [row["integrity"] for row in chaos["rows"]] == ["ok"] * 4  # three kinds, then all together


def test_processes_scenario_computes_each_partition_once_across_processes(pg_server):
    result = run_stress("processes", "--dsn", pg_server.admin, "--partitions", "60", "--processes", "2")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    single, shared = record["rows"]
    assert single["computed_by_each"] == [60]
    assert shared["computed"] == 60 and len(shared["computed_by_each"]) == 2


def test_cascade_scenario_times_cascades_and_a_prune_on_every_store(pg_server):
    for store in (["--store", "sqlite"], ["--dsn", pg_server.admin], ["--store", "memory"]):
        result = run_stress("cascade", *store, "--sizes", "200", "--samples", "5", "--history", "1")
        assert result.returncode == 0, result.stderr
        [row] = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
        assert row["cascade_median_ms"] > 0 and row["pruned"] == 200 - 5  # the stale ones' reads are spared


def test_retention_scenario_prunes_every_assets_history_on_every_store(pg_server):
    result = run_stress("retention", "--dsn", pg_server.admin, "--store", "postgres", "--store", "sqlite",
                        "--store", "memory", "--assets", "4", "--partitions", "30", "--history", "2")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [row["store"] for row in rows] == ["postgres", "sqlite", "memory"]
    assert all(row["pruned"] == 4 * 30 * 2 and row["records"] == 4 * 30 * 3 for row in rows)
    assert all(row["prune_us_per_record"] > 0 and row["partition_states_ms_per_asset"] > 0 for row in rows)


def test_a_tuned_sample_gives_the_collector_back(tmp_path):
    """``--tune-gc`` sets the collector as the command line does for the measured part
    only: afterwards nothing stays frozen (a frozen runtime, closed, would never be
    freed) and the thresholds are as they were, for the next sample."""
    import gc

    import anyio

    from stress.sqlite import _backfill

    before = gc.get_threshold()
    anyio.run(_backfill, tmp_path / "r.db", 20, "NORMAL", True)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
