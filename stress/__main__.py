"""``python -m stress list`` | ``python -m stress <scenario> [options]``.

Each scenario is bounded in count and time, prints a table and then one JSON
line, and exits non-zero if it cannot complete.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import (
    cascade,
    chaos,
    checkpoints,
    core,
    daemon,
    dagster,
    executors,
    flights_dagster,
    follow,
    instructions,
    io,
    load,
    memory,
    postgres,
    processes,
    ranges,
    retention,
    runtime,
    scale,
    schedules,
    soak,
    sqlite,
    startup,
    web,
    workers,
)

SCENARIOS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "backfill": (load.run_backfill, "backfill throughput on memory, filesystem and Postgres, integrity checked"),
    "cancel-storm": (load.run_cancel_storm, "backfills and materializations cancelled at random: nothing left open"),
    "cascade": (cascade.run, "the stale cascade and retention at 1,000 and 100,000 partitions, PostgreSQL (#18)"),
    "chaos": (chaos.run, "backfills while actors die, IO fails, Postgres drops, S3 restarts; then an integrity check"),
    "checkpoints": (checkpoints.run,
                    "a backfill's saves and listings at 10,000 and 1,000,000 listed partitions, each store (#18)"),
    "core": (core.run, "planning cost (graph, order, layers, validate) and partition key throughput"),
    "daemon": (daemon.run, "flowstone daemon: idle CPU/RSS, tick latency, takeover after SIGKILL (issue #15)"),
    "dagster": (dagster.run,
                "the same chains, fans and backfills in FlowStone and in Dagster, one run (--dagster-python)"),
    "dags": (load.run_dags, "a 1-1000-1 fan and a 500-asset chain, one materialize each"),
    "executors": (executors.run, "a CPU-bound 8-partition backfill with executor='thread' and 'process' (issue #12)"),
    "flights-dagster": (flights_dagster.run, "the flights main job in FlowStone and in Dagster (--dagster-python)"),
    "follow": (follow.run, "the daemon's look for an eager asset's new upstream successes, 1,000 to 100,000 stored"),
    "instructions": (instructions.run, "instructions per materialization under callgrind: deterministic, for A/B"),
    "io": (io.run, "Parquet and S3 round trips of a 1M-row table (time, peak memory), S3IO(json) backfill (issue #5)"),
    "memory": (memory.run, "where a backfill's memory goes: store records vs the runtime's own share"),
    "postgres": (postgres.run, "backfills with records in PostgreSQL, fsync on: 366 and 10,000 partitions (issue #4)"),
    "processes": (processes.run,
                  "several OS processes backfilling the same partitions over one PostgreSQL: each computed once"),
    "ranges": (ranges.run,
               "backfill over 10 million hourly partitions: time to return, memory, saved spec (issue #12)"),
    "registrations": (load.run_registrations, "many tasks registering assets into one running runtime"),
    "retention": (retention.run, "one retention pass over 200 assets of 500 partitions, each store (issue #18)"),
    "runtime": (runtime.run, "materialize chains and fans, backfill 366 and 100,000 partitions (issue #3 figures)"),
    "scale": (scale.run, "one memory-store backfill at 366 ... 1,000,000 partitions: flat cost per partition? (#18)"),
    "schedules": (schedules.run, "100 schedules through an accelerated hour: every tick once, none lost (issue #15)"),
    "soak": (soak.run, "mixed load with chaos for --minutes (default 10): memory must stay flat"),
    "sqlite": (sqlite.run,
               "backfills with records in the embedded SQLite store: 366, 10,000; status of 100,000 (issue #14)"),
    "startup": (startup.run, "import flowstone, flowstone --help, and the flights example's main job (issue #14)"),
    "store-writes": (load.run_store_writes, "many tasks writing records into the memory store at once"),
    "web": (web.run, "flowstone web at 100,000 partitions and 200 assets: first byte, full load, RSS (issue #16)"),
    "workers": (workers.run, "flowstone worker processes: CPU-bound 1 vs 2, per-job overhead, queue latency (#17)"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "list":
        for scenario, (_run, about) in SCENARIOS.items():
            print(f"{scenario:12} {about}")
        return 0
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}; try: python -m stress list", file=sys.stderr)
        return 2
    SCENARIOS[name][0](rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
