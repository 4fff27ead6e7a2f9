"""The report in a real browser (headless Debian `chromium`, opened from disk with no server).

1. No console errors, no uncaught exceptions, no request for anything but the file itself and data: URIs:
   the page is driven over the Chrome DevTools Protocol (`--remote-debugging-port=0`, a minimal stdlib
   websocket client below; no extra dependency) collecting Runtime.exceptionThrown, Runtime.consoleAPICalled
   (error), Log.entryAdded (error: failed loads, CSP violations) and Network.requestWillBeSent. A control page
   with a deliberate error first proves the collection works.
2. Every <img> decodes in the browser and the injected caption did not execute: a copy of the report (its
   CSP meta removed, so escaping alone must keep the payload inert) gets a small script that, on load, writes
   the number of images with naturalWidth == 0 and the title at that moment into document.title; `--dump-dom`
   prints the DOM and the test parses the title.
3. The rendering is not blank: `--screenshot` at 1280x2000, checked with PIL.

Without chromium the tests are skipped, except under CI (the `CI` environment variable), where they fail.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from reports import write_report
from tests.test_report import make_fake_run

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage")
TIMEOUT = 60


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the browser tests, not skip them")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run_dir, roots = make_fake_run(tmp_path_factory.mktemp("browser"))
    return write_report(run_dir, image_roots=roots)


def _run_chromium(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------- a minimal DevTools client

class WebSocket:
    """Just enough RFC 6455 for DevTools: client handshake, masked text frames out, text frames in."""

    def __init__(self, url: str, timeout: float):
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            buf += chunk
        head, self._buf = buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"websocket handshake refused: {status!r}")

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else None
            payload = self._exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x9:      # ping
                self._frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode("utf-8", errors="replace")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class DevTools:
    """A headless chromium driven over CDP with one flat page session; events are kept in `self.events`."""

    def __init__(self, chromium: str, profile: Path):
        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.stderr: list[str] = []
        self._url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()  # keeps the pipe from filling up
        if not self._ready.wait(TIMEOUT) or self._url is None:
            self.close()
            raise RuntimeError("chromium did not announce a DevTools endpoint:\n" + "".join(self.stderr[-20:]))
        self.ws = WebSocket(self._url, timeout=TIMEOUT)
        self._next = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=True)

    def _drain(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            self.stderr.append(line)
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match and not self._ready.is_set():
                self._url = match.group(1)
                self._ready.set()
        self._ready.set()

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_event(self, method: str, settle: float = 0.3) -> None:
        """Until `method` arrives on the page session, then `settle` seconds more of events."""
        deadline = time.monotonic() + TIMEOUT
        while not any(e.get("method") == method and e.get("sessionId") == self.session for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))
        self.ws.sock.settimeout(settle)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except (socket.timeout, TimeoutError):
            pass
        finally:
            self.ws.sock.settimeout(TIMEOUT)

    def open(self, url: str) -> dict:
        """Navigate, wait for load; the page's problems and its state (title, images, scripts)."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")
        state = self.call("Runtime.evaluate", {"expression": STATE_JS, "returnByValue": True}, session=True)
        return {"problems": self.problems(url), **json.loads(state["result"]["value"])}

    def problems(self, page_url: str) -> list[str]:
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console." + params["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                         for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent":
                url = params.get("request", {}).get("url", "")
                if not url.startswith("data:") and url != page_url:
                    out.append(f"request: {url[:120]}")
        return out

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.call("Browser.close")
                except (OSError, RuntimeError, TimeoutError, ValueError):
                    pass
                self.ws.close()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this test started
            self.proc.wait(timeout=10)


STATE_JS = """JSON.stringify({title: document.title, images: document.images.length,
  broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
  scripts: document.scripts.length, text: document.body ? document.body.innerText.length : 0})"""


# ------------------------------------------------------------------------------------------------ tests

def test_no_console_errors_or_external_requests(chromium, report, tmp_path):
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>control</title><img src='no-such-file.png'>"
                       "<script>console.error('control error'); undefined_function();</script>")
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        seen = browser.open(control.as_uri())
        # the collection works: the deliberate faults are all reported
        assert any("control error" in p for p in seen["problems"]), seen
        assert any(p.startswith("exception:") and "undefined_function" in p for p in seen["problems"]), seen
        assert any("no-such-file.png" in p for p in seen["problems"]), seen

        page = browser.open(report.as_uri())
    finally:
        browser.close()
    assert page["problems"] == [], page["problems"]
    assert page["title"].startswith("fromage-bench report")
    assert page["images"] >= 14 and page["broken"] == 0     # decoded under the report's own CSP
    assert page["scripts"] == 0 and page["text"] > 1000


def test_images_decode_and_injected_caption_stays_text(chromium, report, tmp_path):
    text = report.read_text(encoding="utf-8")
    assert "&lt;script&gt;document.title=&#x27;PWNED&#x27;&lt;/script&gt;" in text
    probe, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
    assert n == 1  # without the CSP only the escaping keeps the payload inert
    check = ("<script>window.addEventListener('load', function () {"
             " var imgs = Array.prototype.slice.call(document.images);"
             " var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;"
             " document.title = 'CHECK images=' + imgs.length + ' broken=' + broken +"
             " ' scripts=' + document.scripts.length + ' before=' + document.title; });</script>")
    probe = probe.replace("</body>", check + "</body>")
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    done = _run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"<title>(CHECK images=(\d+) broken=(\d+) scripts=(\d+) before=(.*?))</title>", done.stdout, re.S)
    assert match, done.stdout[:500]
    images, broken, scripts, before = int(match.group(2)), int(match.group(3)), int(match.group(4)), match.group(5)
    assert images == text.count("<img ") and images >= 14
    assert broken == 0, f"{broken} of {images} images did not decode in the browser"
    assert scripts == 1, f"{scripts} script elements: only the probe may be one (the caption's is text)"
    assert "PWNED" not in before and before.startswith("fromage-bench report"), f"the payload ran: {before!r}"
    assert "&lt;script&gt;document.title='PWNED'&lt;/script&gt;" in done.stdout  # shown as text


def test_screenshot_is_not_blank(chromium, report, tmp_path):
    shot = tmp_path / "report.png"
    done = _run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as img:
        img = img.convert("RGB")
    assert img.size == (1280, 2000)
    small = img.resize((320, 500))
    counts = small.getcolors(maxcolors=320 * 500)
    background = max(counts)[1]
    differing = sum(n for n, colour in counts if colour != background)
    assert differing > 0.01 * 320 * 500, f"{differing} of {320 * 500} pixels differ from the background"
    assert len(counts) > 50, f"only {len(counts)} distinct colours"
    assert img.getpixel((5, 5)) != background  # the dark header band at the top
