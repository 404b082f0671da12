"""End to end in a real browser: headless Chromium opens the app, clicks "Generate both",
waits until both images have rendered, and saves a screenshot.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe``
(JSON messages separated by NUL bytes on file descriptors 3 and 4), so the test needs
only the standard library and Debian's ``chromium`` package (installed by ``.ci/run``).
Set ``HYCA_SCREENSHOT`` to keep the screenshot somewhere (docs/screenshot.png is one).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from app_server import running_app

TIMEOUT_S = 180


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Just enough of the DevTools protocol: one page, evaluate JavaScript, screenshot."""

    def __init__(self, executable: str, profile_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def as_fds_3_and_4() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)  # out of the way of 3 and 4
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", "--window-size=1280,1250",
             "about:blank"],
            # subprocess closes other descriptors after preexec_fn: keep 3 and 4 open.
            preexec_fn=as_fds_3_and_4, pass_fds=(3, 4),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 1250, "deviceScaleFactor": 1, "mobile": False})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


CLICK_GENERATE = """(() => {
  const button = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Generate both');
  if (!button) return false;
  button.click();
  return true;
})()"""

# Both result images loaded and decoded (a broken or missing image has naturalWidth 0).
IMAGES_RENDERED = """(() => {
  const shown = ['full-image', 'fast-image'].map(id => document.querySelector('#' + id + ' img'));
  if (shown.some(img => !img || !img.complete || img.naturalWidth === 0)) return null;
  return shown.map(img => ({src: img.src, width: img.naturalWidth, height: img.naturalHeight}));
})()"""

REPORT_TEXT = "document.querySelector('#report') ? document.querySelector('#report').innerText : ''"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found (looked for chromium, chromium-browser, google-chrome); install Debian's "
                    "`chromium` package (`apt-get install -y chromium`), as .ci/run does")
    return path


def test_browser_generates_both_images_and_saves_a_screenshot(chromium, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    with running_app(tmp) as (url, _):
        browser = Browser(chromium, tmp / "chrome-profile")
        try:
            browser.open(url)
            browser.wait_for(CLICK_GENERATE, "the page to show the 'Generate both' button", timeout=60)
            images = browser.wait_for(IMAGES_RENDERED, "both images to render")
            report = browser.wait_for(REPORT_TEXT, "the metrics to appear")
            time.sleep(0.5)  # let the last layout settle before the picture
            shot = tmp / "screenshot.png"
            browser.screenshot(shot)
        finally:
            browser.close()
    assert [img["width"] for img in images] == [256, 256] and [img["height"] for img in images] == [256, 256]
    assert images[0]["src"] != images[1]["src"]
    assert "PSNR" in report and "SSIM" in report and "faster" in report
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("HYCA_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
