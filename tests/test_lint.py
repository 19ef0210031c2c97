"""The lint and type gate: ruff on flowstone/, tests/ and stress/; mypy and the import
layers on flowstone/; configured in pyproject.toml.

Part of the suite so that CI (which runs the suite) fails on either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing_in_flowstone_its_tests_and_benchmarks():
    done = _run("ruff", "check", "flowstone", "tests", "stress")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing_in_flowstone():
    done = _run("mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


def test_the_layers_import_one_way():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
