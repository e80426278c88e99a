"""Uploads through a live server (loopback, the tiny model): hostile files are answered with `bad_media` and leave
the connection usable, real clips are resampled and cut to their end, and `started` says what was used."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import clips
from streamgen import StreamingPipeline
from streamgen.media import MAX_PIXELS, read_clip
from streamgen_client import cli
from streamgen_client.client import StreamClient, StreamError, record
from streamgen_server.app import Background, serve_in_thread
from streamgen_server.protocol import Limits

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(pipe: StreamingPipeline) -> Iterator[Background]:
    with serve_in_thread(pipe, max_sessions=2, limits=Limits(max_sessions_per_client=16)) as running:
        yield running


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


async def upload(client: StreamClient, data: bytes, mode: str = "v2v", **start: Any) -> dict[str, Any]:
    """Start an i2v/v2v session with `data`; the server's answer: `started`, or an `error`."""
    await client.send("start", prompt="go", mode=mode, upload_bytes=len(data), realtime=False, **start)
    await client.websocket.send(data)
    while True:
        message = await client.receive()
        if isinstance(message, dict) and message["type"] in ("started", "error"):
            return message


async def still_usable(client: StreamClient) -> None:
    """After a refusal, the same connection streams a t2v session."""
    await client.send("start", prompt="still here", realtime=False)
    while True:
        message = await client.receive()
        if isinstance(message, dict) and message["type"] == "chunk":
            break
    await client.send("stop")


def test_hostile_uploads_answer_bad_media_and_the_connection_stays(
    server: Background, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the server's working directory: a playlist would stream this file back
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    (tmp_path / "sub" / "dir" / "red.mp4").write_bytes(clips.clip(5))
    hostile = {
        "ffconcat playlist": clips.ffconcat("sub/dir/red.mp4"),
        "ffconcat of a missing file": clips.ffconcat("/etc/no-such-file.mp4"),
        "HLS playlist": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsub/dir/red.mp4\n#EXT-X-ENDLIST\n",
        "16000x16000 PNG bomb": clips.png_bomb(),
        "JPEG declaring 30000x30000": clips.jpeg_declaring(30000, 30000),
        "garbage": b"\x00\x01garbage" * 100,
    }

    async def session() -> dict[str, dict[str, Any]]:
        answers = {}
        async with await StreamClient.connect(server.websocket_url) as client:
            assert client.ready["limits"]["max_pixels"] == MAX_PIXELS
            for name, data in hostile.items():
                answers[name] = await upload(client, data, mode="i2v" if "PNG" in name or "JPEG" in name else "v2v")
            await still_usable(client)
        return answers

    answers = run(session())
    for name, answer in answers.items():
        assert answer["type"] == "error" and answer["code"] == "bad_media", name
        assert "sub/dir" not in answer["message"] and "No such file" not in answer["message"], name  # no paths
    for bomb in ("16000x16000 PNG bomb", "JPEG declaring 30000x30000"):
        assert f"over the limit of {MAX_PIXELS} pixels" in answers[bomb]["message"]


def test_bad_metadata_is_read_not_a_dropped_connection(server: Background) -> None:
    async def session() -> list[dict[str, Any]]:
        async with await StreamClient.connect(server.websocket_url) as client:
            answers = []
            for container in ("matroska", "mp4"):
                answers.append(await upload(client, clips.bad_metadata(container)))
                await client.send("stop")
            await still_usable(client)
            return answers

    assert [answer["type"] for answer in run(session())] == ["started", "started"]


def test_any_failure_of_an_upload_is_bad_media(server: Background, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("decoder crashed reading /secret/path")

    monkeypatch.setattr("streamgen.media.read_clip", broken)

    async def session() -> dict[str, Any]:
        async with await StreamClient.connect(server.websocket_url) as client:
            answer = await upload(client, clips.clip(5))
            await still_usable(client)
            return answer

    answer = run(session())
    assert answer["code"] == "bad_media" and "secret" not in answer["message"]


def test_a_clip_is_resampled_and_its_end_kept(server: Background, tmp_path: Path) -> None:
    """A 4 s clip at 60 fps: the last 33 frames at the stream's 16 fps (2.06 s), the clip's own frames shown."""

    async def session():
        async with await StreamClient.connect(server.websocket_url) as client:
            data = clips.clip(240, 60)
            return await record(client, tmp_path / "v2v.mp4", prompt="go", chunks=1, mode="v2v", upload=data,
                                context="original")  # fmt: skip

    recording = run(session())
    started = next(event for event in recording.events if event["type"] == "started")
    assert started["context"] == "original" and started["context_frames"] == 33
    assert started["context_seconds"] == 2.062 and started["upload_seconds"] == 4.0
    frames = read_clip(recording.path, height=64, width=64).frames
    indices = [clips.frame_index(frame) for frame in frames[:33]]
    assert indices[-1] == 239 and abs(indices[0] - (239 - 32 * 60 / 16)) <= 2  # 2 s back, at real speed


def test_a_variable_rate_clip_keeps_its_timing(server: Background, tmp_path: Path) -> None:
    """Frames 20 ms then 100 ms apart: each 1/16 s of the stream shows the frame that was on screen then."""
    times = np.cumsum([0.0] + [0.02, 0.1] * 20)[:40]

    async def session():
        async with await StreamClient.connect(server.websocket_url) as client:
            data = clips.clip(40, 30, times=times)
            return await record(client, tmp_path / "vfr.mp4", prompt="go", chunks=1, mode="v2v", upload=data,
                                context="original")  # fmt: skip

    recording = run(session())
    kept = next(event for event in recording.events if event["type"] == "started")["context_frames"]
    slots = range(round(times[-1] * 16) + 1)
    expected = [max(i for i, t in enumerate(times) if round(t * 16) <= slot) for slot in slots][-kept:]
    frames = read_clip(recording.path, height=64, width=64).frames[:kept]
    assert [clips.frame_index(frame) for frame in frames] == expected


def test_damaged_and_truncated_uploads_are_used_with_a_warning(server: Background) -> None:
    whole = clips.clip(48, 16, gop=8)

    async def session() -> list[dict[str, Any]]:
        async with await StreamClient.connect(server.websocket_url) as client:
            answers = []
            for data in (clips.damaged(whole), whole[: len(whole) * 2 // 3]):
                answers.append(await upload(client, data))
                await client.send("stop")
            return answers

    damaged, truncated = run(session())
    assert damaged["type"] == truncated["type"] == "started"
    assert "damaged packet" in damaged["warning"] and "truncated" in truncated["warning"]


def test_empty_and_oversized_files(
    pipe: StreamingPipeline, server: Background, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def empty() -> dict[str, Any]:
        async with await StreamClient.connect(server.websocket_url) as client:
            await client.send("start", prompt="go", mode="v2v", upload_bytes=0)
            return await client.receive()

    answer = run(empty())
    assert answer["code"] == "out_of_range" and "the file is empty" in answer["message"]

    (tmp_path / "empty.mp4").write_bytes(b"")
    big = tmp_path / "big.mp4"
    big.write_bytes(clips.clip(48, 16))
    out = str(tmp_path / "out.mp4")
    args = ["--url", server.websocket_url, "--prompt", "x", "-o", out]
    assert cli.main([*args, "--video", str(tmp_path / "empty.mp4")]) == 1
    assert capsys.readouterr().err == "streamgen-client: error: the file is empty\n"
    with serve_in_thread(pipe, limits=Limits(max_upload_bytes=1000)) as small:
        assert cli.main(["--url", small.websocket_url, "--prompt", "x", "--video", str(big), "-o", out]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "this server takes uploads of at most 1000 bytes" in err


def test_client_shows_what_was_used(server: Background, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = tmp_path / "in.mp4"
    video.write_bytes(clips.damaged(clips.clip(80, 16, gop=8)))
    out = str(tmp_path / "out.mp4")
    args = ["--url", server.websocket_url, "--prompt", "x", "--chunks", "1", "-o", out]
    assert cli.main([*args, "--video", str(video)]) == 0
    captured = capsys.readouterr()
    assert "extending the last 2.06 s of 5.00 s, shown as the model's reconstruction" in captured.out
    assert "warning: the upload is damaged" in captured.err
    with pytest.raises(StreamError, match="bad_message"):
        run(_start_with(server, {"context": "both"}))


async def _start_with(server: Background, fields: dict[str, Any]) -> None:
    async with await StreamClient.connect(server.websocket_url) as client:
        await client.websocket.send(json.dumps({"type": "start", "prompt": "x", **fields}))
        message = await client.receive()
        if message["type"] == "error":
            raise StreamError(message)
