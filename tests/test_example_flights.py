"""The main job of README.md: the flights example over 2013, driven by the CLI.

The README's first command is run as written (its flowstone commands, in a folder
of its own), and what it computed is checked against the raw data read here
independently with pyarrow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pytest

from flowstone.examples.flights import data_folder

ROOT = Path(__file__).resolve().parent.parent


def _main_job() -> list[list[str]]:
    """The flowstone commands of the README's first shell block, in order."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block is not None
    steps = [step.strip().split() for step in block.group(1).replace("\n", " ").split("&&")]
    commands = [step[1:] for step in steps if step and step[0].endswith("/flowstone")]
    assert commands, "the README's first command runs no flowstone command"
    return commands


def _flowstone(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowstone", *args], cwd=folder, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The main job, run once, in a fresh folder configured as the repository is."""
    folder = tmp_path_factory.mktemp("main-job")
    (folder / "pyproject.toml").write_text('[tool.flowstone]\npipeline = "flowstone.examples.flights:pipeline"\n')
    outputs = []
    for command in _main_job():
        done = _flowstone(folder, *command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(done.stdout)
    return folder, outputs


def test_the_main_job_backfills_the_year_and_shows_the_status(ran):
    folder, outputs = ran
    assert "delays  succeeded    365        365" in outputs[0]  # the backfill's summary
    status = {a["asset"]: a for a in json.loads(_flowstone(folder, "status", "--json").stdout)["assets"]}
    for daily in ("raw_flights", "raw_weather", "delays"):
        assert status[daily]["counts"]["succeeded"] == 365 and status[daily]["total"] == 365
    assert status["yearly_report"]["counts"]["succeeded"] == 1
    assert (folder / ".flowstone" / "flowstone.db").is_file()
    assert len(list((folder / ".flowstone" / "parquet").rglob("*.parquet"))) >= 3 * 365


def test_running_the_main_job_again_skips_everything(ran):
    folder, _ = ran
    again = _flowstone(folder, "backfill", "delays", "--from", "2013-01-01", "--to", "2013-12-31", "--json")
    assert again.returncode == 0, again.stderr
    outcome = json.loads(again.stdout)
    assert (outcome["succeeded"], outcome["skipped"]) == (365, 365)
    report = json.loads(_flowstone(folder, "materialize", "yearly_report", "--json").stdout)
    assert sorted(report["skipped"]) == ["airlines", "airports", "monthly_summary", "yearly_report"]


def _raw_flights() -> pa.Table:
    with zipfile.ZipFile(data_folder() / "flights.csv.zip") as archive:
        data = archive.read(archive.namelist()[0])
    return csv.read_csv(pa.BufferReader(data), convert_options=csv.ConvertOptions(
        null_values=["NA"], column_types={"dep_delay": pa.float64()}))


def test_the_report_agrees_with_the_raw_data(ran):
    folder, _ = ran
    flights = _raw_flights()
    report = json.loads(next((folder / ".flowstone" / "storage").rglob("yearly_report/*.json")).read_text())
    assert report["flights"] == flights.num_rows == 336_776
    assert report["days"] == 365
    expected = {
        row["origin"]: row["dep_delay_mean"]
        for row in flights.group_by("origin").aggregate([("dep_delay", "mean")]).to_pylist()
    }
    for airport in report["airports_by_delay"]:
        assert airport["dep_delay_mean_minutes"] == pytest.approx(expected[airport["code"]], abs=0.01)
    july = pc.mean(flights.filter(pc.equal(flights.column("month"), 7)).column("dep_delay")).as_py()
    assert report["worst_month"] == {"month": "2013-07", "dep_delay_mean_minutes": pytest.approx(july, abs=0.01)}


def test_each_day_holds_that_days_flights(ran):
    folder, _ = ran
    flights = _raw_flights()
    first = json.loads(_flowstone(folder, "records", "raw_flights", "--partition", "2013-01-01", "--json").stdout)
    january_first = flights.filter(pc.and_(pc.equal(flights.column("month"), 1), pc.equal(flights.column("day"), 1)))
    assert first["records"][0]["metadata"]["rows"] == january_first.num_rows == 842
