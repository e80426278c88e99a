"""What a person steering or watching a stream gets, in Debian's headless Chromium (fixtures of test_browser.py):
the page's WebCodecs player (frames demuxed, decoded and drawn on a canvas, each displayed frame reported by its
number), prompt transitions, and the page in viewer mode. Tiny model, loopback, every wait bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_browser import WAIT_MS, chromium, page  # noqa: F401 - fixtures

from streamgen import StreamingPipeline
from streamgen.pipeline import ChunkTiming
from streamgen.runtime import Runner, Stream
from streamgen_server.app import serve_in_thread
from streamgen_server.protocol import Limits, Start
from streamgen_server.scheduler import LEAD_WINDOW, PACE_LEAD_SECONDS, MediaChunk, Scheduler, ServedStream

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]


def canvas_picture(page) -> np.ndarray:  # noqa: F811
    """The page's canvas as drawn, grey levels."""
    url = page.evaluate("() => document.getElementById('canvas').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"), dtype=float)


async def run_scheduler_until(scheduler: Scheduler, event: asyncio.Event) -> None:
    """Run `scheduler` until `event` is set (at most a minute), then stop it and shut it down."""
    running = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(event.wait(), 60)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await scheduler.shutdown()


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
    at most PACE_LEAD_SECONDS; a pause does not count as production, nor does a chunk made again under a change."""
    stream = ServedStream(Start("paced"), None, buffer=2, wake=lambda: None)
    stream.session = SimpleNamespace(fps=16)  # what pacing reads of the session

    def produce(index: int, seconds: float, remade: bool = False) -> float:
        """The chunk's production starts when it is due (or when the stream is free; the clock starts at 0) and
        takes `seconds`."""
        at = max(stream._due, stream._free, 0.0) + seconds
        stream.put(MediaChunk(index, 0, 12, [], 1, "paced", ChunkTiming(), remade=remade), at)
        return at

    now = produce(0, 0.05)  # the first chunk, 1 frame, has no due time: not measured
    assert stream.lead == PACE_LEAD_SECONDS
    now = produce(1, 0.2)  # measured from the next one on: a stream does not start a second ahead of its viewer
    assert stream.lead == pytest.approx(0.2 + 1 / 16)
    for index, seconds in enumerate([0.3, 0.25], 2):
        now = produce(index, seconds)
    assert stream.lead == pytest.approx(0.3 + 1 / 16)
    stream.pause(True, now)
    stream.pause(False, now + 5.0)  # five seconds paused: production is counted from the resume
    produce(4, 0.2)
    assert stream.lead == pytest.approx(0.3 + 1 / 16)
    produce(5, 0.6, remade=True)  # made again under a change: once, not what later chunks need
    assert stream.lead == pytest.approx(0.3 + 1 / 16)
    for index in range(6, 6 + LEAD_WINDOW):
        produce(index, 3.0)  # a loaded machine: the lead grows, up to its cap
    assert stream.lead == PACE_LEAD_SECONDS


def change_while_denoising(pipe, monkeypatch, stream: Stream, change) -> None:  # noqa: F811
    """Make `change(stream)` once, while the transformer denoises a turn with `stream` in it."""
    denoise, pending = pipe.denoise, [change]

    def denoising(sessions, plans):
        result = denoise(sessions, plans)
        if pending and stream.session in sessions:
            pending.pop()(stream)
        return result

    monkeypatch.setattr(pipe, "denoise", denoising)


def test_a_change_during_a_denoise_remakes_that_chunk_under_it(pipe, monkeypatch) -> None:  # noqa: F811
    """A prompt change that arrives while a chunk is denoised: the chunk is dropped before it is committed and made
    again, in the same turn, under the change and from the same noise, i.e. the very chunk the change gives when it
    comes before the turn. The stream batched with it is not disturbed."""
    runner = Runner(pipe)
    changed, told = (Stream("a red ball", seed=7, steps=2) for _ in range(2))
    other = Stream("a green cone", seed=8, steps=2)
    for stream in (changed, told, other):
        runner.open(stream)
        runner.turn([stream])  # the 1-frame first chunk
    told.set_prompt("a blue cube")  # before its turn
    expected = runner.denoise([told])[0]
    calls = sum(runner.batch_sizes.values())
    change_while_denoising(pipe, monkeypatch, changed, lambda stream: stream.set_prompt("a blue cube"))
    chunk, beside = runner.denoise([changed, other])
    assert (chunk.stream, beside.stream) == (changed, other)
    assert chunk.prompt == "a blue cube" and beside.prompt == "a green cone"
    assert sum(runner.batch_sizes.values()) == calls + 2  # the batched call, then the chunk made again
    assert runner.remade == 1
    torch.testing.assert_close(chunk.latents, expected.latents, rtol=0, atol=1e-6)
    assert not torch.allclose(beside.latents, chunk.latents)
    assert changed.session.chunk_index == 2  # committed once: the dropped chunk never reached the cache
    assert chunk.timing.transformer > expected.timing.transformer / 4  # both denoises are its time
    (media,) = runner.deliver(chunk)  # a plain stream's chunk comes whole
    assert (media.index, media.first_frame, media.prompt, media.remade) == (1, 1, "a blue cube", True)
    assert not beside.remade


def test_a_step_change_during_a_transition_remakes_the_chunk_at_the_same_blend(pipe, monkeypatch) -> None:  # noqa: F811
    """Made again, a chunk is planned as if its first plan had never been made: its transition is not advanced twice
    and its noise is the same."""
    runner = Runner(pipe)
    changed, told = (Stream("a red ball", seed=3, steps=2) for _ in range(2))
    for stream in (changed, told):
        runner.open(stream)
        runner.turn([stream])
        stream.set_prompt("a blue cube", transition=2)
    told.set_budget(1)
    expected = runner.denoise([told])[0]
    change_while_denoising(pipe, monkeypatch, changed, lambda stream: stream.set_budget(1))
    chunk = runner.denoise([changed])[0]
    assert (chunk.steps, chunk.transition) == (1, {"from": "a red ball", "weight": 0.5})
    torch.testing.assert_close(chunk.latents, expected.latents, rtol=0, atol=1e-6)
    list(runner.deliver(chunk))
    assert runner.turn([changed])[0].transition == {"from": "a red ball", "weight": 1.0}


@pytest.mark.parametrize("overlap", [False, True])
def test_a_viewers_chunk_goes_out_before_the_rest_of_its_turn_is_encoded(pipe, overlap: bool) -> None:  # noqa: F811
    """Two live viewers' first chunks share a turn: the first's is handed to its connection while the second's is
    being decoded and encoded, not once the whole turn is. Two recorders' are handed over together (in step)."""

    async def handed_while_the_next_is_encoded(realtime: bool) -> bool:
        scheduler = Scheduler(pipe, max_active=2, limits=Limits(), overlap=overlap)
        first, second = (scheduler.open(Start(f"stream {i}", realtime=realtime), None) for i in range(2))
        deliver, delivered, handed = scheduler.runner.deliver, scheduler._delivered, threading.Event()
        answer: list[bool] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def observe_delivered(results) -> None:
            delivered(results)
            if any(chunk.stream is first for chunk, _ in results):
                handed.set()

        def observe_deliver(chunk):  # on the decoding thread
            if chunk.stream is second:  # a viewer's is handed over at once; a recorder's cannot be while this runs
                answer.append(handed.wait(30 if realtime else 0))
                loop.call_soon_threadsafe(done.set)
            return deliver(chunk)

        scheduler._delivered, scheduler.runner.deliver = observe_delivered, observe_deliver
        await run_scheduler_until(scheduler, done)
        return answer[0]

    assert asyncio.run(handed_while_the_next_is_encoded(realtime=True))
    assert not asyncio.run(handed_while_the_next_is_encoded(realtime=False))


def test_a_paced_stream_joins_a_turn_only_when_it_will_be_due_before_the_turn_ends(pipe) -> None:  # noqa: F811
    """A turn takes the streams that are due, and a paced stream not yet due only if it will be within the latest
    turn's time (it would wait for the worker anyway): never earlier, so it is not run ahead of its viewer."""
    scheduler = Scheduler(pipe, max_active=3, limits=Limits())
    due, soon, later = (ServedStream(Start(f"stream {i}"), None, buffer=2, wake=lambda: None) for i in range(3))
    now = time.monotonic()
    for stream, at in ((due, now - 1), (soon, now + 5), (later, now + 60)):
        stream.session, stream._due = SimpleNamespace(fps=16), at
    scheduler._active = [later, soon, due]
    scheduler._turn_seconds = 10.0  # the latest turn held the worker this long: `soon` would wait for it
    assert asyncio.run(scheduler._next()) == [due, soon]
    scheduler._turn_seconds = 0.1  # a short turn: `soon` waits for its own
    assert asyncio.run(scheduler._next()) == [due]


def test_the_worker_denoises_at_most_one_turn_ahead_of_the_encoder(pipe) -> None:  # noqa: F811
    """With decoding on its own thread, a turn is denoised while the previous one is decoded, but not while two wait
    to be: a chunk's prompt and steps are fixed as late as the encoder allows. The first turn's decoding is held up
    here, for a third turn or two seconds: the worker must stop after the second."""

    async def third_turn_while_two_wait() -> bool:
        scheduler = Scheduler(pipe, max_active=3, limits=Limits(), overlap=True, max_batch=1)
        for i in range(3):
            scheduler.open(Start(f"stream {i}", realtime=False), None)
        denoise, deliver, turns, third = scheduler.runner.denoise, scheduler.runner.deliver, [], threading.Event()
        held: list[bool] = []
        released, loop = asyncio.Event(), asyncio.get_running_loop()

        def counted(streams):
            turns.append(streams)
            if len(turns) == 3:
                third.set()
            return denoise(streams)

        def held_up(chunk):  # on the decoding thread
            if not held:
                held.append(third.wait(2))
                loop.call_soon_threadsafe(released.set)
            return deliver(chunk)

        scheduler.runner.denoise, scheduler.runner.deliver = counted, held_up
        await run_scheduler_until(scheduler, released)
        return held[0]

    assert not asyncio.run(third_turn_while_two_wait())


def test_a_turn_takes_as_many_viewers_as_decoding_keeps_up_with(pipe) -> None:  # noqa: F811
    """With decoding on its own thread, a turn takes at most as many live viewers as chunks are decoded while a turn
    denoises (as last measured), least recently served first, at least one; recorders are not limited. Before
    anything is measured, or with decoding on the worker, every ready stream shares the turn."""

    def turn(overlap: bool, turn_seconds: float, delivery_seconds: float) -> list[str]:
        scheduler = Scheduler(pipe, max_active=5, limits=Limits(), overlap=overlap)
        starts = [Start(f"viewer {i}") for i in range(4)] + [Start("recorder", realtime=False)]
        scheduler._active = [ServedStream(start, None, buffer=2, wake=lambda: None) for start in starts]
        for stream in scheduler._active:
            stream.session, stream._due = SimpleNamespace(fps=16), time.monotonic() - 1  # all due
        scheduler._turn_seconds, scheduler._delivery_seconds = turn_seconds, delivery_seconds
        return [stream.request.prompt for stream in asyncio.run(scheduler._next())]

    everyone = ["viewer 0", "viewer 1", "viewer 2", "viewer 3", "recorder"]
    assert turn(True, 0.0, 0.0) == everyone  # nothing measured yet
    assert turn(True, 0.25, 0.1) == ["viewer 0", "viewer 1", "recorder"]  # two chunks decode while a turn denoises
    assert turn(True, 0.05, 0.1) == ["viewer 0", "recorder"]  # decoding is the slower half: one at a time
    assert turn(False, 0.05, 0.1) == everyone  # decoding on the worker
