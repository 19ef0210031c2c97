"""Headless Chromium for the web view's tests, from Debian's packages.

``chromium_paths()`` finds ``chromium`` and ``chromedriver``, installing the
``chromium`` and ``chromium-driver`` packages with apt-get when they are missing and
this runs as root (a fresh CI machine): the project's own set-up, no manual step.
Elsewhere, a missing browser skips the browser tests, except under ``CI=true``,
where it fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGES = ("chromium", "chromium-driver")
INSTALL_SECONDS = 900


def _found() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _install() -> str:
    """Install the packages; what went wrong, or "" when it worked."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "chromium is not installed and this is not a root shell with apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_SECONDS)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
    return ""


def chromium_paths() -> tuple[str, str]:
    found = _found()
    if found is None:
        why = _install()
        found = _found()
        if found is None:
            message = f"no headless Chromium: {why or 'installed, but not on PATH'}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
    return found


def open_browser(browser: str, driver: str, scratch: Path) -> object:
    """A headless Chromium driven by Selenium, its console log kept. Its temporary
    files (the profile, the singleton socket's folder, which Chromium leaves behind
    when the driver stops it) go to ``scratch``, for the caller to remove."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver, env={**os.environ, "TMPDIR": str(scratch)}))


SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "web"
"""Where the browser tests save a screenshot of each page they visit (to look at)."""
