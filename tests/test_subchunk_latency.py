"""Sub-chunk sending: a live viewer's chunk is decoded, encoded and sent a latent frame (4 frames) at a time, so
its first frames can be shown after a third of the chunk's decode. The pieces hold the very frames of the whole
chunk, go to the connection one by one as they are encoded, pace the stream by when the last of them is in time, and
reach the client (and its watchers) as `segment` messages followed by the chunk's one `chunk` message; a recorder's
chunks still come whole. Both players of the page play such a stream in Debian's headless Chromium. Tiny model,
loopback."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from types import SimpleNamespace

import av
import numpy as np
import pytest
from test_browser import WAIT_MS, chromium, page  # noqa: F401 - fixtures
from test_interaction_browser import run_scheduler_until
from websockets.asyncio.client import connect

from streamgen import StreamingPipeline
from streamgen.pipeline import ChunkTiming
from streamgen.runtime import MediaChunk, Runner, Stream
from streamgen_server.app import serve_in_thread
from streamgen_server.audience import Audience, Viewer
from streamgen_server.metrics import Metrics
from streamgen_server.protocol import Limits, Start
from streamgen_server.scheduler import Scheduler, ServedStream

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]


def pictures(segments: list[bytes]) -> np.ndarray:
    """The frames PyAV decodes from an init segment and the fragments after it."""
    with av.open(io.BytesIO(b"".join(segments))) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_split_chunk_comes_a_latent_frame_at_a_time_with_the_whole_chunks_frames(pipe: StreamingPipeline) -> None:
    runner = Runner(pipe)
    whole, split = Stream("a red ball", seed=5), Stream("a red ball", seed=5)
    split.split = True
    chunks = {}
    for stream in (whole, split):
        runner.open(stream)
        chunks[stream] = [runner.turn([stream]) for _ in range(3)]  # the 1-frame first chunk, then two of 12
    assert [len(turn) for turn in chunks[whole]] == [1, 1, 1]
    assert [len(turn) for turn in chunks[split]] == [1, 3, 3]  # the first chunk is one latent frame
    pieces = [piece for turn in chunks[split] for piece in turn]
    assert [(p.index, p.first_frame, p.frames, p.offset, p.last) for p in pieces] == [
        (0, 0, 1, 0, True),
        (1, 1, 4, 0, False), (1, 5, 4, 4, False), (1, 9, 4, 8, True),
        (2, 13, 4, 0, False), (2, 17, 4, 4, False), (2, 21, 4, 8, True),
    ]  # fmt: skip
    assert pieces[1].timing is pieces[3].timing and pieces[3].timing.decode > 0  # one record per chunk
    assert [p.segments[0].init for p in pieces] == [True] + [False] * 6  # the init segment once, first
    assert sum(s.keyframe for p in pieces for s in p.segments) == 2  # frames 0 and 16, as for whole chunks
    assert split.chunks == whole.chunks == 3 and split.frames == whole.frames == 25
    # Decoding latent frame by latent frame is exact, so the encoder gets, and the viewer sees, the very same frames.
    encoded = {stream: [s for turn in chunks[stream] for p in turn for s in p.segments] for stream in (whole, split)}
    np.testing.assert_array_equal(pictures(encoded[split]), pictures(encoded[whole]))
    for stream in (whole, split):
        runner.release(stream)


def test_the_pacing_lead_is_measured_to_when_every_piece_is_in_time() -> None:
    """A chunk's production ends when it can start playing with each piece arriving before its frames play: its
    first piece's arrival, or a later piece's less the playback time before it, whichever is later."""
    stream = ServedStream(Start("paced"), None, buffer=2, wake=lambda: None)
    stream.session = SimpleNamespace(fps=16)
    assert stream.split  # a live viewer's chunks come in pieces; a recorder's whole
    assert not ServedStream(Start("recorded", realtime=False), None, buffer=2, wake=lambda: None).split

    def produce(index: int, arrivals: list[float]) -> None:
        """The chunk's pieces of 4 frames (0.25 s) arrive `arrivals` seconds after it is due."""
        due = max(stream._due, stream._free, 0.0)
        for i, at in enumerate(arrivals):
            piece = MediaChunk(index, 0, 4, [], 1, "paced", ChunkTiming(), offset=4 * i, last=i == len(arrivals) - 1)
            stream.put(piece, due + at)

    produce(0, [0.05])  # the first chunk is not measured
    produce(1, [0.1, 0.15, 0.2])  # later pieces well within their frames' time: the first one sets it
    assert stream.lead == pytest.approx(0.1 + 1 / 16)
    due = stream._due
    produce(2, [0.1, 0.2, 0.8])  # the last piece came late: the chunk could start at 0.8 - 0.5 s
    assert stream.lead == pytest.approx(0.3 + 1 / 16)
    assert stream._due == pytest.approx(max(due, due + 0.3 - stream.lead) + 0.75)  # 12 frames on


def test_each_piece_goes_to_its_connection_before_the_next_is_decoded(pipe: StreamingPipeline) -> None:
    """On the decoding thread, a live viewer's next piece is decoded only after the previous one was handed to the
    loop and put; its chunk stays in flight (counted once against the stream's buffer) until its last piece."""

    async def scenario() -> tuple[list[bool], list[tuple[int, int]]]:
        scheduler = Scheduler(pipe, max_active=1, limits=Limits(), overlap=True)
        stream = scheduler.open(Start("a viewer"), None)
        deliver, delivered, handed = scheduler.runner.deliver, scheduler._delivered, threading.Event()
        answers: list[bool] = []
        states: list[tuple[int, int]] = []  # (chunks in flight, pieces put) when a piece was handed
        done, loop = asyncio.Event(), asyncio.get_running_loop()

        def observe_delivered(results) -> None:
            delivered(results)
            if any(not piece.last for _, piece in results):
                states.append((stream.in_flight, len(stream._media)))
                handed.set()

        def observe_deliver(chunk):  # on the decoding thread
            for piece in deliver(chunk):
                handed.clear()
                yield piece
                if not piece.last:  # the scheduler asks for the next piece: the one just yielded is on the loop
                    answers.append(handed.wait(30))
            if len(answers) >= 2:  # chunk 1's first two pieces (nobody reads the stream: its buffer fills)
                loop.call_soon_threadsafe(done.set)

        scheduler._delivered, scheduler.runner.deliver = observe_delivered, observe_deliver
        await run_scheduler_until(scheduler, done)
        return answers, states

    answers, states = asyncio.run(scenario())
    assert answers == [True, True]
    assert states == [(1, 2), (1, 3)]  # the first chunk and one piece, then two: the chunk in flight throughout


def test_a_viewer_gets_pieces_then_the_chunks_stats_and_a_recorder_whole_chunks(pipe: StreamingPipeline) -> None:
    async def conversation(url: str, realtime: bool) -> list[dict]:
        """Text messages until the third chunk's stats."""
        received = []
        async with connect(url, max_size=None) as socket:
            await socket.send(json.dumps({"type": "start", "prompt": "a blue cube", "steps": 1, "realtime": realtime}))
            while sum(m.get("type") == "chunk" for m in received) < 3:
                message = await socket.recv()
                received.append(json.loads(message) if isinstance(message, str) else {"bytes": len(message)})
        return received

    with serve_in_thread(pipe) as server:
        url = server.websocket_url
        viewer, recorder = (asyncio.run(asyncio.wait_for(conversation(url, live), 60)) for live in (True, False))
    for messages, pieces in ((viewer, [1, 4, 4, 4, 4, 4, 4]), (recorder, [1, 12, 12])):
        media = [m for m in messages if m.get("type") == "segment" and m["kind"] == "chunk"]
        assert [m["frames"] for m in media] == pieces
        assert all(b["first_frame"] == a["first_frame"] + a["frames"] for a, b in zip(media, media[1:]))
        # Each chunk's stats come right after its last piece's bytes, and count the whole chunk.
        kinds = [m.get("type", "bytes") for m in messages if m.get("type") != "viewers"]
        stats = [m for m in messages if m.get("type") == "chunk"]
        assert [m["frames"] for m in stats] == [1, 12, 12]
        for index, at in enumerate(i for i, kind in enumerate(kinds) if kind == "chunk"):
            assert kinds[at - 2 : at] == ["segment", "bytes"]
            assert sum(m["frames"] for m in media if m["chunk"] == index) == stats[index]["frames"]


def test_a_watchers_queue_counts_chunks_not_pieces() -> None:
    """A viewer is dropped to the next key frame when it falls `viewer_buffer` chunks behind, whatever the number of
    pieces those chunks came in (nothing is sent here: the viewer's writer never runs)."""
    limits, metrics = Limits(), Metrics(dict)
    viewer = Viewer(Audience(limits), "watch", "key", send=None, metrics=metrics)
    viewer.push("started")  # an event: never dropped, never counted
    for _ in range(limits.viewer_buffer):
        for part in range(3):
            viewer.push("segment", b"piece", media=True, ends=part == 2)
    viewer.push("segment", b"piece", media=True, ends=False)  # a piece of the next chunk: one chunk too many
    assert metrics.viewer_drops == 1 and [messages for *_, messages in viewer._queue] == [("started",)]
    viewer.push("segment", b"piece", media=True, ends=False)
    assert metrics.viewer_drops == 1 and len(viewer._queue) == 2


def test_a_turn_starts_no_sooner_than_the_encoder_can_take_its_chunks(pipe: StreamingPipeline) -> None:
    """With decoding on its own thread, a due stream's turn waits while the encoder's backlog (its chunks at the
    latest delivery time each, less what the current one has had) is longer than a turn: denoised earlier, the chunk
    would only wait for the encoder with its prompt and steps fixed. Nothing is held before anything is measured, or
    with decoding on the worker."""

    def seconds_to_a_turn(overlap: bool, delivery_seconds: float) -> float:
        scheduler = Scheduler(pipe, max_active=1, limits=Limits(), overlap=overlap)
        stream = ServedStream(Start("a viewer"), None, buffer=3, wake=lambda: None)
        stream.session, stream._due, stream.in_flight = SimpleNamespace(fps=16), time.monotonic() - 1, 1
        scheduler._active, scheduler._held = [stream], {stream}
        scheduler._turn_seconds, scheduler._delivery_seconds = 0.2, delivery_seconds
        scheduler._delivering_since = began = time.monotonic()  # the encoder has just begun the stream's chunk
        assert asyncio.run(asyncio.wait_for(scheduler._next(), 10)) == [stream]
        return time.monotonic() - began

    assert 0.29 <= seconds_to_a_turn(True, 0.5) < 5  # 0.5 s of decoding left, a turn takes 0.2 s: 0.3 s held
    assert seconds_to_a_turn(True, 0.1) < 0.1  # the chunk will be decoded before a turn ends: at once
    assert seconds_to_a_turn(True, 0.0) < 0.1  # nothing measured yet
    assert seconds_to_a_turn(False, 0.5) < 0.1  # no encoder thread: its turn is the worker's next job


@pytest.mark.parametrize("player", ["webcodecs", "mse"])
def test_the_page_plays_a_stream_sent_a_latent_frame_at_a_time(pipe, page, player: str) -> None:  # noqa: F811
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with serve_in_thread(pipe) as server:
        page.goto(server.url + f"?prompt=a%20red%20ball&steps=1&autoplay=1&player={player}")
        page.wait_for_function("() => window.streamgen.displayed.length > 30", timeout=WAIT_MS)
        # What reached the page in the last seconds: media messages of 4 frames (a latent frame's), not of 12, and
        # perhaps the 1-frame first chunk.
        assert {frames for _, frames in page.evaluate("() => window.streamgen.received")} - {1} == {4}
        frames = [frame for _, frame in page.evaluate("() => window.streamgen.displayed")]
        assert frames[0] == 0 and all(b > a for a, b in zip(frames, frames[1:])), frames  # in order, none twice
        assert frames[-1] - frames[0] <= 2 * len(frames), frames  # across the pieces' seams, hardly a frame skipped
        page.click("#stop")
        page.wait_for_function("() => window.streamgen.state === 'idle'", timeout=WAIT_MS)
    assert not errors
