"""The web view under load (issue #16 figures): a real ``flowstone web`` process on an
embedded SQLite store holding ``--partitions`` partitions of one asset (every 97th
failed), and a pipeline of ``--assets`` assets for the graph page. Time to first byte
and to the last byte of the asset page: the first look on a fresh server (the health
read from the store now), later looks (the health kept by the server: over a second
old, shown as it was and refreshed after the answer; or within the second); of the
graph page and of a record page; and the server's RSS (median of ``--repeat``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import emit

HEALTH_SECONDS = 1.0
"""How long the server keeps an asset's health (flowstone.web.data.HealthCache)."""

PIPELINE = '''
from datetime import date, timedelta
import flowstone as fs

START = date(2026, 1, 1) - timedelta(days={partitions})
days = fs.DailyPartitions(start=START, end=date(2025, 12, 31))
pipeline = fs.Pipeline("web-load")

@pipeline.asset(partitioned_by=days, code_version="1")
async def events(ctx, deps):
    if ctx.partition.toordinal() % 97 == 0:
        raise ValueError("a bad day")
    return 1

# A graph of {assets} assets: layers of ten, each reading two of the layer before.
previous = []
for n in range({assets}):
    layer, index = divmod(n, 10)
    ups = [f"a{{(layer - 1) * 10 + (index + k) % 10}}" for k in (0, 3)] if layer else []
    pipeline.add(fs.Asset(name=f"a{{n}}", depends_on=ups, execute_fn=lambda ctx, deps: 1))
'''


def _fill(folder: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flowstone", "backfill", "events", "--max-parallel", "50", "--json"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode not in (0, 1):
        raise SystemExit(f"the backfill failed: {done.stderr}")
    return time.perf_counter() - start


def _get(url: str) -> tuple[float, float, int]:
    """(seconds to the response headers, seconds to the last byte, body bytes)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    start = time.perf_counter()
    connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
    response = connection.getresponse()
    first = time.perf_counter() - start
    body = response.read()
    last = time.perf_counter() - start
    connection.close()
    if response.status != 200:
        raise SystemExit(f"{url}: HTTP {response.status}")
    return first, last, len(body)


def _start(folder: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """A ``flowstone web`` process on any free port, and its URL once it serves (after
    its start-up, which makes every asset's partition keys)."""
    server = subprocess.Popen([sys.executable, "-m", "flowstone", "web", "--port", "0"], cwd=folder, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    url = None
    for line in server.stderr:
        if found := re.search(r"web view on (http://\S+)", line):
            url = found.group(1)
        elif url is not None and "Running on" in line:  # Hypercorn's word: started up, serving
            return server, url
    raise SystemExit("the web server did not start")


def _stop(server: subprocess.Popen[str]) -> None:
    server.terminate()
    server.wait(timeout=60)
    assert server.stderr is not None
    server.stderr.close()


def _row(label: str, samples: list[tuple[float, float, int]]) -> dict[str, Any]:
    return {"scenario": label, "first_byte_ms": round(1000 * statistics.median(s[0] for s in samples), 1),
            "full_load_ms": round(1000 * statistics.median(s[1] for s in samples), 1),
            "kb": round(samples[0][2] / 1024, 1)}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stress web", description=__doc__)
    parser.add_argument("--partitions", type=int, default=100_000)
    parser.add_argument("--assets", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flowstone-web-") as folder:
        Path(folder, "load.py").write_text(PIPELINE.format(partitions=args.partitions, assets=args.assets))
        env = {k: v for k, v in os.environ.items() if k not in ("FLOWSTONE_DSN",)}
        env["FLOWSTONE_PIPELINE"] = "load:pipeline"
        filled = _fill(folder, env)
        first_html = []
        for _ in range(args.repeat):  # the first look at the asset on a fresh server: its health read now
            server, url = _start(folder, env)
            try:
                first_html.append(_get(url + "/assets/events"))
            finally:
                _stop(server)
        rows.append(_row(f"asset page, {args.partitions:,} partitions (HTML), first look: health read now",
                         first_html))
        server, url = _start(folder, env)
        try:
            rss_start = _rss_mb(server.pid)
            import json
            import urllib.request

            with urllib.request.urlopen(f"{url}/api/assets/events") as answer:
                record = f"/records/{json.load(answer)['records'][0]['id']}"
            for label, path, pause in (
                (f"asset page, {args.partitions:,} partitions (HTML), health over a second old: shown, then "
                 "refreshed", "/assets/events", HEALTH_SECONDS + 0.1),
                (f"asset page, {args.partitions:,} partitions (JSON), the same", "/api/assets/events",
                 HEALTH_SECONDS + 0.1),
                (f"asset page, {args.partitions:,} partitions (HTML), within the second", "/assets/events", 0.0),
                (f"graph page, {args.assets} assets (SVG)", "/", 0.0),
                ("a record page with its lineage", record, 0.0),
            ):
                _get(url + path)  # warm
                samples = []
                for _ in range(args.repeat):
                    time.sleep(pause)
                    samples.append(_get(url + path))
                rows.append(_row(label, samples))
            rows.append({"scenario": "server RSS (MB) at start / after the requests", "rss_start_mb": rss_start,
                         "rss_after_mb": _rss_mb(server.pid)})
        finally:
            _stop(server)
    return emit("web", rows, {**vars(args), "fill_seconds": round(filled, 1)})
