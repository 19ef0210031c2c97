"""Start-up and the example's main job, as a user meets them (issue #14 figures).

``import flowstone`` and ``flowstone --help`` in fresh interpreters (median of
``--repeat``); then the flights example's main job in a fresh folder: the
365-day backfill of ``delays`` through the command line, ``materialize
yearly_report``, and the same backfill again (everything skipped), each with
its time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import emit, median, run_measured


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed: {done.stderr}")
    return time.perf_counter() - start


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress startup", description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-example", action="store_true", help="skip the flights main job")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    flowstone = [sys.executable, "-m", "flowstone"]
    for label, command, target in (
        ("python -c pass (the interpreter alone)", [sys.executable, "-c", "pass"], None),
        ("import flowstone", [sys.executable, "-c", "import flowstone"], 150),
        ("flowstone --help", [*flowstone, "--help"], 150),
    ):
        samples = [_seconds(command) for _ in range(args.repeat)]
        row: dict[str, Any] = {"scenario": label, "median_ms": median(samples) * 1e3, "best_ms": min(samples) * 1e3}
        if target:
            row["target_ms"] = target
        rows.append(row)
    if not args.no_example:
        with tempfile.TemporaryDirectory(prefix="flowstone-flights-") as folder:
            Path(folder, "pyproject.toml").write_text(
                '[tool.flowstone]\npipeline = "flowstone.examples.flights:pipeline"\n')
            for label, command in (
                ("flights: backfill delays over 2013 (365 days, 3 assets each)",
                 [*flowstone, "backfill", "delays", "--from", "2013-01-01", "--to", "2013-12-31"]),
                ("flights: materialize yearly_report (reads every partition)",
                 [*flowstone, "materialize", "yearly_report"]),
                ("flights: the same backfill again (everything skipped)",
                 [*flowstone, "backfill", "delays", "--from", "2013-01-01", "--to", "2013-12-31"]),
                ("flights: status", [*flowstone, "status"]),
            ):
                elapsed, peak = run_measured([command], folder)
                rows.append({"scenario": label, "median_ms": elapsed * 1e3, "peak_rss_mb": peak})
    return emit("startup", rows, {"repeat": args.repeat, "example": not args.no_example})
