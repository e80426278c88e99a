"""Python client for a streamgen server: drive one session and record what it streams (docs/protocol.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

import av
from websockets.asyncio.client import ClientConnection, connect

WEBSOCKET_PATH = "/ws"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a media message: one chunk's fragments


class StreamError(RuntimeError):
    """The server answered with an `error` message."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(f"{message.get('code')}: {message.get('message')}")
        self.code = message.get("code")


def endpoint(url: str, token: str | None = None) -> str:
    """The websocket URL for a server address: `ws://host:port` gets the `/ws` path, a token its query."""
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else WEBSOCKET_PATH
    query = "&".join(filter(None, [parts.query, urlencode({"token": token}) if token else ""]))
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


class StreamClient:
    """One connection: `ready` holds the server's greeting (format, limits); commands are plain methods."""

    def __init__(self, websocket: ClientConnection, ready: dict[str, Any]) -> None:
        self.websocket, self.ready = websocket, ready

    @classmethod
    async def connect(cls, url: str, token: str | None = None) -> StreamClient:
        websocket = await connect(endpoint(url, token), max_size=MAX_MESSAGE_BYTES, compression=None)
        ready = json.loads(await websocket.recv())
        if ready.get("type") != "ready":
            await websocket.close()
            raise StreamError(ready)
        return cls(websocket, ready)

    async def send(self, kind: str, **fields: Any) -> None:
        await self.send_message({"type": kind, **fields})

    async def send_message(self, message: dict[str, Any]) -> None:
        await self.websocket.send(json.dumps(message))

    async def start(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        steps: int | None = None,
        mode: str = "t2v",
        upload: bytes | None = None,
        realtime: bool = False,
        context: str | None = None,
    ) -> None:
        """Open the session; i2v/v2v send the image or clip right after the `start` that announces its size.

        `context` ("reconstruction" or "original"): what the stream shows of the upload before its generated chunks.
        An empty upload, or one over the server's announced `max_upload_bytes`, is refused here, before sending."""
        if upload is not None:
            limit = self.ready.get("limits", {}).get("max_upload_bytes")
            if not upload:
                raise ValueError("the file is empty")
            if limit is not None and len(upload) > limit:
                raise ValueError(f"the file is {len(upload)} bytes; this server takes uploads of at most {limit} bytes")
        size = len(upload) if upload is not None else None
        optional = {"seed": seed, "steps": steps, "context": context, "upload_bytes": size}
        fields = {name: value for name, value in optional.items() if value is not None}
        await self.send("start", mode=mode, prompt=prompt, realtime=realtime, **fields)
        if upload is not None:
            await self.websocket.send(upload)

    async def receive(self) -> dict[str, Any] | tuple[dict[str, Any], bytes]:
        """The next event, or a media message as (its `segment` header, its bytes)."""
        message = json.loads(await self.websocket.recv())
        if message["type"] != "segment":
            return message
        data = await self.websocket.recv()
        if not isinstance(data, bytes) or len(data) != message["bytes"]:
            raise StreamError({"code": "protocol", "message": "segment header not followed by its bytes"})
        return message, data

    async def close(self) -> None:
        await self.websocket.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class Recording:
    """What a recorded session received."""

    path: Path
    frames: int  # frames written to `path`
    chunks: list[dict[str, Any]] = field(default_factory=list)  # `chunk` stats, in order
    segments: list[dict[str, Any]] = field(default_factory=list)  # `segment` headers of what was written
    events: list[dict[str, Any]] = field(default_factory=list)  # everything else: queued, started, stopped...


async def record(
    client: StreamClient,
    output: str | os.PathLike[str],
    *,
    prompt: str,
    chunks: int,
    changes: dict[int, list[dict[str, Any]]] | None = None,
    on_message: Callable[[dict[str, Any]], None] = lambda message: None,
    **start: Any,
) -> Recording:
    """Start a session (`start`: `StreamClient.start`'s options), write an uploaded image's or clip's
    reconstruction and the first `chunks` generated chunks to `output`, stop.

    `changes` maps a chunk number to messages sent once that chunk's stats arrive, e.g.
    `{3: [{"type": "prompt", "prompt": "..."}]}`. The stream is received as fragmented MP4 and remuxed (no
    re-encode) to a regular MP4, indexed up front. `on_message` sees every event (not media) as it arrives.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    output = Path(output)
    partial = output.with_name(output.name + ".part")
    recording = Recording(output, 0)
    await client.start(prompt, **start)
    try:
        with open(partial, "wb") as file:
            while True:
                message = await client.receive()
                if isinstance(message, tuple):
                    header, data = message
                    if header["kind"] != "chunk" or header["chunk"] < chunks:  # ignore what came after our stop
                        file.write(data)
                        recording.segments.append(header)
                    continue
                on_message(message)
                if message["type"] == "error":
                    raise StreamError(message)
                if message["type"] == "chunk":
                    recording.chunks.append(message)
                    for change in (changes or {}).get(message["chunk"], []):
                        await client.send_message(change)
                    if message["chunk"] == chunks - 1:
                        await client.send("stop")
                else:
                    recording.events.append(message)
                    if message["type"] == "stopped":
                        break
        recording.frames = remux(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return recording


def remux(source: Path, output: Path) -> int:
    """Fragmented MP4 as streamed -> a regular MP4 with its index up front; packets copied, not re-encoded.

    Returns the number of frames."""
    frames = 0
    with (
        av.open(os.path.abspath(source)) as inp,
        av.open(os.path.abspath(output), "w", format="mp4", options={"movflags": "+faststart"}) as out,
    ):
        video = inp.streams.video[0]
        stream = out.add_stream_from_template(video)
        for packet in inp.demux(video):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = stream
            out.mux(packet)
            frames += 1
    return frames
