"""One client's side of the protocol over any message transport.

A transport adapter (websockets today, an ASGI websocket tomorrow) creates a `Connection` with an async `send`
for text and binary messages, calls `open()`, then `receive()` for every message, and `close()` when the socket
is gone. The connection validates and rate-limits what the client sends, owns at most one stream (no message
can name another connection's), and writes that stream's events and media back in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from streamgen import media
from streamgen.config import MAX_STEPS
from streamgen.pipeline import STAGES, Extension

from . import protocol
from .audience import Audience, Broadcast, media_messages
from .metrics import Metrics
from .protocol import (
    MODES,
    PROTOCOL_VERSION,
    ErrorCode,
    Pause,
    ProtocolError,
    Resume,
    SetPrompt,
    SetSteps,
    Start,
    Stop,
    event,
)
from .scheduler import MediaChunk, Scheduler, ServedStream

Send = Callable[[str | bytes], Awaitable[None]]
log = logging.getLogger(__name__)
# Uploads are decoded on these threads, never on the generation worker, and at most this many at once: each may
# hold a decoder's frames of up to `max_pixels`. They run at a lower CPU priority, so that on a busy machine a
# large upload waits for the streams being generated rather than stalling them.
UPLOAD_DECODES = 2
UPLOAD_NICENESS = 10


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # Linux gives each thread its own niceness
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)


_upload_decoders = ThreadPoolExecutor(UPLOAD_DECODES, "streamgen-upload", initializer=_lower_priority)


class TokenBucket:
    """`rate` messages per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.updated = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ClientSessions:
    """Live sessions per client address, shared by one server's connections: an address holds at most `limit`
    (with a slot or queued), so one client cannot take every slot and queue place by opening many connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._live: Counter[str] = Counter()

    def claim(self, client: str) -> None:
        if self._live[client] >= self.limit:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SESSIONS, f"this address has {self.limit} sessions already; stop one first"
            )
        self._live[client] += 1

    def release(self, client: str) -> None:
        self._live[client] -= 1
        if not self._live[client]:
            del self._live[client]


class Connection:
    def __init__(
        self,
        scheduler: Scheduler,
        send: Send,
        metrics: Metrics,
        *,
        client: str,
        sessions: ClientSessions,
        audience: Audience | None = None,
        replica: str | None = None,
    ) -> None:
        """`client`: the peer's address, whose live sessions `sessions` counts; `audience`: where the streams
        are watched (None: no watch links); `replica`: this server's name among several, told in `started`."""
        self.scheduler, self.metrics, self.limits = scheduler, metrics, scheduler.limits
        self.client, self.sessions, self.replica = client, sessions, replica
        self.audience = audience
        self._broadcast: Broadcast | None = None  # the live stream's audience
        self._send = send
        self._bucket = TokenBucket(self.limits.messages_per_second, self.limits.message_burst)
        self._upload: Start | None = None  # a start waiting for its binary upload
        self._stream: ServedStream | None = None
        self._sender: asyncio.Task[None] | None = None  # writes the stream's messages
        self._pause_timer: asyncio.TimerHandle | None = None  # stops the stream once paused too long
        self._writing = asyncio.Lock()  # a `segment` header and its bytes go out back to back
        self._sent: list[tuple[int, float]] = []  # the pieces of the chunk being sent: (bytes, seconds to send)

    async def open(self) -> None:
        """Greet the client with what it needs before a `start`: protocol version, stream format, limits, and what
        helps a person prompt this model (its example prompts; the words it knows, when its vocabulary is closed)."""
        pipe = self.scheduler.pipe
        config = pipe.config
        await self._emit(
            event(
                "ready",
                protocol=PROTOCOL_VERSION,
                width=config.width,
                height=config.height,
                fps=config.fps,
                steps=config.steps,
                max_steps=MAX_STEPS,
                modes=list(MODES),
                limits=self.limits.announce(),
                example_prompts=pipe.example_prompts,
                vocabulary=pipe.known_words(),
            )
        )

    async def receive(self, message: str | bytes) -> None:
        """Handle one client message; whatever is wrong with it is answered with an `error`, never a disconnect."""
        try:
            if not self._bucket.take():
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED, f"over {self.limits.messages_per_second:g} messages per second; dropped"
                )
            if isinstance(message, str):
                await self._command(protocol.parse(message, self.limits))
            else:
                await self._uploaded(message)
        except ProtocolError as e:
            await self._emit(protocol.error(e.code, e.message))

    async def close(self) -> None:
        """The client is gone: free its session at once (or right after its running chunk), stop writing."""
        self._upload = None
        if self._stream is not None:
            self.scheduler.close(self._stream, "disconnected")
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        self._stream = self._sender = None

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until the stream's last messages, `stopped` included, are written: graceful shutdown."""
        if self._sender is not None:
            await asyncio.wait([self._sender], timeout=timeout)

    # -- commands ------------------------------------------------------------------------------------------
    async def _command(self, command: protocol.Command) -> None:
        match command:
            case Start():
                if self._upload is not None or self._live() is not None:
                    raise ProtocolError(
                        ErrorCode.SESSION_EXISTS, "this connection has a session already; stop it first"
                    )
                if command.upload_bytes:
                    self._upload = command
                else:
                    await self._begin(command, None)
            case Stop() if self._upload is not None:
                self._upload = None
                await self._emit(event("stopped", reason="client", chunks=0, frames=0))
            case Stop():
                self.scheduler.close(self._require(), "client")
            case SetPrompt(prompt=prompt, transition=transition):
                self._require().set_prompt(prompt, transition)
            case SetSteps(steps=steps, target_fps=target_fps):
                self._require().set_budget(steps, target_fps)
            case Pause() | Resume():
                paused = isinstance(command, Pause)
                stream = self._require()
                self.scheduler.pause(stream, paused)
                self._pause_clock(stream if paused else None)
                await self._emit(event("paused" if paused else "resumed"))

    def _pause_clock(self, stream: ServedStream | None) -> None:
        """Start the clock of a paused `stream`, or stop it (None: resumed or ended). A session paused past
        `max_pause_seconds` is stopped (reason "idle"): a paused viewer must not hold a slot that others wait for.
        Pausing again does not restart the clock."""
        if stream is None and self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        elif stream is not None and self._pause_timer is None:
            self._pause_timer = asyncio.get_running_loop().call_later(
                self.limits.max_pause_seconds, self.scheduler.close, stream, "idle"
            )

    async def _uploaded(self, data: bytes) -> None:
        """The binary message after an i2v/v2v `start`: decoded here (off the loop), kept to the frames used."""
        start, self._upload = self._upload, None
        if start is None:
            raise ProtocolError(
                ErrorCode.UNEXPECTED_BINARY, "binary data is accepted only right after an i2v/v2v start"
            )
        if len(data) != start.upload_bytes:
            raise ProtocolError(
                ErrorCode.BAD_UPLOAD, f"announced {start.upload_bytes} bytes, received {len(data)}; start again"
            )
        try:
            context = await asyncio.get_running_loop().run_in_executor(_upload_decoders, self._prepare, start, data)
        except media.MediaError as e:  # worded by streamgen, never quoting FFmpeg (whose texts name local paths)
            raise ProtocolError(ErrorCode.BAD_MEDIA, str(e)) from None
        except Exception as e:  # noqa: BLE001 - whatever else a decoder raises, the connection stays usable
            log.warning("upload unreadable: %s", type(e).__name__)
            raise ProtocolError(ErrorCode.BAD_MEDIA, "the upload could not be read as an image or video") from None
        await self._begin(start, context)

    def _prepare(self, start: Start, data: bytes) -> Extension:
        """On an upload thread: decode the upload's frames that are used, then VAE-encode and reconstruct them, so
        the session's open on the generation worker only caches them."""
        pipe = self.scheduler.pipe
        config = pipe.config
        clip = media.read_clip(
            data, height=config.height, width=config.width, fps=config.fps, max_frames=self.limits.max_context_frames,
            first=start.mode == "i2v", max_pixels=self.limits.max_pixels,
        )  # fmt: skip
        return pipe.prepare(**{"image" if start.mode == "i2v" else "video": clip}, max_context_frames=len(clip.frames))

    async def _begin(self, start: Start, context) -> None:
        if self._sender is not None:  # the previous stream's last messages go out before the new stream's
            await self._sender
        self.sessions.claim(self.client)
        try:
            self._stream = self.scheduler.open(start, context)
        except ProtocolError:
            self.sessions.release(self.client)
            raise
        self._sender = asyncio.create_task(self._forward(self._stream))
        self._sender.add_done_callback(self._ended)  # also when cancelled before it ran

    def _ended(self, _: asyncio.Task[None]) -> None:
        """The stream's last message is out, or its client is gone: it no longer counts against its client."""
        self.sessions.release(self.client)
        self._pause_clock(None)

    def _live(self) -> ServedStream | None:
        return self._stream if self._stream is not None and not self._stream.closed else None

    def _require(self) -> ServedStream:
        stream = self._live()
        if stream is None:
            raise ProtocolError(ErrorCode.NO_SESSION, "no session on this connection; send start first")
        return stream

    # -- output --------------------------------------------------------------------------------------------
    async def _emit(self, message: dict[str, Any]) -> None:
        if message["type"] == "error":
            self.metrics.error(message["code"])
        await self._write(protocol.encode(message))

    async def _write(self, *messages: str | bytes) -> None:
        async with self._writing:
            for message in messages:
                await self._send(message)

    async def _forward(self, stream: ServedStream) -> None:
        self._sent = []
        try:
            async for message in stream.messages():
                if isinstance(message, MediaChunk):
                    await self._send_media(message)
                else:
                    if message["type"] == "started" and self.replica is not None:
                        message["replica"] = self.replica
                    await self._emit(self._broadcast_life(stream, message))
        finally:
            self.scheduler.close(stream, "error")  # a no-op after `stopped`; frees the slot if sending failed
            if self._broadcast is not None:  # the client left: its viewers are told
                self._broadcast_life(stream, event("stopped", reason="disconnected", chunks=stream.chunks,
                                                   frames=stream.frames))  # fmt: skip

    def _broadcast_life(self, stream: ServedStream, message: dict[str, Any]) -> dict[str, Any]:
        """The audience follows the stream: `started` opens it (and carries the watch link), `stopped` ends it."""
        if self.audience is not None and message["type"] == "started":
            self._broadcast = self.audience.open(message, lambda count: stream.push(event("viewers", count=count)))
            message["watch_url"] = self._broadcast.url
        elif self._broadcast is not None and message["type"] == "stopped":
            self._broadcast.end(message)
            self._broadcast = None
        return message

    async def _send_media(self, piece: MediaChunk) -> None:
        """Each binary message is announced by a `segment` message; a generated chunk's last piece is followed by the
        chunk's stats."""
        start = time.perf_counter()
        messages = media_messages(piece)
        if self._broadcast is not None:
            self._broadcast.publish(piece, messages)  # the same messages: encoded once, for everyone
        await self._write(*messages)
        self._sent.append((sum(map(len, piece.segments)), time.perf_counter() - start))
        if not piece.last:
            return
        (nbytes, send), self._sent = map(sum, zip(*self._sent)), []
        frames = piece.offset + piece.frames  # the whole chunk's
        stages = {stage: getattr(piece.timing, stage) for stage in STAGES} | {"send": send}
        self.metrics.chunk_sent(frames, nbytes, stages)
        if piece.index is not None:
            latency = {stage: round(1000 * seconds, 2) for stage, seconds in stages.items()}
            latency["total"] = round(sum(latency.values()), 2)
            stats = event(
                "chunk",
                chunk=piece.index,
                frames=frames,
                steps=piece.steps,
                batch=piece.batch,
                prompt=piece.prompt,
                latency_ms=latency,
                **({"transition": piece.transition} if piece.transition else {}),
            )
            if self._broadcast is not None:
                self._broadcast.tell(stats)
            await self._emit(stats)
