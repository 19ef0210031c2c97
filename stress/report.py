"""How every scenario reports: an aligned table for people, one JSON line for tools."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def _status_bytes(field: str) -> int | None:
    """A size field of Linux's ``/proc/self/status`` in bytes, or None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process's own address space so far.

    Linux's ``VmHWM`` rather than ``ru_maxrss``: the latter survives ``execve``,
    so a child started by a big parent (vfork, then exec) reports the parent's
    peak as its own.
    """
    found = _status_bytes("VmHWM")
    if found is not None:
        return found
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """Resident memory of this process now (Linux; 0 where unknown)."""
    return _status_bytes("VmRSS") or 0


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn``, one each."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def emit(scenario: str, rows: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """Print ``rows`` as a table, then one JSON line with everything; return it."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"scenario: {scenario}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    record = {
        "scenario": scenario,
        "options": options,
        "python": platform.python_version(),
        "peak_rss_bytes": peak_rss_bytes(),
        "rows": rows,
    }
    print(json.dumps(record, sort_keys=True))
    return record


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_MEASURED = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
for command in json.loads(sys.argv[1]):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stdout + done.stderr)
elapsed = time.perf_counter() - start
print(json.dumps([elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))
"""


def child_json(command: list[str], *, timeout: float, cwd: str | None = None,
               env: dict[str, str] | None = None) -> Any:
    """Run ``command`` (a child measuring something) and read the JSON of the last line
    it prints; SystemExit with the end of its stderr when it fails."""
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_measured(commands: list[list[str]], cwd: str, timeout: float = 3600) -> tuple[float, float]:
    """Run ``commands`` one after another under a watcher process of their own;
    their seconds in all, and the largest peak RSS (MB) among them (the watcher's
    children only, so nothing else this process ran counts)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _MEASURED, json.dumps(commands)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{commands} failed: {done.stderr}{done.stdout}")
    elapsed, peak = json.loads(done.stdout)
    return elapsed, peak
