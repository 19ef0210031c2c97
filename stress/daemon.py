"""The daemon as a user runs it (issue #15 figures), each part a real ``flowstone daemon``
process on the embedded SQLite store in a fresh folder:

- idle: one daily schedule and one Eager asset (looked at every 10 s), nothing due;
  CPU time and RSS of the process sampled every ``--sample`` seconds for
  ``--idle-seconds`` (expect ~0% and flat);
- latency: a schedule ticking every second for ``--ticks`` ticks; from each tick's
  time to the daemon starting its materialization (the time of its JSON log line);
- takeover: an active daemon and a standby (``--hold`` seconds each); SIGKILL the
  active one and time until the standby says it took over, ``--takeovers`` times;
  then every tick of the schedule is checked: one per second, none twice, none left.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .report import emit

IDLE = '''
import flowstone as fs

pipeline = fs.Pipeline("idle")

@pipeline.asset(code_version="1")
async def report(ctx, deps):
    return 1

@pipeline.asset(depends_on=["report"], code_version="1", automation=fs.Eager())
async def summary(ctx, deps):
    return deps["report"]

pipeline.schedule("report", "0 6 * * *")
'''

TICKING = '''
import flowstone as fs

pipeline = fs.Pipeline("ticking")

@pipeline.asset(code_version="1")
async def beat(ctx, deps):
    return 1

pipeline.schedule("beat", "* * * * * *", catch_up=1000)
'''

TICKS_PER_SECOND = re.compile(r"tick \S+ runs beat")


class _Daemon:
    def __init__(self, folder: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("FLOWSTONE_DSN", "FLOWSTONE_PIPELINE")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowstone", "daemon", *args], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.latencies: list[float] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put((time.perf_counter(), line.rstrip("\n")))
        self.lines.put(None)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120.0) -> float:
        """When (perf_counter) the ``count``-th line matching ``pattern`` was read."""
        deadline = time.perf_counter() + timeout
        while True:
            item = self.lines.get(timeout=max(0.01, deadline - time.perf_counter()))
            if item is None:
                raise SystemExit(f"the daemon ended before saying {pattern!r}")
            at, line = item
            self._note_latency(line)
            if re.search(pattern, line):
                count -= 1
                if count == 0:
                    return at

    def _note_latency(self, line: str) -> None:
        """A JSON line saying a tick runs: how long after the tick's time it was written."""
        if not line.startswith("{"):
            return
        entry = json.loads(line)
        tick = re.search(r"tick (\S+) runs", entry["message"])
        if tick:
            written = datetime.fromisoformat(entry["time"])
            self.latencies.append((written - datetime.fromisoformat(tick.group(1))).total_seconds())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        assert self.process.stderr is not None
        return code


def _project(folder: str, text: str) -> None:
    Path(folder, "pipeline.py").write_text(text)
    Path(folder, "pyproject.toml").write_text('[tool.flowstone]\npipeline = "pipeline:pipeline"\n')
    subprocess.run([sys.executable, "-m", "flowstone", "migrate"], cwd=folder, check=True, capture_output=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _idle(seconds: float, every: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flowstone-idle-") as folder:
        _project(folder, IDLE)
        daemon = _Daemon(folder)
        try:
            daemon.wait_for(r"active \(fence")
            pid = daemon.process.pid
            start, cpu0 = time.perf_counter(), _cpu_seconds(pid)
            samples = [_rss_mb(pid)]
            while time.perf_counter() - start < seconds:
                time.sleep(min(every, seconds - (time.perf_counter() - start)))
                samples.append(_rss_mb(pid))
            cpu = _cpu_seconds(pid) - cpu0
            wall = time.perf_counter() - start
        finally:
            code = daemon.stop()
    return {
        "scenario": f"idle daemon for {wall:.0f}s (SQLite, 1 daily schedule, 1 Eager asset)",
        "cpu_pct": round(100 * cpu / wall, 3), "cpu_s": round(cpu, 2),
        "rss_first_mb": round(samples[0], 1), "rss_half_mb": round(samples[len(samples) // 2], 1),
        "rss_last_mb": round(samples[-1], 1),
        "rss_max_mb": round(max(samples), 1), "samples": len(samples), "exit": code,
    }


def _ticks(folder: str) -> list[tuple[datetime, str]]:
    """(time, state) of every recorded tick of the one schedule, from the store's table."""
    with sqlite3.connect(Path(folder, ".flowstone", "flowstone.db")) as db:
        rows = db.execute("SELECT at, state FROM flowstone_ticks ORDER BY at").fetchall()
    return [(datetime.fromisoformat(at), state) for at, state in rows]


def _latency(ticks: int) -> dict[str, Any]:
    """From each tick's time to the daemon starting its materialization, read from the
    daemon's JSON log line for it (its time has millisecond precision)."""
    with tempfile.TemporaryDirectory(prefix="flowstone-latency-") as folder:
        _project(folder, TICKING)
        daemon = _Daemon(folder, "--grace", "5", "--log-format", "json")
        try:
            daemon.wait_for(r"active \(fence")
            daemon.wait_for(TICKS_PER_SECOND.pattern, count=ticks)
        finally:
            code = daemon.stop()
    ms = sorted(1000 * x for x in daemon.latencies)
    return {
        "scenario": f"tick time -> its materialization starts ({len(ms)} ticks, every second)",
        "median_ms": round(statistics.median(ms), 1), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1), "exit": code,
    }


def _takeover(hold: float, rounds: int) -> dict[str, Any]:
    times = []
    with tempfile.TemporaryDirectory(prefix="flowstone-takeover-") as folder:
        _project(folder, TICKING)
        active = _Daemon(folder, "--hold", str(hold))
        active.wait_for(r"active \(fence")
        for _ in range(rounds):
            standby = _Daemon(folder, "--hold", str(hold))
            standby.wait_for(r"standby; ")
            active.wait_for(TICKS_PER_SECOND.pattern, count=2)
            active.process.send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            active.process.wait(timeout=30)
            times.append(standby.wait_for(r"taken over from", timeout=hold * 4 + 60) - killed)
            active = standby
        active.wait_for(TICKS_PER_SECOND.pattern, count=2)
        code = active.stop()

        ticks = _ticks(folder)
    gaps = sum(1 for (a, _), (b, _) in itertools.pairwise(ticks) if b - a != timedelta(seconds=1))
    left = sum(1 for _, state in ticks if state not in ("succeeded", "skipped"))
    return {
        "scenario": f"takeover after SIGKILL of the active daemon (--hold {hold:g}, {rounds} times)",
        "median_s": round(statistics.median(times), 2), "max_s": round(max(times), 2),
        "ticks": len(ticks), "ticks_missing": gaps, "ticks_unfinished": left, "exit": code,
    }


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress daemon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-seconds", type=float, default=300.0)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples (10)")
    parser.add_argument("--ticks", type=int, default=60)
    parser.add_argument("--hold", type=float, action="append", help="hold seconds to test takeover with (15, 1.5)")
    parser.add_argument("--takeovers", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["idle", "latency", "takeover"])
    args = parser.parse_args(argv)
    rows = []
    if "latency" not in args.skip:
        rows.append(_latency(args.ticks))
    if "takeover" not in args.skip:
        rows += [_takeover(hold, args.takeovers) for hold in args.hold or [15.0, 1.5]]
    if "idle" not in args.skip:
        rows.append(_idle(args.idle_seconds, args.sample))
    failures = [r for r in rows if r.get("exit") != 0 or r.get("ticks_missing") or r.get("ticks_unfinished")]
    result = emit("daemon", rows, vars(args))
    if failures:
        raise SystemExit(f"failed: {failures}")
    return result
