"""The web view in a real browser (headless Chromium): click from the graph to an
asset, a record and what it was built from; watch a backfill running in another
process reach its end without reloading; no console errors on any page. Each page's
screenshot is saved under test-output/web/."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import SCREENSHOTS, chromium_paths, open_browser
from followed import Followed

GATED = '''
import fcntl
import os
from datetime import date
import flowstone as fs

days = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 1, 10))
pipeline = fs.Pipeline("browsed")

@pipeline.asset(partitioned_by=days, code_version="1")
def raw(ctx, deps):
    if ctx.partition_key == "2026-01-04":
        raise ValueError("bad file on the 4th")
    if ctx.partition_key >= "2026-01-06":  # waits while the test holds the gate's lock
        with open(os.environ["GATE"]) as gate:
            fcntl.flock(gate, fcntl.LOCK_SH)
    return ctx.partition.day

@pipeline.asset(depends_on=["raw"], partitioned_by=days, code_version="1")
def clean(ctx, deps):
    return deps["raw"] * 10

@pipeline.asset(depends_on=["clean"], code_version="1")
def report(ctx, deps):
    return sum(deps["clean"].values())

pipeline.schedule("report", "0 6 * * *")
'''

SECONDS = 60


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    browser, driver = chromium_paths()
    web = open_browser(browser, driver, tmp_path_factory.mktemp("chromium"))
    try:
        yield web
    finally:
        web.quit()


def _flowstone(folder: Path, env: dict[str, str], *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "flowstone", *args, "--json"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def _shoot(web, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    web.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    errors = [entry for entry in web.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def test_click_through_and_watch_a_backfill_live(tmp_path, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (tmp_path / "browsed.py").write_text(GATED)
    gate = tmp_path / "gate"
    gate.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWSTONE_DSN", "FLOWSTONE_PIPELINE")}
    env.update(FLOWSTONE_PIPELINE="browsed:pipeline", GATE=str(gate))
    assert subprocess.run([sys.executable, "-m", "flowstone", "migrate"], cwd=tmp_path, env=env,
                          capture_output=True, timeout=120).returncode == 0
    held = open(gate)
    fcntl.flock(held, fcntl.LOCK_EX)  # the 6th to the 10th wait until it is released
    web = Followed(tmp_path, env, "web", "--port", "0")
    backfill = Followed(tmp_path, env, "backfill", "clean", "--max-parallel", "10", stdout=subprocess.PIPE)
    try:
        url = web.wait_for(r"web view on (http://\S+)")[0].group(1)
        assert backfill.process.stdout.readline().startswith("backfill clean: ")  # a first partition is done
        [running] = _flowstone(tmp_path, env, "backfills")["backfills"]

        chromium.get(f"{url}/backfills/{running['id']}")
        assert chromium.find_element(By.ID, "state").text == "running"
        chromium.execute_script("window.notReloaded = true")
        before = chromium.find_element(By.CSS_SELECTOR, "#progress .ok").get_attribute("style")
        _shoot(chromium, "backfill-running")
        fcntl.flock(held, fcntl.LOCK_UN)  # the rest may run now
        WebDriverWait(chromium, SECONDS).until(lambda w: w.find_element(By.ID, "state").text != "running")
        assert chromium.find_element(By.ID, "state").text == "failed"  # the 4th failed
        after = chromium.find_element(By.CSS_SELECTOR, "#progress .ok").get_attribute("style")
        assert before != after and "width: 90%" in after  # 9 of 10 succeeded
        assert "width: 10%" in chromium.find_element(By.CSS_SELECTOR, "#progress .bad").get_attribute("style")
        assert chromium.execute_script("return window.notReloaded === true")  # moved live, no reload
        assert "9 succeeded, 1 failed of 10" in chromium.find_element(By.ID, "progress").text
        _shoot(chromium, "backfill-done")
        assert backfill.process.wait(timeout=SECONDS) == 1  # the command says a partition failed

        chromium.get(url)
        _shoot(chromium, "graph")
        chromium.find_element(By.CSS_SELECTOR, 'a.node[data-asset="clean"]').click()
        WebDriverWait(chromium, SECONDS).until(lambda w: w.current_url.endswith("/assets/clean"))
        states = {r.get_attribute("data-state") for r in chromium.find_elements(By.CSS_SELECTOR, "svg.health rect")}
        assert states == {"succeeded", "missing"}  # the 4th: its upstream failed, so it never ran
        _shoot(chromium, "asset")
        chromium.find_element(By.XPATH, "//tr[td[2][text()='2026-01-02']]/td[1]/a").click()
        WebDriverWait(chromium, SECONDS).until(lambda w: "/records/" in w.current_url)
        _shoot(chromium, "record")
        chromium.find_element(By.CSS_SELECTOR, "#upstream a[href^='/records/']").click()
        WebDriverWait(chromium, SECONDS).until(lambda w: "raw" in w.find_element(By.TAG_NAME, "h1").text)
        assert "clean" in chromium.find_element(By.ID, "downstream").text  # and back down again
        _shoot(chromium, "upstream-record")

        chromium.get(f"{url}/assets/raw")
        assert chromium.find_elements(By.CSS_SELECTOR, "svg.health rect[data-state=failed]")
        chromium.find_element(By.XPATH, "//tr[td[2][text()='2026-01-04']]/td[1]/a").click()
        WebDriverWait(chromium, SECONDS).until(lambda w: "/records/" in w.current_url)
        assert "ValueError: bad file on the 4th" in chromium.find_element(By.TAG_NAME, "pre").text
        _shoot(chromium, "failed-record")
        chromium.get(f"{url}/daemon")
        assert "no daemon has run" in chromium.find_element(By.ID, "heartbeat").text
        _shoot(chromium, "daemon")
        chromium.get(f"{url}/backfills")
        _shoot(chromium, "backfills")
    finally:
        held.close()
        backfill.stop()
        web_exit = web.stop()
    assert web_exit == 0
