"""The web page in a real browser: Debian's headless Chromium plays the live stream through Media Source Extensions
(the page's fallback; its WebCodecs player: test_interaction_browser.py) and drives the session with the page's own
controls. Loopback only; every wait is bounded."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from streamgen_server.app import serve_in_thread

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]  # fmt: skip
SCREENSHOT = Path("/tmp/streamgen-browser.png")
WAIT_MS = 60_000

# A frame of the playing video drawn on a canvas: is there a picture (not black, not flat)?
SAMPLE_FRAME = """() => {
  const video = document.getElementById("video");
  const canvas = Object.assign(document.createElement("canvas"), {width: video.videoWidth, height: video.videoHeight});
  const context = canvas.getContext("2d");
  context.drawImage(video, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let max = 0, sum = 0, squares = 0;
  for (let i = 0; i < data.length; i += 4) {
    const y = (data[i] + data[i + 1] + data[i + 2]) / 3;
    max = Math.max(max, y); sum += y; squares += y * y;
  }
  const n = data.length / 4, mean = sum / n;
  return {width: canvas.width, height: canvas.height, max, std: Math.sqrt(squares / n - mean * mean)};
}"""
DECODED = "document.getElementById('video').getVideoPlaybackQuality().totalVideoFrames"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt when missing and we may (root, apt works); else the test skips."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("no /usr/bin/chromium, and not root with apt-get to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode:
                pytest.skip(f"{' '.join(command)} failed: {done.stderr[-300:]}")
    return CHROMIUM


@pytest.fixture
def page(chromium: Path) -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 820})
        finally:
            browser.close()


def test_page_plays_and_controls_the_live_stream(pipe, page, tmp_path: Path) -> None:  # noqa: F811
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with serve_in_thread(pipe) as server:
        page.goto(server.url + "?prompt=a%20red%20ball&steps=1&autoplay=1&player=mse")  # WebCodecs: its own test
        page.wait_for_function(f"() => {DECODED} > 12", timeout=WAIT_MS)  # playing: muted autoplay worked
        decoded = page.evaluate(f"() => {DECODED}")
        page.wait_for_function(f"() => {DECODED} > {decoded}", timeout=WAIT_MS)  # and still going
        frame = page.evaluate(SAMPLE_FRAME)
        assert (frame["width"], frame["height"]) == (64, 64)
        assert frame["max"] > 16 and frame["std"] > 1, frame  # a picture, not a blank
        assert page.text_content("#status") == "live"

        # The slider and the prompt box act on the running stream, from a later chunk on.
        page.fill("#steps", "2")  # fires input and change, as dragging the slider does
        page.wait_for_function("() => window.streamgen.last?.steps === 2", timeout=WAIT_MS)
        page.fill("#prompt", "a blue cube")
        page.press("#prompt", "Enter")
        page.wait_for_function("() => window.streamgen.last?.prompt === 'a blue cube'", timeout=WAIT_MS)
        assert float(page.text_content("#stat-gen")) > 0 and "ms" in page.text_content("#latency-total")
        page.screenshot(path=SCREENSHOT)

        page.click("#stop")
        page.wait_for_function("() => window.streamgen.state === 'idle'", timeout=WAIT_MS)

        # Extend from an uploaded image (i2v): its reconstruction plays first, then the stream goes on.
        image = tmp_path / "start.png"
        Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
        page.set_input_files("#file", str(image))
        page.click("#start")
        page.wait_for_function(
            "() => window.streamgen.state === 'live' && window.streamgen.chunks >= 1", timeout=WAIT_MS
        )
        page.click("#stop")
        page.wait_for_function("() => window.streamgen.state === 'idle'", timeout=WAIT_MS)
    assert not errors
