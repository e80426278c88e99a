"""What a person steering or watching a stream gets, in Debian's headless Chromium (fixtures of test_browser.py):
the page's WebCodecs player (frames demuxed, decoded and drawn on a canvas, each displayed frame reported by its
number), prompt transitions, and the page in viewer mode. Tiny model, loopback, every wait bounded."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_browser import WAIT_MS, chromium, page  # noqa: F401 - fixtures

from streamgen import StreamingPipeline
from streamgen.pipeline import ChunkTiming
from streamgen_server.app import serve_in_thread
from streamgen_server.protocol import Start
from streamgen_server.scheduler import LEAD_WINDOW, PACE_LEAD_SECONDS, MediaChunk, ServedStream

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]


def canvas_picture(page) -> np.ndarray:  # noqa: F811
    """The page's canvas as drawn, grey levels."""
    url = page.evaluate("() => document.getElementById('canvas').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"), dtype=float)


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
        picture = canvas_picture(page)
        assert picture.shape == (64, 64)
        assert picture.max() > 16 and picture.std() > 1  # a picture, not a blank
        assert int(page.text_content("#stat-played")) > 0
        page.click("#stop")
        page.wait_for_function("() => window.streamgen.state === 'idle'", timeout=WAIT_MS)
    assert not errors


def test_watch_link_opens_the_stream_read_only_and_the_owner_sees_the_count(pipe, page) -> None:  # noqa: F811
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with serve_in_thread(pipe) as server:
        page.goto(server.url + "?prompt=a%20red%20ball&steps=1&autoplay=1")
        page.wait_for_selector("#share", state="visible", timeout=WAIT_MS)
        link = page.input_value("#watch-link")
        assert link.startswith(server.url + "?watch=") and "&key=" in link
        viewer = page.context.browser.new_page()
        viewer.on("pageerror", lambda error: errors.append(str(error)))
        viewer.goto(link)
        viewer.wait_for_function("() => window.streamgen.displayed.length > 12", timeout=WAIT_MS)
        assert viewer.text_content("#status") == "watching"
        assert not viewer.is_visible("#prompt") and not viewer.is_visible("#start")  # nothing to steer with
        page.wait_for_function("() => document.getElementById('viewers').textContent === '1'", timeout=WAIT_MS)
        viewer.close()
        page.wait_for_function("() => document.getElementById('viewers').textContent === '0'", timeout=WAIT_MS)
        page.click("#stop")
    assert not errors


def test_a_transition_blends_the_text_condition_over_its_chunks(pipe: StreamingPipeline) -> None:
    with pipe.start_session("a red ball", seed=0) as session:
        session.next_chunk()
        old, new = session.text.embeds, pipe.encode_prompt("a blue cube")
        session.set_prompt("a blue cube", transition=4)
        for i in range(1, 5):
            session.next_chunk()
            assert session.transition.weight == i / 4
            torch.testing.assert_close(session.text.embeds, old + i / 4 * (new - old))
        session.next_chunk()
        assert session.transition is None and torch.equal(session.text.embeds, new)
        with pytest.raises(ValueError, match="transition"):
            session.set_prompt("a green cone", transition=-1)


def test_the_page_blends_a_new_prompt_over_two_chunks(pipe, page) -> None:  # noqa: F811
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with serve_in_thread(pipe) as server:
        page.goto(server.url + "?prompt=a%20red%20ball&steps=1&autoplay=1")
        page.wait_for_function("() => window.streamgen.chunks >= 2", timeout=WAIT_MS)
        page.evaluate("""() => {
          window.blends = [];
          window.streamgen.ws.addEventListener("message", (e) => {
            const msg = typeof e.data === "string" ? JSON.parse(e.data) : {};
            if (msg.type === "chunk" && msg.prompt === "a blue cube") window.blends.push(msg);
          });
        }""")
        page.fill("#transition", "2")
        page.fill("#prompt", "a blue cube")
        page.press("#prompt", "Enter")
        page.wait_for_function("() => window.blends.length >= 3", timeout=WAIT_MS)
        chunks = page.evaluate("() => window.blends")
        assert [c.get("transition") for c in chunks] == [
            {"from": "a red ball", "weight": 0.5},
            {"from": "a red ball", "weight": 1.0},
            None,  # the blend is over: wholly the new prompt
        ]
        assert [c["chunk"] for c in chunks] == list(range(chunks[0]["chunk"], chunks[0]["chunk"] + 3))
        page.click("#stop")
    assert not errors


def test_the_pacing_lead_follows_measured_production_times() -> None:
    """A paced stream's lead is the longest of its latest chunks' production times (due -> encoded) plus a frame,
    at most PACE_LEAD_SECONDS; a pause does not count as production."""
    stream = ServedStream(Start("paced"), None, buffer=2, wake=lambda: None)
    stream.session = SimpleNamespace(fps=16)  # what pacing reads of the session

    def produce(index: int, seconds: float) -> float:
        """The chunk's production starts when it is due (or when the stream is free; the clock starts at 0) and
        takes `seconds`."""
        at = max(stream._due, stream._free, 0.0) + seconds
        stream.put(MediaChunk(index, 0, 12, [], 1, "paced", ChunkTiming()), at)
        return at

    now = produce(0, 0.05)  # the first chunk, 1 frame, has no due time: not measured
    assert stream.lead == PACE_LEAD_SECONDS
    for index, seconds in enumerate([0.2, 0.3, 0.25], 1):
        now = produce(index, seconds)
    assert stream.lead == pytest.approx(0.3 + 1 / 16)
    stream.pause(True, now)
    stream.pause(False, now + 5.0)  # five seconds paused: production is counted from the resume
    produce(4, 0.2)
    assert stream.lead == pytest.approx(0.3 + 1 / 16)
    for index in range(5, 5 + LEAD_WINDOW):
        produce(index, 3.0)  # a loaded machine: the lead grows, up to its cap
    assert stream.lead == PACE_LEAD_SECONDS
