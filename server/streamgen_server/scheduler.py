"""Sessions sharing one pipeline: slots, a FIFO queue, and chunk-by-chunk round-robin on one worker thread.

The model is one set of weights on one device, so the chunks of all sessions run one at a time, in turns, on a
single worker thread; the event loop stays free to answer pings, parse messages and send media meanwhile.
A stream takes its turn only when it can use it: not paused, room in its bounded buffer of encoded chunks (a slow
reader stalls its own generation, never the server's memory) and, for a live viewer, not too far ahead of what
the viewer is playing. Independent of any socket library: a connection reads `Stream.messages()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from streamgen.media import FragmentedMp4Encoder, MediaError, Segment
from streamgen.pipeline import ChunkTiming, Session, StreamingPipeline

from .protocol import MAX_SEED, ErrorCode, Limits, ProtocolError, Start, error, event

log = logging.getLogger(__name__)

# A paced (realtime) stream may run this far ahead of its viewer's playback: enough buffer for smooth playback,
# little enough that a prompt or step change shows within about a second of the chunk it applies to.
PACE_LEAD_SECONDS = 1.0


@dataclass
class MediaChunk:
    """Frames of one stream, encoded and ready to send, with where their time went."""

    index: int | None  # generated chunk number; None for the reconstruction of an uploaded image or clip
    first_frame: int  # position in the stream's timeline
    frames: int
    segments: list[Segment]  # the init segment first in a stream's first media, then fragments
    steps: int | None
    prompt: str
    timing: ChunkTiming
    encode: float  # seconds


class Stream:
    """One session as the scheduler sees it: its request, library session, encoder and outgoing messages.

    Owned by one connection, which reads `messages()`. While a job of this stream runs on the worker thread,
    `session`, `encoder`, `chunks` and `frames` belong to that thread: the loop only reads counts meanwhile.
    """

    def __init__(self, request: Start, context: np.ndarray | None, buffer: int, wake: Callable[[], None]) -> None:
        self.request = request
        self.context = context  # decoded upload (i2v/v2v), handed to the session when it opens
        self.steps = request.steps  # None: the model's default
        self.pending_prompt: str | None = None  # applied before the next chunk
        self.paused = False
        self.closed = False
        self.position: int | None = None  # place in the waiting queue, as last told to the client
        self.session: Session | None = None
        self.encoder: FragmentedMp4Encoder | None = None
        self.chunks = 0  # generated chunks
        self.frames = 0  # frames encoded: the timeline's end
        self._due = -math.inf  # paced streams: when the next chunk may start
        self._buffer = buffer
        self._wake = wake
        self._events: deque[dict[str, Any]] = deque()  # a handful by construction: started, error, stopped
        self._media: deque[MediaChunk] = deque()  # at most `buffer`
        self._changed = asyncio.Event()

    # -- loop side -----------------------------------------------------------------------------------------
    def push(self, message: dict[str, Any]) -> None:
        self._events.append(message)
        self._changed.set()

    def tell_position(self, position: int) -> None:
        """Queue positions are coalesced: a client that reads slowly gets the latest one, not a backlog."""
        self.position = position
        self._changed.set()

    def put(self, chunk: MediaChunk, now: float) -> None:
        self._media.append(chunk)
        self._changed.set()
        # Pace to playback, but never bank time: after a pause or a slow chunk, the lead starts over.
        self._due = max(self._due, now - PACE_LEAD_SECONDS) + chunk.frames / self.session.fps

    def delay(self, now: float) -> float:
        """Seconds until this stream can use the worker; `inf` until something changes (resume, buffer room)."""
        if self.session is None:
            return 0.0
        if self.paused or len(self._media) >= self._buffer:
            return math.inf
        return max(0.0, self._due - now) if self.request.realtime else 0.0

    async def messages(self) -> AsyncIterator[dict[str, Any] | MediaChunk]:
        """What the client receives, in order: events, the queue position, media. Ends with `stopped`.

        A media chunk leaves the buffer only once the consumer comes back for the next message, i.e. after it
        was sent, so the buffer bounds chunks generated but not yet delivered."""
        announced: int | None = None
        while True:
            if self._events:
                message = self._events.popleft()
                yield message
                if message["type"] == "stopped":
                    return
            elif self.position is not None and self.position != announced:
                announced = self.position
                yield event("queued", position=announced)
            elif self._media:
                yield self._media[0]
                self._media.popleft()
                self._wake()
            else:
                self._changed.clear()
                await self._changed.wait()

    # -- worker side ---------------------------------------------------------------------------------------
    def open(self, pipe: StreamingPipeline) -> MediaChunk | None:
        """Start the library session and the encoder; an uploaded image or clip, reconstructed, is the first media."""
        request, context, self.context = self.request, self.context, None
        source = {"i2v": "image", "v2v": "video"}.get(request.mode)
        seed = random.randint(0, MAX_SEED) if request.seed is None else request.seed  # one every client can replay
        self.session = pipe.start_session(
            request.prompt, seed=seed, steps=request.steps, **({source: context} if source else {})
        )
        config = self.session.config
        self.encoder = FragmentedMp4Encoder(config.width, config.height, fps=config.fps)
        if self.session.context_frames is None:
            return None
        return self._encode(None, self.session.context_frames, ChunkTiming(), steps=None)

    def generate(self, prompt: str | None, steps: int | None) -> MediaChunk:
        """The next chunk, under a new prompt if one came since the last."""
        if prompt is not None:
            self.session.set_prompt(prompt)
        frames = self.session.next_chunk(steps)
        self.chunks += 1
        return self._encode(self.chunks - 1, frames, self.session.timing, steps or self.session.config.steps)

    def _encode(self, index: int | None, frames: np.ndarray, timing: ChunkTiming, steps: int | None) -> MediaChunk:
        start = time.perf_counter()
        segments = self.encoder.encode(frames)
        encode = time.perf_counter() - start
        chunk = MediaChunk(index, self.frames, len(frames), segments, steps, self.session.prompt, timing, encode)
        self.frames += len(frames)
        return chunk

    def release(self) -> None:
        """Free the model state (KV and decoder caches) and the encoder now, not whenever the GC runs."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.encoder is not None:
            self.encoder.flush()
            self.encoder = None
        self.context = None

    @property
    def nbytes(self) -> int:
        return self.session.nbytes if self.session is not None else 0


class Scheduler:
    """At most `max_active` streams hold a slot; the rest wait in a FIFO queue and are told their position.

    Slots take turns on the worker, one job (open, or one chunk) each, least recently served first.
    """

    def __init__(self, pipe: StreamingPipeline, *, max_active: int, limits: Limits) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be at least 1, got {max_active}")
        self.pipe, self.max_active, self.limits = pipe, max_active, limits
        self._active: list[Stream] = []  # in turn order: the next served is the first ready
        self._queue: deque[Stream] = deque()
        self._busy: Stream | None = None  # the stream whose job runs on the worker
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamgen-worker")

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def nbytes(self) -> int:
        """Model memory held by sessions: live ones, and one whose client left during its running chunk."""
        return sum(stream.nbytes for stream in {*self._active, self._busy} - {None})

    def open(self, request: Start, context: np.ndarray | None) -> Stream:
        """A new stream: given a slot now, or queued, or refused when the queue is full too."""
        if len(self._active) >= self.max_active and len(self._queue) >= self.limits.max_queued:
            raise ProtocolError(ErrorCode.SERVER_FULL, "every session slot is busy and the waiting queue is full")
        stream = Stream(request, context, self.limits.chunk_buffer, self._wake.set)
        self._queue.append(stream)
        self._fill()
        return stream

    def close(self, stream: Stream, reason: str) -> None:
        """End a stream: `stopped` to its client, its slot to the next in the queue, its memory freed at once
        (or right after its running chunk)."""
        if stream.closed:
            return
        stream.closed = True
        stream.push(event("stopped", reason=reason, chunks=stream.chunks, frames=stream.frames))
        if stream in self._queue:
            self._queue.remove(stream)
        else:
            self._active.remove(stream)
        if stream is not self._busy:
            stream.release()
        self._fill()

    def pause(self, stream: Stream, paused: bool) -> None:
        stream.paused = paused
        self._wake.set()

    def _fill(self) -> None:
        while self._queue and len(self._active) < self.max_active:
            stream = self._queue.popleft()
            stream.position = None
            self._active.append(stream)
            self._wake.set()
        for position, stream in enumerate(self._queue, 1):
            if stream.position != position:
                stream.tell_position(position)

    async def run(self) -> None:
        """Forever: the next ready stream's job on the worker thread."""
        loop = asyncio.get_running_loop()
        while True:
            stream = await self._next()
            opening = stream.session is None
            if opening:
                job = partial(stream.open, self.pipe)
            else:
                prompt, stream.pending_prompt = stream.pending_prompt, None
                job = partial(stream.generate, prompt, stream.steps)
            self._busy = stream
            try:
                chunk = await loop.run_in_executor(self._worker, job)
            except Exception as e:  # noqa: BLE001 - any failure ends this stream, never the server
                self._busy = None
                self._fail(stream, e)
                continue
            self._busy = None
            if stream.closed:  # its client left while the chunk ran
                stream.release()
                continue
            if opening:
                stream.push(self._started(stream))
            if chunk is not None:
                stream.put(chunk, time.monotonic())

    async def _next(self) -> Stream:
        """The least recently served stream that can use the worker now; sleeps until one can."""
        while True:
            self._wake.clear()
            now = time.monotonic()
            delays = [(stream.delay(now), stream) for stream in self._active]
            ready = next((stream for delay, stream in delays if delay <= 0), None)
            if ready is not None:
                self._active.remove(ready)
                self._active.append(ready)
                return ready
            timeout = min((delay for delay, _ in delays), default=math.inf)
            try:
                await asyncio.wait_for(self._wake.wait(), None if math.isinf(timeout) else timeout)
            except TimeoutError:
                pass

    def _started(self, stream: Stream) -> dict[str, Any]:
        config = stream.session.config
        return event(
            "started",
            mode=stream.request.mode,
            codec=stream.encoder.codec,
            width=config.width,
            height=config.height,
            fps=config.fps,
            seed=stream.session.seed,
            steps=config.steps,
            context_frames=stream.frames,
        )

    def _fail(self, stream: Stream, e: Exception) -> None:
        if isinstance(e, MediaError):
            stream.push(error(ErrorCode.BAD_MEDIA, str(e)))
        else:
            log.exception("stream failed", exc_info=e)
            stream.push(error(ErrorCode.INTERNAL, f"generation failed: {type(e).__name__}"))
        self.close(stream, "error")

    async def shutdown(self) -> None:
        """Stop every stream (`stopped`, reason "shutdown"), let a running chunk finish, free everything.

        Call after the `run` task is cancelled, so no new job starts."""
        for stream in [*self._queue, *self._active]:
            self.close(stream, "shutdown")
        await asyncio.to_thread(self._worker.shutdown)
        if self._busy is not None:
            self._busy.release()
            self._busy = None
