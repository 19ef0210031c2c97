"""The command line, driven as a user drives it: real subprocesses in a project folder."""

from __future__ import annotations

import gc
import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from flowstone.plumbing.collector import YOUNG_THRESHOLD

DEMO = '''
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2024, 1, 1), end=date(2024, 1, 31))
pipeline = fs.Pipeline("demo")

@pipeline.asset(partitioned_by=days, code_version="1")
async def raw(ctx, deps):
    return {"day": ctx.partition_key, "n": 3}

@pipeline.asset(depends_on=["raw"], partitioned_by=days, code_version="1")
async def clean(ctx, deps):
    if ctx.partition_key == "2024-01-13":
        raise ValueError("bad data on the 13th")
    return deps["raw"]["n"] * 2

@pipeline.asset(depends_on=["clean"], code_version="1")
async def report(ctx, deps):
    return sum(deps["clean"].values())
'''


class Project:
    """A folder with a pipeline module, where ``run(...)`` is ``flowstone ...``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "demo.py").write_text(DEMO)
        (folder / "pyproject.toml").write_text('[tool.flowstone]\npipeline = "demo:pipeline"\n')

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FLOWSTONE_DSN", "FLOWSTONE_PIPELINE")}
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowstone", *args], cwd=self.folder, env=env or self.env(),
            capture_output=True, text=True, timeout=120,
        )

    def json(self, *args: str) -> dict:
        done = self.run(*args, "--json")
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("flowstone: error: ")
    assert "Traceback" not in done.stderr
    return lines[0]


# ------------------------------------------------------------------ reading


def test_help_and_version_need_no_pipeline(project):
    done = project.run("--help")
    assert done.returncode == 0 and "backfill" in done.stdout and "exit codes" in done.stdout
    version = project.run("--version")
    assert version.returncode == 0 and version.stdout.startswith("flowstone ")
    assert project.run().returncode == 2  # no command: usage


def test_assets_and_graph_in_every_format(project):
    (project.folder / "demo.py").write_text(
        DEMO + '\npipeline.schedule("report", "0 6 * * *", timezone="Europe/Lisbon")\n')
    listed = project.json("assets")
    [schedule] = listed["schedules"]
    assert (schedule["asset"], schedule["cron"], schedule["timezone"]) == ("report", "0 6 * * *", "Europe/Lisbon")
    assert schedule["next_tick"].endswith("+00:00")
    assets = listed["assets"]
    assert [a["name"] for a in assets] == ["raw", "clean", "report"]
    assert assets[1]["depends_on"] == ["raw"] and assets[1]["partitions"] == "daily 2024-01-01..2024-01-31"
    graph = project.json("graph")
    assert graph == {"assets": ["raw", "clean", "report"], "edges": [["raw", "clean"], ["clean", "report"]]}
    text = project.run("graph").stdout
    assert text.splitlines() == ["raw", "`-- clean", "    `-- report"]
    mermaid = project.run("graph", "--format", "mermaid").stdout
    assert "raw --> clean" in mermaid and mermaid.startswith("graph LR")
    dot = project.run("graph", "--format", "dot").stdout
    assert '"clean" -> "report";' in dot and dot.startswith("digraph")


def test_the_pipeline_comes_from_the_option_then_the_environment_then_pyproject(project):
    (project.folder / "other.py").write_text(DEMO.replace('"demo"', '"other"').replace("report", "summary"))
    assert [a["name"] for a in project.json("assets")["assets"]][-1] == "report"
    env = project.env(FLOWSTONE_PIPELINE="other:pipeline")
    assert "summary" in project.run("assets", env=env).stdout
    given = project.run("--pipeline", "demo:pipeline", "assets", env=env)
    assert "report" in given.stdout and "summary" not in given.stdout
    after = project.run("assets", "--pipeline", "demo:pipeline", env=env)  # the option works after the command too
    assert "report" in after.stdout


# ------------------------------------------------------------------ running


def test_backfill_status_records_lineage_and_a_second_run_that_skips_everything(project):
    first = project.run("backfill", "clean", "--from", "2024-01-01", "--to", "2024-01-31", "--json")
    assert first.returncode == 1, first.stderr  # one partition failed
    outcome = json.loads(first.stdout)
    assert (outcome["state"], outcome["total"], outcome["succeeded"], outcome["failed"]) == ("failed", 31, 30, 1)
    assert outcome["errors"][0]["partition"] == "2024-01-13" and "bad data" in outcome["errors"][0]["error"]

    status = {a["asset"]: a for a in project.json("status")["assets"]}
    assert status["raw"]["counts"]["succeeded"] == 31
    assert status["clean"]["counts"] == {"succeeded": 30, "failed": 1, "missing": 0, "stale": 0, "running": 0}
    assert status["clean"]["ranges"]["succeeded"] == [
        ["2024-01-01", "2024-01-12", 12], ["2024-01-14", "2024-01-31", 18]]
    assert status["report"]["counts"]["missing"] == 1

    again = project.run("backfill", "clean", "--from", "2024-01-01", "--to", "2024-01-12", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == 12  # nothing recomputed: the store remembered

    failed = project.json("records", "clean", "--status", "failed")["records"]
    assert [r["partition"] for r in failed] == ["2024-01-13"]
    one = project.json("records", "clean", "--partition", "2024-01-05")["records"]
    assert [r["status"] for r in one] == ["success"]
    lineage = project.json("lineage", "clean", "--partition", "2024-01-05")
    assert lineage["asset"] == "clean" and lineage["children"][0]["asset"] == "raw"
    assert lineage["children"][0]["partitions"] == ["2024-01-05"]
    down = project.json("lineage", "raw", "--partition", "2024-01-05", "--downstream")
    assert down["children"][0]["asset"] == "clean"
    backfills = project.json("backfills")["backfills"]
    assert [b["state"] for b in backfills] == ["succeeded", "failed"]

    text = project.run("status").stdout
    assert "2024-01-01..2024-01-12 (12), 2024-01-14..2024-01-31 (18)" in text


def test_status_shows_each_schedules_last_tick_and_the_daemons_heartbeat(project):
    (project.folder / "demo.py").write_text(DEMO + '\npipeline.schedule("report", "0 6 * * *")\n')
    assert project.json("migrate")["applied"]
    before = project.json("status")
    [never] = before["schedules"]
    assert (never["schedule"], never["last_tick"], never["state"]) == ("report 0 6 * * * UTC", None, None)
    assert before["daemon"] is None and "none running" in project.run("status").stdout
    script = (
        "import anyio, datetime, flowstone as fs\n"
        "async def main():\n"
        "    async with fs.store.SqliteStore('.flowstone/flowstone.db') as store:\n"
        "        at = datetime.datetime(2026, 1, 2, 6, tzinfo=datetime.timezone.utc)\n"
        "        assert await store.claim_tick('report 0 6 * * * UTC', at, 'me')\n"
        "        await store.finish_tick('report 0 6 * * * UTC', at, 'failed', error='boom')\n"
        "        await store.claim_role('daemon', 'host:42:abc', 3600)\n"  # as a daemon's heartbeat does
        "anyio.run(main)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=project.folder, timeout=60).returncode == 0
    after = project.json("status")
    [ticked] = after["schedules"]
    assert (ticked["last_tick"], ticked["state"], ticked["error"]) == ("2026-01-02T06:00:00+00:00", "failed", "boom")
    daemon = after["daemon"]
    assert (daemon["owner"], daemon["active"]) == ("host:42:abc", True)
    assert daemon["heartbeat_at"] < daemon["holds_until"]
    text = project.run("status").stdout
    assert "report 0 6 * * * UTC" in text and "daemon: host:42:abc is active (heartbeat" in text


def test_materialize_reports_each_asset_and_fails_with_exit_code_1(project):
    ok = project.json("materialize", "clean", "--partition", "2024-01-02")
    assert ok["ok"] and {r["asset"] for r in ok["records"]} == {"raw", "clean"}
    again = project.json("materialize", "clean", "--partition", "2024-01-02")
    assert sorted(again["skipped"]) == ["clean", "raw"]
    bad = project.run("materialize", "clean", "--partition", "2024-01-13")
    assert bad.returncode == 1
    assert "bad data on the 13th" in bad.stdout


PROBE = """
import gc, os
from pathlib import Path
import flowstone as fs

pipeline = fs.Pipeline("probe")

@pipeline.asset()
async def heap(ctx, deps):
    frozen, young = gc.get_freeze_count(), gc.get_threshold()[0]
    Path(os.environ["PROBE_OUT"]).write_text(f"{frozen} {len(gc.get_objects(generation=2))} {young}")
    return 1
"""


def test_the_command_line_sets_its_garbage_collector_for_its_work(project, tmp_path):
    """The collector's passes no longer walk what start-up made (ADR 0049): by the time
    an asset runs, that is frozen, the oldest generation is nearly empty, and young
    collections come every YOUNG_THRESHOLD objects."""
    (project.folder / "probe.py").write_text(PROBE)
    out = tmp_path / "heap.txt"
    done = project.run("materialize", "heap", "--pipeline", "probe:pipeline", env=project.env(PROBE_OUT=str(out)))
    assert done.returncode == 0, done.stderr
    frozen, oldest, young = (int(n) for n in out.read_text().split())
    assert frozen > 20_000, frozen  # the modules, the definitions, the open runtime
    assert oldest < frozen // 10, (oldest, frozen)
    assert young == YOUNG_THRESHOLD != gc.get_threshold()[0]  # this test process keeps Python's default


def test_resume_runs_what_a_failed_backfill_did_not_finish(project):
    first = json.loads(project.run("backfill", "clean", "--partition", "2024-01-13", "--partition", "2024-01-14",
                                   "--json").stdout)
    (project.folder / "demo.py").write_text(DEMO.replace('"2024-01-13"', '"never"'))  # the bug is fixed
    resumed = project.run("resume", first["id"], "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "succeeded"


def test_migrate_makes_the_embedded_store_and_is_idempotent(project):
    from flowstone.store.sqlite_schema import MIGRATIONS

    assert project.json("migrate") == {"applied": [version for version, _ in MIGRATIONS]}
    assert project.json("migrate") == {"applied": []}
    assert (project.folder / ".flowstone" / "flowstone.db").is_file()


def test_a_tenant_sees_only_its_own_records(project):
    assert project.run("--tenant", "acme", "materialize", "raw", "--partition", "2024-01-02").returncode == 0
    mine = project.json("--tenant", "acme", "records")["records"]
    assert [r["tenant"] for r in mine] == ["acme"]
    assert project.json("records")["records"] == []
    assert project.json("--tenant", "other", "records")["records"] == []


def test_prune_deletes_the_history_beyond_the_retention_given(project):
    for _ in range(3):
        assert project.run("materialize", "raw", "--partition", "2024-01-02", "--force").returncode == 0
    assert project.json("prune")["deleted"] == {}  # no retention: nothing goes
    assert project.json("prune", "--keep-last", "0")["deleted"] == {"raw": 2, "clean": 0, "report": 0}
    assert [r["status"] for r in project.json("records", "raw")["records"]] == ["success"]
    assert project.json("prune", "--max-age", "1d")["deleted"]["raw"] == 0


def test_prune_with_a_max_age_deletes_finished_backfills_older_than_it(project):
    assert project.run("backfill", "raw", "--from", "2024-01-01", "--to", "2024-01-02").returncode == 0
    assert len(project.json("backfills")["backfills"]) == 1
    assert project.json("prune", "--max-age", "1d")["finished_deleted"] == 0  # a second old: kept
    assert project.json("prune", "--keep-last", "1")["finished_deleted"] == 0  # no max age: kept
    assert project.json("prune", "--max-age", "0.001s")["finished_deleted"] == 1
    assert project.json("backfills")["backfills"] == []


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "code", "says"), [
    (["materialize", "nope"], 2, "unknown asset 'nope'"),
    (["materialize", "clean", "--partition", "2024-13-45"], 2, "2024-13-45"),
    (["materialize", "clean", "--partition", "2023-12-31"], 2, "outside"),
    (["materialize", "clean"], 2, "give --partition"),
    (["backfill", "clean", "--from", "2024-01-05"], 2, "both --from and --to"),
    (["backfill", "report"], 2, "not partitioned"),
    (["--pipeline", "nowhere:pipeline", "assets"], 2, "cannot find the pipeline module 'nowhere'"),
    (["--pipeline", "demo:missing", "assets"], 2, "has no attribute 'missing'; pipelines there: pipeline"),
    (["--pipeline", "demo", "assets"], 2, "module:attr"),
    (["--tenant", "bad\x07tenant", "records"], 2, "tenant"),
    (["records"], 3, "no FlowStone store at .flowstone/flowstone.db"),
    (["--store", "postgresql://nobody@127.0.0.1:9/none", "records"], 3, "127.0.0.1"),
    (["--store", "mysql://x/y", "records"], 2, "unknown store mysql://"),
    (["backfill", "clean", "--workers"], 2, "workers take their jobs from the PostgreSQL store"),
    (["daemon", "--workers"], 2, "workers take their jobs from the PostgreSQL store"),
    (["worker"], 2, "a worker needs the PostgreSQL store"),
    (["prune", "--max-age", "soon"], 2, "--max-age 'soon'"),
    (["prune", "--keep-last", "-1"], 2, "--keep-last must be at least 0"),
])
def test_bad_input_is_one_line_with_its_exit_code(project, args, code, says):
    done = project.run(*args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert says in _one_line_error(done)


def test_a_pipeline_module_that_fails_to_import_shows_the_users_traceback(project):
    (project.folder / "broken.py").write_text(textwrap.dedent('''
        import flowstone as fs

        def helper():
            return 1 / 0

        pipeline = helper()
    '''))
    done = project.run("--pipeline", "broken:pipeline", "assets")
    assert done.returncode == 2
    assert 'broken.py", line 5, in helper' in done.stderr and "ZeroDivisionError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("flowstone: error: importing the pipeline module")
    assert "importlib" not in done.stderr  # only the user's frames


def test_debug_shows_the_traceback(project):
    done = project.run("--debug", "materialize", "nope")
    assert done.returncode == 2 and "Traceback" in done.stderr


def test_an_unwritable_store_location_is_refused_with_exit_code_3(project, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = project.run("--store", f"sqlite:///{blocker}/flowstone.db", "migrate")
    assert done.returncode == 3
    assert "cannot make the folder" in _one_line_error(done)


# ---------------------------------------------------------------- progress


def test_the_progress_bar_on_a_terminal_and_lines_elsewhere(project):
    piped = project.run("backfill", "raw", "--from", "2024-01-01", "--to", "2024-01-10")
    assert piped.returncode == 0
    assert "backfill raw: 10/10 partitions (0 skipped), 0 failed" in piped.stdout
    assert "\x1b[" not in piped.stdout  # no terminal codes in a pipe

    output = _run_in_terminal(project, "backfill", "raw", "--from", "2024-01-01", "--to", "2024-01-20")
    assert "\x1b[" in output  # drawn as a live bar
    assert "20/20" in output and "ETA" in output and "skipped" in output
    assert "succeeded" in output  # then the summary table


def _run_in_terminal(project: Project, *args: str) -> str:
    """Run the command with a pseudo-terminal as its stdout; everything it drew."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "flowstone", *args], cwd=project.folder, env=project.env(COLUMNS="120"),
        stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
    )
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            process.kill()
            raise AssertionError("the command drew nothing for 60 s")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    with process.stderr:
        errors = process.stderr.read().decode(errors="replace")
    assert process.wait(timeout=60) == 0, errors
    return b"".join(chunks).decode(errors="replace")


# ----------------------------------------------------------- several processes

MANY = '''
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2020, 1, 1), end=date(2025, 6, 30))
pipeline = fs.Pipeline("many")

@pipeline.asset(partitioned_by=days, code_version="1")
async def events(ctx, deps):
    return {"day": ctx.partition_key}
'''


def test_a_backfill_while_another_process_reads_and_a_third_materializes(project):
    """Three kinds of process on one SQLite file at once: the backfill's writes, the
    readers and the other writer all succeed (no "database is locked"), and every
    partition is computed exactly once."""
    (project.folder / "many.py").write_text(MANY)
    env = project.env(FLOWSTONE_PIPELINE="many:pipeline")
    assert project.run("migrate", env=env).returncode == 0
    backfill = subprocess.Popen(
        [sys.executable, "-m", "flowstone", "backfill", "events", "--from", "2020-01-01", "--to", "2025-06-30",
         "--max-parallel", "8"],
        cwd=project.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert backfill.stdout.readline().startswith("backfill events: ")  # it is under way
        late = ["2025-06-30", "2025-06-29", "2025-06-28", "2024-02-29", "2023-03-01"]
        writers = [
            subprocess.Popen([sys.executable, "-m", "flowstone", "materialize", "events", "--partition", day,
                              "--json"], cwd=project.folder, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for day in late
        ]
        reads = []
        while backfill.poll() is None and len(reads) < 20:
            reads.append(project.run("status", "--json", env=env))
        for writer in writers:
            out, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, err
            assert json.loads(out)["ok"]
        out, err = backfill.communicate(timeout=300)
        assert backfill.returncode == 0, err
    finally:
        backfill.kill()
    assert reads, "no read ran while the backfill did"
    for read in reads:
        assert read.returncode == 0, read.stderr
        counts = json.loads(read.stdout)["assets"][0]["counts"]
        assert counts["failed"] == 0 and sum(counts.values()) == 2008
    final = json.loads(project.run("status", "--json", env=env).stdout)["assets"][0]
    assert final["counts"]["succeeded"] == 2008
    import sqlite3

    with sqlite3.connect(project.folder / ".flowstone" / "flowstone.db") as connection:
        computed = connection.execute(
            "SELECT partition, count(*) FROM flowstone_materializations "
            "WHERE status IN ('success', 'superseded') GROUP BY partition HAVING count(*) > 1"
        ).fetchall()
        total = connection.execute("SELECT count(*) FROM flowstone_materializations WHERE status = 'success'"
                                   ).fetchone()[0]
    connection.close()
    assert computed == [] and total == 2008  # each partition computed once, by whichever process came first


GATED_WORK = '''
import os
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2024, 1, 1), end=date(2024, 12, 31))
pipeline = fs.Pipeline("held")

@pipeline.asset(partitioned_by=days, code_version="1")
def held(ctx, deps):
    if ctx.partition_key != "2024-01-01":  # the first one finishes; the others wait for the gate
        with open(os.environ["GATE"]) as gate:  # a FIFO: opening it waits for a writer
            gate.read()
    return 1
'''


def test_cancel_stops_a_backfill_running_in_another_process(project):
    (project.folder / "held.py").write_text(GATED_WORK)
    gate = project.folder / "gate"
    os.mkfifo(gate)  # nobody ever writes: the backfill stays half done until it is cancelled
    env = project.env(FLOWSTONE_PIPELINE="held:pipeline", GATE=str(gate))
    assert project.run("migrate", env=env).returncode == 0
    owner = subprocess.Popen(
        [sys.executable, "-m", "flowstone", "backfill", "held", "--max-parallel", "2"],
        cwd=project.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert owner.stdout.readline().startswith("backfill held: 1/366")  # the first partition is done
        [running] = json.loads(project.run("backfills", "--json", env=env).stdout)["backfills"]
        assert running["state"] == "running"
        cancelled = project.run("cancel", running["id"], "--json", env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        outcome = json.loads(cancelled.stdout)
        assert (outcome["state"], outcome["succeeded"], outcome["cancelled"]) == ("cancelled", 1, 365)
        out, err = owner.communicate(timeout=60)
    finally:
        owner.kill()
    assert owner.returncode == 1, err  # the backfill did not complete
    assert "cancelled" in out
    again = project.run("cancel", running["id"], "--json", env=env)  # nothing left to stop
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "cancelled"
    assert project.run("cancel", "not-an-id", env=env).returncode == 2


GATED = '''
import flowstone as fs

pipeline = fs.Pipeline("gated")

@pipeline.asset(requires_approval=True)
async def publish(ctx, deps):
    return "published"
'''


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_approve_and_reject_reach_a_run_waiting_in_another_process(project, decision):
    (project.folder / "gated.py").write_text(GATED)
    env = project.env(FLOWSTONE_PIPELINE="gated:pipeline")
    assert project.run("migrate", env=env).returncode == 0
    waiting = subprocess.Popen(
        [sys.executable, "-m", "flowstone", "materialize", "publish", "--json"],
        cwd=project.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        record = None
        while record is None:  # the store lock orders this: the record is there once written
            found = json.loads(project.run("records", "--status", "waiting_approval", "--json", env=env).stdout)
            record = found["records"][0] if found["records"] else None
            assert waiting.poll() is None, waiting.stderr.read()
        args = [decision, record["id"]] + (["--reason", "numbers look wrong"] if decision == "reject" else [])
        decided = project.run(*args, "--json", env=env)
        assert decided.returncode == 0, decided.stderr
        assert json.loads(decided.stdout)["decision"] == ("approved" if decision == "approve" else "rejected")
        out, _err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    outcome = json.loads(out)
    if decision == "approve":
        assert waiting.returncode == 0 and outcome["records"][0]["status"] == "success"
    else:
        assert waiting.returncode == 1 and "rejected: numbers look wrong" in outcome["error"]
    again = project.run("approve", record["id"], env=env)
    assert again.returncode == 2 and "decided already" in _one_line_error(again)


def test_a_detached_backfill_runs_on_after_the_command_returns(project):
    env = project.env()
    started = project.run("backfill", "raw", "--from", "2024-01-01", "--to", "2024-01-20", "--detach", "--json",
                          env=env)
    assert started.returncode == 0, started.stderr
    detached = json.loads(started.stdout)
    assert Path(project.folder, detached["log"]).is_file()
    state = None
    while state != "succeeded":  # it goes on alone; the store says how far
        [backfill] = json.loads(project.run("backfills", "--json", env=env).stdout)["backfills"]
        assert backfill["id"] == detached["id"] and backfill["state"] in ("running", "succeeded")
        state = backfill["state"]
    assert backfill["succeeded"] == 20
    temporary = project.folder / "tmp"
    temporary.mkdir()
    bad = project.run("backfill", "raw", "--from", "2023-01-01", "--to", "2023-01-02", "--detach",
                      env={**env, "TMPDIR": str(temporary)})
    assert bad.returncode == 2 and "outside" in _one_line_error(bad)
    assert list(temporary.iterdir()) == []  # the folder the child would have announced in is gone too


def test_a_detached_child_that_nobody_waits_for_goes_on(tmp_path, capsys):
    from flowstone.cli.commands import _announce

    backfill = uuid.uuid4()
    _announce(str(tmp_path / "gone" / "id"), backfill)  # the folder was removed: no error, a line in the log
    assert f"backfill {backfill} started after the command that detached it stopped waiting" in capsys.readouterr().err
    _announce(str(tmp_path / "id"), backfill)
    assert (tmp_path / "id").read_text() == str(backfill) and list(tmp_path.iterdir()) == [tmp_path / "id"]


def test_the_same_commands_on_postgresql(project, pg_dsn):
    """--store postgresql://... : records in PostgreSQL, as the plain role, tenants included."""
    done = project.run("--store", pg_dsn, "backfill", "clean", "--from", "2024-01-10", "--to", "2024-01-14", "--json")
    assert done.returncode == 1, done.stderr  # the 13th fails, as on SQLite
    assert json.loads(done.stdout)["succeeded"] == 4
    status = {a["asset"]: a for a in project.json("--store", pg_dsn, "status")["assets"]}
    assert status["clean"]["counts"]["failed"] == 1 and status["clean"]["counts"]["succeeded"] == 4
    assert status["clean"]["ranges"]["succeeded"] == [["2024-01-10", "2024-01-12", 3], ["2024-01-14", "2024-01-14", 1]]
    assert [b["state"] for b in project.json("--store", pg_dsn, "backfills")["backfills"]] == ["failed"]
    assert project.json("--store", pg_dsn, "--tenant", "acme", "records")["records"] == []
    assert not (project.folder / ".flowstone" / "flowstone.db").exists()  # nothing went to SQLite
