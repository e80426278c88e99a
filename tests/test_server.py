"""The live server end to end on loopback: a real server on a free port, real websockets, the Python client,
a tiny random model. Every wait is bounded; nothing leaves 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamgen import StreamingPipeline
from streamgen.media import write_mp4
from streamgen_client import cli
from streamgen_client.client import StreamClient, endpoint, record
from streamgen_server import app as server_app
from streamgen_server.app import App, Background, serve_in_thread
from streamgen_server.protocol import Limits, Start
from streamgen_server.scheduler import MediaChunk, Scheduler

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
TIMEOUT = 60  # seconds for any one client conversation


@dataclass
class Server:
    """A server in this process, and what the tests ask it over HTTP."""

    background: Background

    @property
    def app(self) -> App:
        return self.background.app

    @property
    def url(self) -> str:
        return self.background.websocket_url

    def stop(self) -> None:
        self.background.stop()

    def get(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) of an HTTP GET."""
        try:
            with urllib.request.urlopen(self.background.url.rstrip("/") + path, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/healthz")[2])

    def metric(self, name: str) -> float:
        for line in self.get("/metrics")[2].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


@contextlib.contextmanager
def serving(pipe: StreamingPipeline, **options: Any) -> Iterator[Server]:
    with serve_in_thread(pipe, **options) as background:
        yield Server(background)


@pytest.fixture(scope="module")
def server(pipe: StreamingPipeline) -> Iterator[Server]:
    # Every client here is 127.0.0.1; waves of vanishing clients hold up to 10 sessions at once.
    with serving(pipe, max_sessions=4, limits=Limits(max_sessions_per_client=16)) as running:
        yield running


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def frames_in(path: Path) -> int:
    """Decode the whole file with PyAV (as a player would); check its format on the way."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate) == (64, 64, 16)
        return sum(1 for _ in container.decode(stream))


async def next_of(client: StreamClient, kind: str) -> dict[str, Any]:
    """The next event of type `kind`, skipping media and other events."""
    while True:
        message = await client.receive()
        if isinstance(message, dict) and message["type"] == kind:
            return message


def moving_clip(count: int) -> np.ndarray:
    y, x = np.mgrid[:64, :64]
    frames = np.empty((count, 64, 64, 3), np.uint8)
    for t in range(count):
        frames[t] = np.stack([x * 4, y * 4, np.full_like(x, 64)], -1)
        frames[t, 8:24, 4 * t : 4 * t + 16] = 255
    return frames


# -- streams ----------------------------------------------------------------------------------------------------
def test_t2v_ten_chunks_with_prompt_and_step_changes(server: Server, tmp_path: Path) -> None:
    async def session():
        async with await StreamClient.connect(server.url) as client:
            assert client.ready["protocol"] == 1
            assert (client.ready["width"], client.ready["height"], client.ready["fps"]) == (64, 64, 16)
            changes = {3: [{"type": "prompt", "prompt": "a blue cube"}], 5: [{"type": "steps", "steps": 2}]}
            return await record(client, tmp_path / "t2v.mp4", prompt="a red ball", chunks=10, seed=7, changes=changes)

    recording = run(session())
    assert recording.frames == frames_in(recording.path) == 1 + 12 * 9
    assert [c["chunk"] for c in recording.chunks] == list(range(10))
    assert [c["frames"] for c in recording.chunks] == [1] + [12] * 9
    prompts = [c["prompt"] for c in recording.chunks]
    steps = [c["steps"] for c in recording.chunks]
    # Each change is sent once the stats of chunk 3 (5) arrive, so it shows from a later chunk on.
    assert prompts[:4] == ["a red ball"] * 4 and prompts[-1] == "a blue cube"
    assert steps[:6] == [1] * 6 and steps[-1] == 2
    stages = {"transformer", "cache", "decode", "encode", "send", "total"}
    assert all(set(c["latency_ms"]) == stages for c in recording.chunks)
    started = next(e for e in recording.events if e["type"] == "started")
    assert started["codec"].startswith("avc1.") and started["seed"] == 7 and started["context_frames"] == 0
    assert recording.events[-1] == {
        "type": "stopped",
        "reason": "client",
        "chunks": recording.events[-1]["chunks"],
        "frames": recording.events[-1]["frames"],
    }
    assert recording.segments[0]["kind"] == "init"


def test_cli_records_v2v_from_a_clip(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip, out = tmp_path / "clip.mp4", tmp_path / "v2v.mp4"
    write_mp4(clip, moving_clip(9), fps=16)
    argv = ["--url", server.url, "--prompt", "the square keeps going", "--chunks", "2", "--video", str(clip)]
    assert cli.main([*argv, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "started v2v" in printed and "9 context frames" in printed
    chunk_lines = [line for line in printed.splitlines() if line.startswith("chunk ")]
    assert len(chunk_lines) == 2 and all("transformer" in line and "decode" in line for line in chunk_lines)
    assert frames_in(out) == 9 + 12 * 2  # the clip's reconstruction, then two chunks


def test_i2v_from_an_image(server: Server, tmp_path: Path) -> None:
    image = io.BytesIO()
    Image.fromarray(moving_clip(1)[0]).save(image, format="PNG")

    async def session():
        async with await StreamClient.connect(server.url) as client:
            upload = image.getvalue()
            return await record(client, tmp_path / "i2v.mp4", prompt="go", chunks=1, mode="i2v", upload=upload)

    recording = run(session())
    assert [s["kind"] for s in recording.segments] == ["init", "context", "chunk"]
    assert frames_in(recording.path) == 1 + 12


def test_four_concurrent_sessions_get_complete_ordered_streams(server: Server, tmp_path: Path) -> None:
    async def session(i: int):
        async with await StreamClient.connect(server.url) as client:
            return await record(client, tmp_path / f"s{i}.mp4", prompt=f"scene {i}", chunks=4, seed=i)

    async def all_four():
        return await asyncio.gather(*(session(i) for i in range(4)))

    for recording in run(all_four()):
        media = [s for s in recording.segments if s["kind"] != "init"]
        assert [s["chunk"] for s in media] == [c["chunk"] for c in recording.chunks] == [0, 1, 2, 3]
        assert [s["first_frame"] for s in media] == [0, 1, 13, 25]
        assert not any(e["type"] == "queued" for e in recording.events)  # all four held a slot at once
        assert frames_in(recording.path) == 37


def test_pause_holds_generation_until_resume(server: Server) -> None:
    async def session():
        async with await StreamClient.connect(server.url) as client:
            await client.start("a slow river", seed=1)
            await next_of(client, "chunk")
            await client.send("pause")
            await next_of(client, "paused")
            with contextlib.suppress(TimeoutError):  # drain what was generated before the pause
                while True:
                    await asyncio.wait_for(client.receive(), 1.5)
            before = server.metric("streamgen_chunks_total")
            await asyncio.sleep(1.0)
            assert server.metric("streamgen_chunks_total") == before
            await client.send("resume")
            await next_of(client, "resumed")
            await next_of(client, "chunk")
            await client.send("stop")
            await next_of(client, "stopped")

    run(session())


# -- robustness -------------------------------------------------------------------------------------------------
BAD_MESSAGES: list[tuple[str | bytes | tuple[str, bytes], str]] = [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('"a string"', "bad_json"),
    ("[" * 50_000, "bad_json"),  # nested too deep for the parser
    ("{}", "bad_message"),
    ('{"type": 5}', "bad_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "start"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "colour": "red"}', "bad_message"),
    ('{"type": "start", "prompt": "  "}', "bad_message"),
    ('{"type": "start", "prompt": "x", "steps": 0}', "out_of_range"),
    ('{"type": "start", "prompt": "x", "steps": 65}', "out_of_range"),
    ('{"type": "start", "prompt": "x", "steps": "4"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "steps": 2.5}', "bad_message"),
    ('{"type": "start", "prompt": "x", "steps": true}', "bad_message"),
    ('{"type": "start", "prompt": "x", "seed": -1}', "out_of_range"),
    ('{"type": "start", "prompt": "x", "seed": 9007199254740992}', "out_of_range"),
    (json.dumps({"type": "start", "prompt": "x" * 5000}), "out_of_range"),
    ('{"type": "start", "prompt": "x", "mode": "x2v"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "protocol": 2}', "unsupported_version"),
    ('{"type": "start", "prompt": "x", "realtime": "yes"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "upload_bytes": 10}', "bad_message"),
    ('{"type": "start", "prompt": "x", "mode": "i2v"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "mode": "v2v", "upload_bytes": 1000000000}', "too_large"),
    (json.dumps({"type": "prompt", "prompt": "y" * 100_000}), "too_large"),
    ('{"type": "prompt", "prompt": "x"}', "no_session"),
    ('{"type": "steps", "steps": 2}', "no_session"),
    ('{"type": "steps", "steps": NaN}', "bad_message"),
    ('{"type": "steps", "steps": null}', "bad_message"),
    ('{"type": "pause"}', "no_session"),
    ('{"type": "resume"}', "no_session"),
    ('{"type": "stop"}', "no_session"),
    ('{"type": "stop", "now": true}', "bad_message"),
    (b"\x00\x01\x02", "unexpected_binary"),
    (('{"type": "start", "prompt": "x", "mode": "v2v", "upload_bytes": 10}', b"12345"), "bad_upload"),
    (('{"type": "start", "prompt": "x", "mode": "i2v", "upload_bytes": 64}', bytes(range(64))), "bad_media"),
]


def test_bad_messages_each_get_an_error_and_the_server_keeps_serving(server: Server, tmp_path: Path) -> None:
    async def session():
        async with await StreamClient.connect(server.url) as client:
            sent, cases = 0, itertools.cycle(BAD_MESSAGES)
            while sent < 200:
                message, code = next(cases)
                for part in message if isinstance(message, tuple) else (message,):
                    await client.websocket.send(part)
                    sent += 1
                reply = json.loads(await client.websocket.recv())
                assert (reply["type"], reply["code"]) == ("error", code), message
                assert reply["message"]
            # The same connection still works, and so does the server for others.
            return await record(client, tmp_path / "after.mp4", prompt="fine now", chunks=2)

    assert run(session()).frames == 13
    assert server.health()["status"] == "ok"
    assert server.metric('streamgen_errors_total{code="bad_json"}') >= 4


def test_flooding_is_rate_limited_not_fatal(server: Server) -> None:
    async def session():
        async with await StreamClient.connect(server.url) as client:
            for _ in range(300):
                await client.send("pause")
            codes = [json.loads(await client.websocket.recv())["code"] for _ in range(300)]
            assert set(codes) == {"no_session", "rate_limited"}
            await asyncio.sleep(0.5)  # the bucket refills
            await client.send("pause")
            assert json.loads(await client.websocket.recv())["code"] == "no_session"

    run(session())


def test_a_client_that_stops_reading_stalls_only_its_own_generation(pipe: StreamingPipeline) -> None:
    """Backpressure at the scheduler, below the sockets (whose kernel buffers would hold hundreds of tiny chunks)."""

    async def scenario() -> None:
        limits = Limits()
        scheduler = Scheduler(pipe, max_active=2, limits=limits)
        runner = asyncio.create_task(scheduler.run())
        stalled = scheduler.open(Start("nobody reads this", realtime=False), None)
        reading = scheduler.open(Start("somebody reads this", realtime=False), None)
        messages = reading.messages()
        received = 0
        while received < 6:  # the read stream goes on...
            received += isinstance(await anext(messages), MediaChunk)
        assert stalled.chunks == limits.chunk_buffer  # ...the other one stopped at its buffer's size
        unread = stalled.messages()
        assert (await anext(unread))["type"] == "started"
        assert isinstance(await anext(unread), MediaChunk)
        await anext(unread)  # back for more: the first chunk has been delivered, a slot in the buffer is free
        for _ in range(100):
            await asyncio.sleep(0.05)
            if stalled.chunks > limits.chunk_buffer:
                break
        assert stalled.chunks == limits.chunk_buffer + 1
        runner.cancel()
        await scheduler.shutdown()
        assert stalled.session is None and reading.session is None

    run(scenario())


def test_vanishing_clients_free_their_sessions(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = server.app.scheduler.pipe
    sessions: list[weakref.ref] = []
    start_session = pipe.start_session

    def tracked(*args, **kwargs):
        session = start_session(*args, **kwargs)
        sessions.append(weakref.ref(session))
        return session

    monkeypatch.setattr(pipe, "start_session", tracked)

    async def vanish(i: int) -> None:
        client = await StreamClient.connect(server.url)
        await client.start(f"gone {i}", seed=i)
        if i % 3 < 2:  # leave as the first chunk starts, or mid-stream; else at once, maybe while queued
            await next_of(client, ("started", "chunk")[i % 3])
        client.websocket.transport.abort()  # no close handshake: the client is just gone

    async def wave(first: int, count: int) -> None:
        await asyncio.gather(*(vanish(i) for i in range(first, first + count)))

    def settle() -> int:
        deadline = time.monotonic() + 30
        # Sessions are freed at once, or right after a chunk that was running when their client left.
        while server.health() != {"status": "ok", "active": 0, "queued": 0} or server.metric("streamgen_session_bytes"):
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.1)
        gc.collect()
        return psutil.Process().memory_info().rss

    run(wave(0, 8))  # warm up allocator pools and caches, so they count in the baseline
    baseline = settle()
    for first in range(0, 50, 10):
        run(wave(first, 10))
    grown = settle() - baseline
    assert len(sessions) >= 40  # 2 in 3 of the 58 clients waited for their session to start
    assert all(ref() is None for ref in sessions), "a vanished client's session is still referenced"
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_queue_positions_then_graceful_shutdown(pipe: StreamingPipeline) -> None:
    with serving(pipe, max_sessions=1) as server:

        async def session():
            a, b, c = [await StreamClient.connect(server.url) for _ in range(3)]
            await a.start("first")
            await next_of(a, "started")
            await b.start("second")
            assert (await next_of(b, "queued"))["position"] == 1
            await c.start("third")
            assert (await next_of(c, "queued"))["position"] == 2
            assert server.health() == {"status": "ok", "active": 1, "queued": 2}
            await b.start("again")
            assert (await next_of(b, "error"))["code"] == "session_exists"
            await a.send("stop")
            assert (await next_of(a, "stopped"))["reason"] == "client"
            await next_of(b, "started")
            assert (await next_of(c, "queued"))["position"] == 1
            await b.close()  # leaving frees the slot for the next in line
            await next_of(c, "started")
            server.stop()
            assert (await next_of(c, "stopped"))["reason"] == "shutdown"
            await c.websocket.wait_closed()
            assert c.websocket.close_code == 1001
            await a.close()

        run(session())


def test_token_and_origin_are_checked_on_the_handshake(pipe: StreamingPipeline) -> None:
    with serving(pipe, token="s3cret") as server:

        async def session():
            for token in (None, "wrong"):
                with pytest.raises(InvalidStatus) as refused:
                    await StreamClient.connect(server.url, token)
                assert refused.value.response.status_code == 401
                assert json.loads(refused.value.response.body)["code"] == "unauthorized"
            async with await StreamClient.connect(server.url, "s3cret") as client:
                assert client.ready["type"] == "ready"
            url = endpoint(server.url, "s3cret")
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, origin="http://evil.example")
            assert refused.value.response.status_code == 403
            assert json.loads(refused.value.response.body)["code"] == "forbidden_origin"
            async with connect(url, origin=f"http://127.0.0.1:{server.background.port}") as websocket:
                assert json.loads(await websocket.recv())["type"] == "ready"

        run(session())


def test_http_routes(server: Server, tmp_path: Path) -> None:
    async def session():
        async with await StreamClient.connect(server.url) as client:
            await record(client, tmp_path / "one.mp4", prompt="x", chunks=1)

    run(session())
    status, content_type, body = server.get("/healthz")
    assert (status, content_type) == (200, "application/json") and json.loads(body)["status"] == "ok"
    status, content_type, body = server.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    for name in ("sessions_active", "sessions_queued", "connections", "frames_sent_total", "errors_total"):
        assert f"# TYPE streamgen_{name} " in body
    assert 'streamgen_chunk_latency_seconds_bucket{le="+Inf"}' in body
    assert server.metric("streamgen_frames_sent_total") >= 1
    status, content_type, body = server.get("/?prompt=x&autoplay=1")
    assert (status, content_type) == (200, "text/html") and "<video" in body
    assert server.get("/app.js")[:2] == (200, "text/javascript")
    for missing in ("/nope", "/../pyproject.toml", "/%2e%2e/pyproject.toml"):
        status, _, body = server.get(missing)
        assert status == 404 and json.loads(body)["code"] == "not_found"


def test_streamgen_serve_command(model_dir: Path, tmp_path: Path) -> None:
    """`streamgen serve` as a user runs it: prints its URL, applies --height/--width, stops on SIGTERM."""
    command = [
        sys.executable,
        "-m",
        "streamgen.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        "0",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in process.stdout:  # bounded by the test's timeout
            if "serving" in line:
                url = line.split(" on ")[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "healthz", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"

        async def ready():
            async with await StreamClient.connect(url.replace("http", "ws")) as client:
                return client.ready

        assert run(ready())["width"] == 64
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_shutdown_that_does_not_end_fails_naming_what_it_waits_on(pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving `serve_in_thread` never hangs a test or benchmark: past its wait it raises, with the loop's awaits."""

    release = threading.Event()

    async def stuck(self) -> None:
        await asyncio.to_thread(release.wait)

    monkeypatch.setattr(server_app, "SHUTDOWN_WAIT_SECONDS", 0.5)
    monkeypatch.setattr(server_app.App, "shutdown", stuck)
    with pytest.raises(RuntimeError, match=r"did not shut down(.|\n)*stuck \(test_server.py"):
        with serve_in_thread(pipe):
            pass
    release.set()  # the server's thread then ends
