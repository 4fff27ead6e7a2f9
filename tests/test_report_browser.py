"""The report in a real browser: headless Debian `chromium` driven by Selenium through Debian's `chromedriver`,
opened from disk with no server.

1. No console errors, no uncaught exceptions, no request for anything but the file itself and data: URIs: the
   browser log (console errors, uncaught exceptions, failed loads, CSP violations are its SEVERE entries) and the
   performance log (DevTools Network.requestWillBeSent events) are collected. A control page with deliberate
   faults first proves the collection works.
2. Every <img> decodes in the browser and the injected caption did not execute: a copy of the report with its
   CSP meta removed (so escaping alone must keep the payload inert) is loaded, and the page's state is read.
3. The rendering is not blank: a screenshot at 1280 wide, checked with PIL.
4. A reproduce run's report (two models) leads with the paper's tables, and its long per-metric table is folded
   (not rendered) until its summary is clicked.

Without chromium, chromedriver or selenium the tests are skipped, except under CI (the `CI` environment
variable), where they fail.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from reports import write_report
from tests.browser import browser  # noqa: F401 (a fixture)
from tests.browser import assert_not_blank, clear_logs, page_problems, settle
from tests.test_report import make_fake_run

STATE_JS = """return {title: document.title, images: document.images.length,
  broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
  scripts: document.scripts.length, text: document.body ? document.body.innerText : ''}"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run_dir, roots = make_fake_run(tmp_path_factory.mktemp("browser"))
    return write_report(run_dir, image_roots=roots)


def open_page(driver, url: str) -> dict:
    """Load `url` (after a blank page, so that earlier pages' events are gone); the page's state and its
    problems: SEVERE browser-log entries and requests for anything but the page itself and data: URIs."""
    driver.get("about:blank")
    time.sleep(0.2)
    clear_logs(driver)
    driver.get(url)
    settle()
    problems = page_problems(driver, allowed=lambda requested: requested.startswith("data:") or requested == url)
    return {"problems": problems, **driver.execute_script(STATE_JS)}


def test_no_console_errors_or_external_requests(browser, report, tmp_path):
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>control</title><img src='no-such-file.png'>"
                       "<script>console.error('control error'); undefined_function();</script>")
    seen = open_page(browser, control.as_uri())
    # the collection works: the deliberate faults are all reported
    assert any("control error" in p for p in seen["problems"]), seen["problems"]
    assert any(p.startswith("javascript:") and "undefined_function" in p for p in seen["problems"]), seen["problems"]
    assert any("no-such-file.png" in p for p in seen["problems"]), seen["problems"]

    page = open_page(browser, report.as_uri())
    assert page["problems"] == [], page["problems"]
    assert page["title"].startswith("fromage-bench report")
    assert page["images"] >= 14 and page["broken"] == 0     # decoded under the report's own CSP
    assert page["scripts"] == 0 and len(page["text"]) > 1000


def test_images_decode_and_injected_caption_stays_text(browser, report, tmp_path):
    text = report.read_text(encoding="utf-8")
    assert "&lt;script&gt;document.title=&#39;PWNED&#39;&lt;/script&gt;" in text
    probe, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
    assert n == 1  # without the CSP only the escaping keeps the payload inert
    page_file = tmp_path / "probe.html"
    page_file.write_text(probe, encoding="utf-8")
    page = open_page(browser, page_file.as_uri())
    assert page["images"] == text.count("<img ") and page["images"] >= 14
    assert page["broken"] == 0, f"{page['broken']} of {page['images']} images did not decode in the browser"
    assert page["scripts"] == 0, f"{page['scripts']} script elements: the caption's must be text"
    assert "PWNED" not in page["title"] and page["title"].startswith("fromage-bench report"), page["title"]
    assert "<script>document.title='PWNED'</script>" in page["text"]  # shown as text


def test_screenshot_is_not_blank(browser, report):
    browser.get(report.as_uri())
    img, background = assert_not_blank(browser)
    assert img.width == 1280 and img.height > 1000, img.size
    assert img.getpixel((5, 5)) != background  # the dark header band at the top


TABLES_JS = """const s = id => document.getElementById(id).getBoundingClientRect();
  const long = document.getElementById('accuracy-table');
  return {tables_top: s('tables').top, summary_top: s('summary').top, first: document.querySelector('main section').id,
    table1_rows: document.querySelectorAll('#paper-table1 tbody tr').length,
    table1_visible: document.getElementById('paper-table1').checkVisibility(),
    long_visible: long.checkVisibility(), folded: !long.closest('details').open}"""


def test_reproduce_report_leads_with_the_tables_and_folds_the_long_one(browser, tmp_path):
    from fromage_bench.results import write_results
    from tests.test_report import make_reproduce_document, write_miniworld_root

    run_dir = tmp_path / "out"
    run_dir.mkdir()
    write_results(run_dir, make_reproduce_document(write_miniworld_root(tmp_path / "data")))
    page_file = write_report(run_dir)
    page = open_page(browser, page_file.as_uri())
    assert page["problems"] == [], page["problems"]
    state = browser.execute_script(TABLES_JS)
    assert state["first"] == "tables" and state["tables_top"] < state["summary_top"]
    assert state["table1_rows"] == 9 and state["table1_visible"]  # 2 models + chance, 3 settings
    assert state["folded"] and not state["long_visible"]            # the long table is folded ...
    browser.find_element("css selector", "#accuracy details > summary").click()
    assert browser.execute_script("return document.getElementById('accuracy-table').checkVisibility()")  # ... opens
    img, _ = assert_not_blank(browser)
    assert img.width == 1280
