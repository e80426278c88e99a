"""Sessions sharing one pipeline: admission by memory, a FIFO queue, and batched turns of the chunk runner.

The model is one set of weights on one device. Every chunk runs through one `streamgen.runtime.Runner` on a
worker thread, so the event loop stays free to answer pings, parse messages and send media meanwhile. Each turn
takes every stream that can use one and denoises their chunks in one batched call per step; with `overlap`, the
turn's decoding and encoding run on a second thread while the next turn denoises. A live viewer's chunk is decoded
and encoded a latent frame at a time, and each piece goes to its connection as soon as it is encoded.

A stream can use a turn when it is not paused, has room in its bounded buffer of encoded chunks (a slow reader
stalls its own generation, never the server's memory) and, for a live viewer, is not too far ahead of what the
viewer is playing. Streams are admitted while their memory (known before they open) fits the runner's budget and
a slot is free; the rest wait in a FIFO queue and are told their position. Independent of any socket library: a
connection reads `ServedStream.messages()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from streamgen.media import Clip, MediaError
from streamgen.pipeline import StreamingPipeline
from streamgen.runtime import Denoised, MediaChunk, Runner, Stream

from .protocol import MAX_SEED, ErrorCode, Limits, ProtocolError, Start, error, event

log = logging.getLogger(__name__)

# A paced (realtime) stream runs ahead of its viewer's playback by its lead: the time its chunks have lately taken
# from being due to being playable, every piece encoded by the time its frames play (generation, waiting for a turn,
# and their jitter), plus a frame. Enough buffer for smooth playback and no more, since a prompt or step change shows
# only after what is buffered: small on a steady machine, larger on a loaded one; at most PACE_LEAD_SECONDS, which is
# also the lead until the first chunk after the stream's 1-frame opening one is measured.
PACE_LEAD_SECONDS = 1.0
LEAD_WINDOW = 16  # the latest chunks whose production times set the lead

__all__ = ["PACE_LEAD_SECONDS", "MediaChunk", "Scheduler", "ServedStream"]


class ServedStream(Stream):
    """A runner stream with a client: its request, pacing and outgoing messages.

    Owned by one connection, which reads `messages()`. While a job of this stream runs on a worker thread,
    `session`, `encoder`, `chunks` and `frames` belong to that thread: the loop only reads counts meanwhile.
    """

    def __init__(self, request: Start, context: np.ndarray | None, buffer: int, wake: Callable[[], None]) -> None:
        source = {"i2v": "image", "v2v": "video"}.get(request.mode)
        extend = {source: context} if source else {}
        seed = random.randint(0, MAX_SEED) if request.seed is None else request.seed  # one every client can replay
        super().__init__(
            request.prompt, seed=seed, steps=request.steps, target_fps=request.target_fps,
            keep_input=request.context == "original", **extend,
        )  # fmt: skip
        self.request = request
        self.paused = False
        self.closed = False
        self.position: int | None = None  # place in the waiting queue, as last told to the client
        self.in_flight = 0  # chunks in the runner: denoising, or denoised and not yet wholly encoded
        self._due = -math.inf  # paced streams: when the next chunk may start
        self._free = -math.inf  # when it last became free to produce: its latest chunk put, or a resume
        self._playable = -math.inf  # the chunk being put: the soonest its first frame can play, every piece in time
        self._production: deque[float] = deque(maxlen=LEAD_WINDOW)  # seconds from due to playable, latest chunks
        self._chunk_seconds = 0.0  # playback time of the latest chunk put
        self._buffer = buffer
        self._wake = wake
        self._events: deque[dict[str, Any]] = deque()  # a handful by construction: started, error, stopped
        self._media: deque[MediaChunk] = deque()  # chunks and pieces of at most `buffer` chunks
        self._changed = asyncio.Event()

    @property
    def split(self) -> bool:
        """A live viewer's chunks come a latent frame at a time, its first frames sooner; a recorder's whole."""
        return self.request.realtime

    def push(self, message: dict[str, Any]) -> None:
        self._events.append(message)
        self._changed.set()

    def tell_position(self, position: int) -> None:
        """Queue positions are coalesced: a client that reads slowly gets the latest one, not a backlog."""
        self.position = position
        self._changed.set()

    @property
    def lead(self) -> float:
        """How far ahead of playback this stream is generated: see PACE_LEAD_SECONDS."""
        if not self._production:
            return PACE_LEAD_SECONDS
        return min(PACE_LEAD_SECONDS, max(self._production) + 1 / self.session.fps)

    def put(self, piece: MediaChunk, now: float) -> None:
        """A chunk, or a piece of one, for the client; a chunk's last piece moves the pacing on."""
        self._media.append(piece)
        self._changed.set()
        fps = self.session.fps
        self._playable = max(self._playable, now - piece.offset / fps)  # its frames play `offset` after the first's
        if not piece.last:
            return
        playable, self._playable = self._playable, -math.inf
        # Its production time sets the lead; not the first chunk's (it has no due time), nor a chunk's made again under
        # a change (it took a denoise more, once: its viewer may wait for it, later chunks need no more lead for it).
        if piece.index and not piece.remade:
            self._production.append(playable - max(self._due, self._free))
        self._free = now
        # Pace to playback, but never bank time: after a pause or a slow chunk, the lead starts over.
        self._chunk_seconds = (piece.offset + piece.frames) / fps
        self._due = max(self._due, playable - self.lead) + self._chunk_seconds

    def pause(self, paused: bool, now: float) -> None:
        self.paused = paused
        self._free = now

    def delay(self, now: float) -> float:
        """Seconds until this stream can use a turn; `inf` until something changes (resume, buffer room)."""
        if self.session is None:
            return 0.0
        if self.paused or sum(piece.last for piece in self._media) + self.in_flight >= self._buffer:
            return math.inf
        if not self.request.realtime:
            return 0.0
        # A chunk still being decoded and encoded (`overlap`) will move the due time on by its length when put.
        return max(0.0, self._due + self.in_flight * self._chunk_seconds - now)

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


def _context(clip: Clip | None, shown: str) -> dict[str, Any]:
    """What `started` says of an upload: which frames are shown for it (`context`), how many seconds of it were
    used (its end) and how long it was, so a client knows its clip was cut; and damage that was skipped."""
    if clip is None:
        return {}
    seconds = None if clip.source_seconds is None else round(clip.source_seconds, 3)
    return {"context": shown, "context_seconds": round(clip.seconds, 3), "upload_seconds": seconds} | (
        {"warning": f"the upload is damaged: {clip.damaged}"} if clip.damaged else {}
    )


class Scheduler:
    """Admits streams while their memory fits the runner's budget and fewer than `max_active` hold a slot; the
    rest wait in a FIFO queue. Admitted streams take batched turns on the runner."""

    def __init__(
        self,
        pipe: StreamingPipeline,
        *,
        max_active: int,
        limits: Limits,
        memory_budget: int | None = None,
        overlap: bool = False,
        max_batch: int | None = None,
    ) -> None:
        """`memory_budget`: bytes for sessions (default: `runtime.default_memory_budget`); `overlap`: decode and
        encode a turn's chunks on a second thread while the next turn denoises (it pays only where a core would
        otherwise wait: on a quiet 2-core CPU 1.30x frames/s with 4 sessions, on one that other work keeps busy
        nothing, `benchmarks/results/serving.md`; `streamgen serve` turns it on, embedded servers opt in);
        `max_batch`:
        most streams in a turn (1: one stream at a time, least recently served first, the scheduler before
        batching)."""
        if max_active < 1 or (max_batch is not None and max_batch < 1):
            raise ValueError(f"max_active and max_batch must be at least 1, got {max_active} and {max_batch}")
        self.pipe, self.max_active, self.max_batch, self.limits = pipe, max_active, max_batch, limits
        self.runner = Runner(pipe, memory_budget)
        self._active: list[ServedStream] = []  # admitted, holding a slot; least recently served first
        self._queue: deque[ServedStream] = deque()
        self._held: set[ServedStream] = set()  # holding a reservation: admitted, or closed while in the runner
        self._running: set[ServedStream] = set()  # in the job on the worker
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamgen-worker")
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamgen-encoder") if overlap else None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._turn_seconds = 0.0  # how long the latest turn held the worker
        self._delivery_seconds = 0.0  # how long the latest chunk took to decode and encode
        self._delivering_since = 0.0  # when the encoder began its latest chunk

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def nbytes(self) -> int:
        """Model memory held by sessions now: live ones, and ones whose client left during their running chunk."""
        return sum(stream.nbytes for stream in self._held)

    def open(self, request: Start, context: np.ndarray | None) -> ServedStream:
        """A new stream: given a slot now, or queued, or refused when it can never fit or the queue is full too."""
        need, budget = self.runner.stream_bytes(), self.runner.memory_budget
        if need > budget:
            raise ProtocolError(
                ErrorCode.SERVER_FULL, f"a session needs {need / 2**20:.0f} MiB, over the server's memory budget "
                f"of {budget / 2**20:.0f} MiB"
            )
        stream = ServedStream(request, context, self.limits.chunk_buffer, self._wake.set)
        self._queue.append(stream)
        self._fill()
        if len(self._queue) > self.limits.max_queued:
            self._queue.remove(stream)
            raise ProtocolError(ErrorCode.SERVER_FULL, "no session fits now and the waiting queue is full")
        return stream

    def close(self, stream: ServedStream, reason: str) -> None:
        """End a stream: `stopped` to its client, its memory freed at once (or right after its chunk in the
        runner), and its slot to the next in the queue."""
        if stream.closed:
            return
        stream.closed = True
        stream.push(event("stopped", reason=reason, chunks=stream.chunks, frames=stream.frames))
        if stream in self._queue:
            self._queue.remove(stream)
        else:
            self._active.remove(stream)
        self._settle(stream)

    def pause(self, stream: ServedStream, paused: bool) -> None:
        stream.pause(paused, time.monotonic())
        self._wake.set()

    def _room(self) -> bool:
        return len(self._active) < self.max_active

    def _fill(self) -> None:
        """Admit from the head of the queue while a slot is free and the head's memory fits."""
        while self._queue and self._room() and self.runner.admit(self._queue[0]):
            stream = self._queue.popleft()
            stream.position = None
            self._active.append(stream)
            self._held.add(stream)
            self._wake.set()
        for position, stream in enumerate(self._queue, 1):
            if stream.position != position:
                stream.tell_position(position)

    def _settle(self, stream: ServedStream) -> None:
        """A closed stream's memory goes back once nothing of it is left in the runner; then the queue moves."""
        if stream.closed and stream in self._held and stream not in self._running and not stream.in_flight:
            self._held.discard(stream)
            self.runner.release(stream)
        self._fill()

    async def run(self) -> None:
        """Forever: open the next admitted stream, or run a turn for every stream that can use one."""
        loop = asyncio.get_running_loop()
        while True:
            streams = await self._next()
            opening = streams[0].session is None
            job = partial(self.runner.open, streams[0]) if opening else partial(self.runner.denoise, streams)
            self._running.update(streams)
            began = time.monotonic()
            try:
                result = await loop.run_in_executor(self._worker, job)
            except Exception as e:  # noqa: BLE001 - any failure ends these streams, never the server
                self._running.difference_update(streams)
                for stream in streams:
                    self._fail(stream, e)
                continue
            self._running.difference_update(streams)
            if opening:
                self._opened(streams[0], result)
                continue
            for stream in streams:
                stream.in_flight += 1  # until delivered: counts against its buffer
            if self._encoder is None:
                await self._deliver(result, self._worker)
            else:  # the next turn denoises meanwhile
                task = asyncio.create_task(self._deliver(result, self._encoder))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
            self._turn_seconds = time.monotonic() - began
            # Denoise at most one turn ahead of the encoder, which then never waits for work: a chunk denoised while
            # more turns wait to be decoded would have its prompt and steps fixed that much longer before it is
            # shown, and a change that comes meanwhile would miss it.
            while len(self._deliveries) > 1:
                await asyncio.wait(self._deliveries, return_when=asyncio.FIRST_COMPLETED)

    async def _next(self) -> list[ServedStream]:
        """A stream to open, or the streams ready for a turn; sleeps until there are.

        A paced stream that will be due before this turn ends joins it (it would otherwise wait for the worker until
        then and be late): streams paced at the same rate share batched calls instead of drifting into turns of their
        own, and none runs further ahead of its viewer than one turn (expected to take as long as the latest)."""
        while True:
            self._wake.clear()
            now = time.monotonic()
            delays = [(stream.delay(now), stream) for stream in self._active if stream not in self._running]
            opening = next((stream for _, stream in delays if stream.session is None), None)
            if opening is not None:
                return [opening]
            hold = self._encoder_backlog(now) - self._turn_seconds
            if hold <= 0 and any(delay <= 0 for delay, _ in delays):
                ready = [stream for d, stream in sorted(delays, key=lambda d: d[0]) if d <= self._turn_seconds]
                if (viewers := self._viewers_per_turn()) is not None:
                    paced = [stream for stream in ready if stream.request.realtime][:viewers]
                    ready = [stream for stream in ready if stream in paced or not stream.request.realtime]
                turn = ready[: self.max_batch]
                for stream in turn:  # to the back of the line
                    self._active.remove(stream)
                    self._active.append(stream)
                return turn
            timeout = max(hold, min((delay for delay, _ in delays), default=math.inf))
            # `asyncio.timeout`, not `wait_for`: before Python 3.12, `wait_for` swallows a cancellation that comes as
            # the event is set, and a shutdown that cancelled this loop then waited for it forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                    await self._wake.wait()

    def _encoder_backlog(self, now: float) -> float:
        """With overlap, the seconds the encoder is expected to take for the chunks handed to it (the latest chunk's
        delivery time each, less what the one it is on has had). A turn starts no sooner than its chunks can be taken
        up when it ends: a chunk denoised earlier would only wait, its prompt and steps fixed that much longer before
        it is shown (a change meanwhile misses it); the encoder stays as busy."""
        chunks = sum(stream.in_flight for stream in self._held)
        if self._encoder is None or not chunks:
            return 0.0
        return chunks * self._delivery_seconds - min(self._delivery_seconds, now - self._delivering_since)

    def _viewers_per_turn(self) -> int | None:
        """With overlap, the most live viewers in one turn: as many chunks as the encoder delivers while the worker
        denoises a turn (the latest turn's time over the latest chunk's delivery), at least one; None: no limit.

        Where decoding is the slower half (a CPU), more would not be shown sooner, only denoised earlier, their
        prompts and steps fixed that much longer before they are shown (a change meanwhile misses them); where
        denoising is (a GPU), a turn batches as many as the encoder keeps up with. Recorders are not limited."""
        if self._encoder is None or not self._delivery_seconds:
            return None
        return max(1, int(self._turn_seconds / self._delivery_seconds))

    def _opened(self, stream: ServedStream, context: MediaChunk | None) -> None:
        if stream.closed:  # its client left while it opened
            self._settle(stream)
            return
        stream.push(self._started(stream))
        if context is not None:
            stream.put(context, time.monotonic())

    async def _deliver(self, denoised: list[Denoised], executor: ThreadPoolExecutor) -> None:
        """Decode and encode a turn's chunks as one job on the executor's one thread, so that each stream's chunks
        stay in order. A live viewer's chunk is handed to its connection piece by piece, each as soon as it is
        encoded, not when the whole turn is (its pacing keeps it in step with the others); a recorder's when the job
        ends, so that the turn's recorders become ready together and keep sharing batched calls."""
        loop = asyncio.get_running_loop()
        self._delivered(await loop.run_in_executor(executor, self._deliver_all, denoised, loop))

    def _deliver_all(
        self, denoised: list[Denoised], loop: asyncio.AbstractEventLoop
    ) -> list[tuple[Denoised, MediaChunk | Exception | None]]:
        """On the executor: every chunk decoded and encoded; the viewers' pieces handed over at once, the rest
        returned. A chunk is done with at its last piece, its failure, or its stream's end (None)."""
        later = []
        for chunk in denoised:
            start = self._delivering_since = time.monotonic()
            viewer = chunk.stream.request.realtime
            result: MediaChunk | Exception | None = None  # None: its client left; its memory is freed next
            try:
                for result in () if chunk.stream.closed else self.runner.deliver(chunk):
                    if viewer and not result.last:  # a piece: to its connection at once
                        loop.call_soon_threadsafe(self._delivered, [(chunk, result)])
            except Exception as e:  # noqa: BLE001 - any failure ends this stream, never the others
                result = e
            if isinstance(result, MediaChunk):
                self._delivery_seconds = time.monotonic() - start
            if viewer:
                loop.call_soon_threadsafe(self._delivered, [(chunk, result)])
            else:
                later.append((chunk, result))
        return later

    def _delivered(self, results: list[tuple[Denoised, MediaChunk | Exception | None]]) -> None:
        """On the loop: delivered chunks and pieces to their streams (or their failures), then the scheduler woken
        once, after the streams' connections (which `put` wakes), so that it plans its next turn once they have all
        taken their chunks: recorders delivered together stay together."""
        for chunk, result in results:
            stream = chunk.stream
            if not isinstance(result, MediaChunk) or result.last:
                stream.in_flight -= 1  # the chunk is done with
            if isinstance(result, Exception):
                self._fail(stream, result)
            elif stream.closed:
                self._settle(stream)
            else:
                stream.put(result, time.monotonic())
        self._wake.set()

    def _started(self, stream: ServedStream) -> dict[str, Any]:
        config = stream.session.config
        return event(
            "started",
            mode=stream.request.mode,
            codec=stream.encoder.codec,
            width=config.width,
            height=config.height,
            fps=config.fps,
            seed=stream.session.seed,
            steps=config.steps if stream.steps is None else stream.steps,
            context_frames=stream.frames,
            **_context(stream.session.context, stream.request.context),
        )

    def _fail(self, stream: ServedStream, e: Exception) -> None:
        if stream.closed:
            self._settle(stream)
            return
        if isinstance(e, MediaError):
            stream.push(error(ErrorCode.BAD_MEDIA, str(e)))
        else:
            log.exception("stream failed", exc_info=e)
            stream.push(error(ErrorCode.INTERNAL, f"generation failed: {type(e).__name__}"))
        self.close(stream, "error")

    async def shutdown(self) -> None:
        """Stop every stream (`stopped`, reason "shutdown"), let running chunks finish, free everything.

        Call after the `run` task is cancelled, so no new turn starts."""
        for stream in [*self._queue, *self._active]:
            self.close(stream, "shutdown")
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await asyncio.to_thread(self._worker.shutdown)
        if self._encoder is not None:
            await asyncio.to_thread(self._encoder.shutdown)
        for stream in list(self._held):
            self._held.discard(stream)
            self.runner.release(stream)
