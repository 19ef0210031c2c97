"""``python -m stress list`` | ``python -m stress <scenario> [options]``.

Each scenario is bounded in count and time, prints a table and then one JSON
line, and exits non-zero if it cannot complete.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import core, instructions, io, memory, postgres, runtime

SCENARIOS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "core": (core.run, "planning cost (graph, order, layers, validate) and partition key throughput"),
    "instructions": (instructions.run, "instructions per materialization under callgrind: deterministic, for A/B"),
    "io": (io.run, "Parquet and S3 round trips of a 1M-row table (time, peak memory), S3IO(json) backfill (issue #5)"),
    "memory": (memory.run, "where a backfill's memory goes: store records vs the runtime's own share"),
    "postgres": (postgres.run, "backfills with records in PostgreSQL, fsync on: 366 and 10,000 partitions (issue #4)"),
    "runtime": (runtime.run, "materialize chains and fans, backfill 366 and 100,000 partitions (issue #3 figures)"),
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
