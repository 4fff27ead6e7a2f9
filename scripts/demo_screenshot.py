"""docs/demo.png: the demo serving the embedded default, after an upload and a request for pictures.

    python scripts/demo_screenshot.py [--port 7871] [--out docs/demo.png]

Starts `fromage-bench demo` (no model flags: the embedded default), drives Debian's headless chromium through
Selenium (as tests/browser.py does), uploads the first miniworld validation photo, asks for a picture like it and
saves the page once the answer shows retrieved images.
"""
import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.common import first_miniworld_image  # noqa: E402
from fromage_bench.embedded import DEFAULT_WORK  # noqa: E402


def wait(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.3)
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    parser.add_argument("--question", default="show me a picture like this")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    server = subprocess.Popen([sys.executable, "-m", "fromage_bench", "demo", "--port", str(args.port),
                               "--device", "cpu"], cwd=ROOT)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
    try:
        wait(lambda: _up(url), "the server")
        driver.get(url)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload"), "the page")
        photo = first_miniworld_image(DEFAULT_WORK / "data")
        driver.find_element(By.CSS_SELECTOR, "input[type=file][accept='image/*']").send_keys(str(photo.resolve()))
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#chatbot .user img"), "the upload")
        driver.find_element(By.CSS_SELECTOR, "#message textarea").send_keys(args.question)
        driver.find_element(By.CSS_SELECTOR, "#submit").click()
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot img"), "retrieved images")
        time.sleep(1.5)  # images decoded and laid out
        driver.execute_script("document.querySelectorAll('#chatbot *').forEach(e => { if (e.scrollHeight > "
                              "e.clientHeight) e.scrollTop = 0; });")  # the conversation from its start
        time.sleep(0.5)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out} (photo {photo})")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
