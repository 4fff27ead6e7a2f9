"""Headless Debian `chromium` driven by Selenium through Debian's `chromedriver`, shared by the browser tests
(the HTML report, the demo). Without chromium, chromedriver or selenium a test using the `browser` fixture is
skipped, except under CI (the `CI` environment variable), where it fails."""
from __future__ import annotations

import io
import json
import os
import shutil
import time

import pytest
from PIL import Image

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage", "--window-size=1280,2000")


BROWSER_INSTALL = "Debian: apt-get install -y chromium chromium-driver; pip: selenium"


def require(what: str, found, install: str = BROWSER_INSTALL) -> None:
    """Skip the test if `found` is falsy, or fail it under CI, where everything the suite uses is installed."""
    if not found:
        message = f"{what} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the browser tests, not skip them")
        pytest.skip(message)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A fresh headless chromium with an empty profile. Selenium Manager stays offline: the browser and its
    driver are Debian's, given by path, so nothing is downloaded."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    require("chromium", chromium)
    require("chromedriver", chromedriver)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require("selenium", None)
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def clear_logs(driver) -> None:
    driver.get_log("browser"), driver.get_log("performance")  # reading a log empties it


def page_problems(driver, allowed=lambda url: url.startswith("data:")) -> list[str]:
    """SEVERE browser-log entries (console errors, uncaught exceptions, failed loads, CSP violations) and
    requests for URLs that `allowed` refuses, since the logs were last read."""
    problems = [f"{e.get('source')}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested = message["params"]["request"]["url"]
            if not allowed(requested):
                problems.append(f"request: {requested[:120]}")
    return problems


def screenshot_colours(driver) -> tuple[Image.Image, list[tuple[int, tuple]], tuple]:
    """The page's screenshot (RGB), the colour counts of a 320-pixel-wide copy, and its background colour."""
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as img:
        img = img.convert("RGB")
    small = img.resize((320, round(320 * img.height / img.width)))
    counts = small.getcolors(maxcolors=small.width * small.height)
    return img, counts, max(counts)[1]


def assert_not_blank(driver, min_colours: int = 50) -> tuple[Image.Image, tuple]:
    """At least 1% of the page's pixels differ from its background and it has `min_colours` colours; the
    screenshot and its background colour."""
    img, counts, background = screenshot_colours(driver)
    total = sum(n for n, _ in counts)
    differing = sum(n for n, colour in counts if colour != background)
    assert differing > 0.01 * total, f"{differing} of {total} pixels differ from the background"
    assert len(counts) > min_colours, f"only {len(counts)} distinct colours"
    return img, background


def settle(seconds: float = 0.3) -> None:
    time.sleep(seconds)  # late console messages and image loads
