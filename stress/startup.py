"""Start-up and the example's main job, as a user meets them (issue #14 figures).

``import flowstone`` and ``flowstone --help`` in fresh interpreters (median of
``--repeat``); then the flights example's main job in a fresh folder: the
365-day backfill of ``delays`` through the command line, ``materialize
yearly_report``, and the same backfill again (everything skipped), each with
its time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import emit, median


def _timed(command: list[str], cwd: str | None = None) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command} failed: {done.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: only a new maximum is this child's own.
    return elapsed, max(peak, before) / 1024


def _peak_of(command: list[str], cwd: str) -> tuple[float, float]:
    """Seconds and this command's own peak RSS (MB), measured by a wrapper process."""
    code = (
        "import resource, subprocess, sys, time, json\n"
        "start = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "elapsed = time.perf_counter() - start\n"
        "if done.returncode: sys.exit(done.stderr)\n"
        "print(json.dumps([elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *command], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed: {done.stderr}")
    import json

    elapsed, peak = json.loads(done.stdout)
    return elapsed, peak


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
        samples = [_timed(command)[0] for _ in range(args.repeat)]
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
                elapsed, peak = _peak_of(command, folder)
                rows.append({"scenario": label, "median_ms": elapsed * 1e3, "peak_rss_mb": peak})
    return emit("startup", rows, {"repeat": args.repeat, "example": not args.no_example})
