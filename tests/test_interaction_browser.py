"""The page's WebCodecs player and its live-audience mode in Debian's headless Chromium (fixtures of
test_browser.py): frames are demuxed, decoded and drawn on a canvas, and every displayed frame is reported by its
number. Tiny model, loopback, every wait bounded."""

from __future__ import annotations

import pytest
from test_browser import WAIT_MS, chromium, page  # noqa: F401 - fixtures

from streamgen_server.app import serve_in_thread

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]

# The canvas' picture: is there one (not black, not flat)?
SAMPLE_CANVAS = """() => {
  const canvas = document.getElementById("canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let max = 0, sum = 0, squares = 0;
  for (let i = 0; i < data.length; i += 4) {
    const y = (data[i] + data[i + 1] + data[i + 2]) / 3;
    max = Math.max(max, y); sum += y; squares += y * y;
  }
  const n = data.length / 4, mean = sum / n;
  return {width: canvas.width, height: canvas.height, max, std: Math.sqrt(squares / n - mean * mean)};
}"""


def test_webcodecs_player_plays_and_reports_displayed_frames(pipe, page) -> None:  # noqa: F811
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with serve_in_thread(pipe) as server:
        page.goto(server.url + "?prompt=a%20red%20ball&steps=1&autoplay=1")
        page.wait_for_function("() => window.streamgen.displayed.length > 30", timeout=WAIT_MS)
        player = page.evaluate("() => window.streamgen.media.constructor.name")
        assert player == "WebCodecsPlayer"
        assert page.is_visible("#canvas") and not page.is_visible("#video")
        frames = [frame for _, frame in page.evaluate("() => window.streamgen.displayed")]
        # Shown in stream order from the first frame on; a refresh may skip one, nothing is shown twice.
        assert frames[0] == 0 and all(b > a for a, b in zip(frames, frames[1:])), frames
        assert frames[-1] - frames[0] <= 2 * len(frames), frames
        picture = page.evaluate(SAMPLE_CANVAS)
        assert (picture["width"], picture["height"]) == (64, 64)
        assert picture["max"] > 16 and picture["std"] > 1, picture
        assert int(page.text_content("#stat-played")) > 0
        page.click("#stop")
        page.wait_for_function("() => window.streamgen.state === 'idle'", timeout=WAIT_MS)
    assert not errors
