"""``flowstone daemon`` as real processes: a standby takes over from a daemon killed
outright with no tick lost or doubled; SIGTERM mid-backfill gives work its grace,
then cancels it, leaves every record terminal and exits 0. The tests follow each
daemon's log lines (what it says it did), never the clock."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from followed import Followed

TICKING = '''
import flowstone as fs

pipeline = fs.Pipeline("ticking")

@pipeline.asset(code_version="1")
async def beat(ctx, deps):
    return 1

pipeline.schedule("beat", "* * * * * *", catch_up=100)  # every second; missed ones run after a takeover
'''

HELD = '''
import logging
from datetime import date
import anyio
import flowstone as fs

days = fs.DailyPartitions(start=date(2024, 1, 1), end=date(2024, 1, 31))
pipeline = fs.Pipeline("held")

@pipeline.asset(partitioned_by=days, code_version="1")
async def held(ctx, deps):
    if ctx.partition_key != "2024-01-01":  # the first one finishes; the others wait forever
        logging.getLogger("flowstone.held").warning("waiting in %s", ctx.partition_key)
        await anyio.sleep_forever()
    return 1
'''

class Daemon(Followed):
    """A ``flowstone daemon`` (or ``dev``) process."""

    def __init__(self, folder: Path, env: dict[str, str], *args: str, command: str = "daemon") -> None:
        super().__init__(folder, env, command, *args)

    def stop(self, sig: int = signal.SIGKILL) -> int:  # what a test left running is killed
        return super().stop(sig)


def _project(folder: Path, module: str, text: str, store: str | None) -> dict[str, str]:
    (folder / f"{module}.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWSTONE_DSN", "FLOWSTONE_PIPELINE")}
    env["FLOWSTONE_PIPELINE"] = f"{module}:pipeline"
    if store is not None:
        env["FLOWSTONE_DSN"] = store
    return env


def _flowstone(folder: Path, env: dict[str, str], *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "flowstone", *args, "--json"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str | None:
    if request.param == "sqlite":
        return None  # the embedded default
    return request.getfixturevalue("pg_dsn")


def test_a_standby_takes_over_from_a_killed_daemon_with_no_tick_lost_or_doubled(tmp_path, store_url):
    env = _project(tmp_path, "ticking", TICKING, store_url)
    assert subprocess.run([sys.executable, "-m", "flowstone", "migrate"], cwd=tmp_path, env=env,
                          timeout=120).returncode == 0
    hold = "1.5"
    first = Daemon(tmp_path, env, "--hold", hold)
    second = None
    try:
        first.wait_for(r"active \(fence \d+\)")
        second = Daemon(tmp_path, env, "--hold", hold)
        second.wait_for(r"standby; .* is active")
        first.wait_for(r"tick \S+ runs beat", count=3)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
        taken = second.wait_for(r"active \(fence \d+, taken over from (\S+)\)")[0]
        assert taken.group(1).split(":")[1] == str(first.process.pid)
        second.wait_for(r"tick \S+ runs beat", count=3)
        second.process.send_signal(signal.SIGTERM)
        second.rest()
        assert second.process.wait(timeout=60) == 0, second.seen
    finally:
        first.stop()
        if second is not None:
            second.stop()
    [schedule] = _flowstone(tmp_path, env, "status")["schedules"]
    assert schedule["state"] in ("succeeded", "skipped")
    ticks = _ticks(tmp_path, store_url, schedule["schedule"])
    times = [at for at, _, _ in ticks]
    assert times == [times[0] + timedelta(seconds=n) for n in range(len(times))]  # every second, each once
    assert {state for _, _, state in ticks} <= {"succeeded", "skipped"}  # none left running
    assert len({owner for _, owner, _ in ticks}) == 2 and len(times) >= 5  # 3 + 3, one may be a rerun


def _ticks(folder: Path, store_url: str | None, schedule: str) -> list[tuple[datetime, str, str]]:
    """(time, owner, state) of each recorded tick, read straight from the store's tables."""
    if store_url is None:
        with sqlite3.connect(folder / ".flowstone" / "flowstone.db") as db:
            rows = db.execute("SELECT at, owner, state FROM flowstone_ticks WHERE schedule = ? ORDER BY at",
                              (schedule,)).fetchall()
        return [(datetime.fromisoformat(at), owner, state) for at, owner, state in rows]
    import anyio
    import asyncpg

    async def read() -> list:
        connection = await asyncpg.connect(store_url)
        try:
            return await connection.fetch(
                "SELECT at, owner, state FROM flowstone_ticks WHERE schedule = $1 ORDER BY at", schedule)
        finally:
            await connection.close()

    return [tuple(row) for row in anyio.run(read)]


def test_sigterm_mid_backfill_gives_the_grace_then_cancels_and_exits_0(tmp_path):
    env = _project(tmp_path, "held", HELD, None)
    # A backfill interrupted by Ctrl-C: the daemon resumes it when it starts.
    backfill = subprocess.Popen(
        [sys.executable, "-m", "flowstone", "backfill", "held", "--max-parallel", "2"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert backfill.stdout.readline().startswith("backfill held: 1/31")  # the first partition is done
        backfill.send_signal(signal.SIGINT)
        _, err = backfill.communicate(timeout=60)
        assert backfill.returncode == 130, err
    finally:
        backfill.kill()
        backfill.communicate()
    [saved] = _flowstone(tmp_path, env, "backfills")["backfills"]
    assert (saved["state"], saved["succeeded"]) == ("cancelled", 1)

    daemon = Daemon(tmp_path, env, "--grace", "1", "--log-format", "json")
    try:
        daemon.wait_for(rf"backfill {saved['id']} \(held\): resumed")
        daemon.wait_for(r"waiting in 2024-01-", count=2)  # both workers wait inside the asset function
        daemon.process.send_signal(signal.SIGTERM)
        daemon.rest()
        assert daemon.process.wait(timeout=60) == 0, daemon.seen
    finally:
        daemon.stop()
    logged = [json.loads(line) for line in daemon.seen]  # every line is one JSON object
    messages = [entry["message"] for entry in logged]
    assert any("SIGTERM: stopping" in m for m in messages) and any("has 1s to finish" in m for m in messages)
    assert {"time", "level", "logger", "message"} <= set(logged[0])
    [after] = _flowstone(tmp_path, env, "backfills")["backfills"]
    assert (after["state"], after["succeeded"], after["running"]) == ("cancelled", 1, 0)
    assert _flowstone(tmp_path, env, "records", "--status", "running")["records"] == []
    assert _flowstone(tmp_path, env, "records", "--status", "pending")["records"] == []
    cancelled = _flowstone(tmp_path, env, "records", "--status", "cancelled", "--limit", "100")["records"]
    assert len(cancelled) >= 4  # two cut by Ctrl-C, two by the end of the grace
    assert (after["state"], after["interrupted"]) == ("cancelled", True)  # the next daemon resumes it ...
    assert _flowstone(tmp_path, env, "cancel", saved["id"])["state"] == "cancelled"
    [final] = _flowstone(tmp_path, env, "backfills")["backfills"]
    assert (final["state"], final["interrupted"]) == ("cancelled", False)  # ... unless cancelled for good


WATCHING = '''
import os
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2024, 1, 1), end=date(2024, 1, 31))
pipeline = fs.Pipeline("watching")

@pipeline.asset(partitioned_by=days, code_version="1")
async def raw(ctx, deps):
    return int(ctx.partition_key[-2:])

@pipeline.asset(depends_on=["raw"], partitioned_by=days, code_version="1", automation=fs.Eager())
async def clean(ctx, deps):
    return deps["raw"] * 10

@pipeline.sensor(interval=0.2)
async def inbox(ctx):
    """A file per day dropped in the inbox asks for that day's raw data."""
    names = sorted(n for n in os.listdir(os.environ["INBOX"]) if n > (ctx.cursor or ""))
    if names:
        ctx.cursor = names[-1]
    return [fs.RunRequest("raw", name) for name in names]
'''


def test_a_sensor_and_eager_automation_in_a_daemon_process(tmp_path):
    env = _project(tmp_path, "watching", WATCHING, None)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env["INBOX"] = str(inbox)
    listed = _flowstone(tmp_path, env, "assets")
    assert [(a["name"], a["automation"]) for a in listed["assets"]] == [("raw", None), ("clean", "eager")]
    assert listed["sensors"] == [{"name": "inbox", "interval": 0.2}]
    daemon = Daemon(tmp_path, env, "--automation-interval", "0.2")
    try:
        daemon.wait_for(r"active \(fence \d+\), 0 schedules, 1 sensors")
        (inbox / "2024-01-02").touch()
        daemon.wait_for(r"automation: raw @ 2024-01-02 runs \(sensor inbox\)")
        daemon.wait_for(r"automation: clean @ 2024-01-02 runs \(an upstream asset changed\)")
        (inbox / "2024-01-05").touch()
        daemon.wait_for(r"automation: clean @ 2024-01-05 runs")
        daemon.process.send_signal(signal.SIGTERM)
        daemon.rest()
        assert daemon.process.wait(timeout=60) == 0, daemon.seen
    finally:
        daemon.stop()
    status = _flowstone(tmp_path, env, "status")
    [sensor] = status["sensors"]
    assert (sensor["sensor"], sensor["cursor"], sensor["error"]) == ("inbox", "2024-01-05", None)
    clean = next(a for a in status["assets"] if a["asset"] == "clean")
    assert clean["counts"]["succeeded"] == 2
    assert sum("clean @ 2024-01-02 runs" in line for line in daemon.seen) == 1  # once, never in a loop


def test_dev_runs_the_daemon_on_the_example_when_no_pipeline_is_configured(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWSTONE_DSN", "FLOWSTONE_PIPELINE")}
    daemon = Daemon(tmp_path, env, "--port", "0", command="dev")
    try:
        daemon.wait_for(r"no pipeline configured: running the example \(flowstone.examples.flights:pipeline\)")
        web, active = r"web view on (http://127.0.0.1:\d+)", r"active \(fence 1\), 1 schedules"
        url = daemon.wait_for_all(web, active)[web].group(1)
        with urllib.request.urlopen(f"{url}/api/graph", timeout=30) as answer:  # the web view beside it
            assert "yearly_report" in {a["name"] for a in json.load(answer)["assets"]}
        daemon.process.send_signal(signal.SIGINT)  # Ctrl-C in the terminal
        daemon.rest()
        assert daemon.process.wait(timeout=60) == 0, daemon.seen
    finally:
        daemon.stop()
    assert (tmp_path / ".flowstone" / "flowstone.db").is_file()  # the embedded store, made on first use
