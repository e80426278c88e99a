"""A live audience: one person steers a stream, many watch it.

The owner's `started` carries a watch link; a viewer opens `/ws?watch=<id>&key=<secret>` and receives the stream
read-only: the owner's `started`, then the init segment and the media from the next key frame on, the `chunk` stats,
`viewers` counts, and `stopped` when the owner's session ends. Media is encoded once: every viewer is sent the very
bytes the owner is, piece by piece as the owner is (one `segment` header encoded for all). Each viewer has its own
bounded queue and writer task, so the owner's connection only appends and never waits on a viewer; a viewer that
falls `viewer_buffer` chunks behind (it reads slowly, or not at all) loses its queue and starts again at the next
key frame, so it never holds up the stream or the other viewers, and never holds more than that in memory.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol
from .metrics import Metrics
from .protocol import ErrorCode, Limits, ProtocolError, event
from .scheduler import MediaChunk

Send = Callable[[str | bytes], Awaitable[None]]
Messages = tuple[str | bytes, ...]  # sent back to back: a `segment` header and its data never part
WATCH_ONLY = protocol.encode(protocol.error(ErrorCode.WATCH_ONLY, "a viewer cannot control the stream"))


def media_messages(chunk: MediaChunk, start: int = 0) -> Messages:
    """A chunk's (or a piece's) media from fragment `start` on (a key frame, for a viewer joining), as a `segment`
    header and its data; with the init segment, announced the same way, first when the chunk carries it."""
    init = [s for s in chunk.segments if s.init]
    fragments = [s for s in chunk.segments if not s.init]
    skipped = sum(s.frames for s in fragments[:start])
    data = b"".join(fragments[start:])
    header = protocol.segment(
        "context" if chunk.index is None else "chunk",
        chunk=chunk.index,
        first_frame=chunk.first_frame + skipped,
        frames=chunk.frames - skipped,
        keyframe=fragments[start].keyframe,
        nbytes=len(data),
    )
    announced = [(protocol.encode(protocol.segment("init", nbytes=len(s))), s) for s in init]
    return (*(m for pair in announced for m in pair), protocol.encode(header), data)


class Viewer:
    """One watcher's side of the protocol: what it is sent, in order, through a bounded queue; it controls nothing.

    The transport adapter creates it for a `/ws?watch=...` handshake instead of a `Connection`, with the same
    life cycle: `open()`, `receive()` per message, `close()`."""

    def __init__(self, audience: Audience, watch: str, key: str, send: Send, metrics: Metrics) -> None:
        self.audience, self.watch, self.key, self.metrics = audience, watch, key, metrics
        self._send = send
        self._queue: deque[tuple[bool, bool, Messages]] = deque()  # (is media, ends a chunk, messages)
        self._media = 0  # chunks whose media (their last piece) is in the queue
        self._count: int | None = None  # a viewer count to send: coalesced, the latest wins
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()  # set while everything queued is written
        self._broadcast: Broadcast | None = None
        self._writer: asyncio.Task[None] | None = None
        self.joined = False  # has had the init segment and a key frame: takes every chunk from here on

    async def open(self) -> None:
        self._writer = asyncio.create_task(self._write())
        try:
            self._broadcast = self.audience.join(self.watch, self.key, self)
        except ProtocolError as e:
            self.push(protocol.encode(protocol.error(e.code, e.message)))

    async def receive(self, message: str | bytes) -> None:
        if self._queue and self._queue[-1] == (False, False, (WATCH_ONLY,)):
            return  # told already: a flood of messages queues one answer
        self.push(WATCH_ONLY)

    async def close(self) -> None:
        if self._broadcast is not None:
            self._broadcast.leave(self)
            self._broadcast = None
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until what is queued, `stopped` included, is written: graceful shutdown."""
        if self._writer is not None:
            await asyncio.wait([asyncio.ensure_future(self._idle.wait())], timeout=timeout)

    # -- fed by the broadcast (never waits) ----------------------------------------------------------------
    def push(self, *messages: str | bytes, media: bool = False, ends: bool = True) -> None:
        """Queue messages; media (a chunk, or a piece of one that `ends` it or not) that would put this viewer
        `viewer_buffer` chunks behind drops its queued media instead, and it rejoins at the next key frame."""
        if media and self._media >= self.audience.limits.viewer_buffer:
            self._queue = deque(item for item in self._queue if not item[0])
            self._media, self.joined = 0, False
            self.metrics.viewer_dropped()
            return
        self._queue.append((media, media and ends, messages))
        self._media += media and ends
        self._changed.set()

    def tell_count(self, count: int) -> None:
        self._count = count
        self._changed.set()

    async def _write(self) -> None:
        while True:
            if self._queue:
                _, ends, messages = self._queue.popleft()
                self._media -= ends
                for message in messages:
                    await self._send(message)
            elif self._count is not None:
                count, self._count = self._count, None
                await self._send(protocol.encode(event("viewers", count=count)))
            else:
                self._changed.clear()
                self._idle.set()
                await self._changed.wait()
                self._idle.clear()


class Broadcast:
    """One stream's audience, fed by its owner's connection."""

    def __init__(self, audience: Audience, started: dict[str, Any], on_count: Callable[[int], None]) -> None:
        self.audience, self.started, self.on_count = audience, started, on_count
        self.id, self.key = secrets.token_urlsafe(9), secrets.token_urlsafe(18)
        self.viewers: set[Viewer] = set()
        self._init: Messages = ()  # the init segment, announced: what every joining viewer gets first

    @property
    def url(self) -> str:
        """The page in viewer mode; its websocket is `/ws` with the same query."""
        return f"/?watch={self.id}&key={self.key}"

    def publish(self, chunk: MediaChunk, messages: Messages) -> None:
        """Queue a chunk, or a piece of one, for every viewer: `messages` (`media_messages(chunk)`, as the owner is
        sent them) for all in step, and for those joining, the init segment then the chunk from its first key frame
        (if any) on."""
        if chunk.segments[0].init:
            self._init, messages = messages[:2], messages[2:]
        fragments = [s for s in chunk.segments if not s.init]
        key = next((i for i, s in enumerate(fragments) if s.keyframe), None)
        joining = (*self._init, *media_messages(chunk, key)[-2:]) if key is not None else ()
        for viewer in self.viewers:
            if viewer.joined:
                viewer.push(*messages, media=True, ends=chunk.last)
            elif joining:
                viewer.push(*joining, media=True, ends=chunk.last)
                viewer.joined = True

    def tell(self, message: dict[str, Any]) -> None:
        """An event for the viewers that follow the stream (a chunk's stats)."""
        text = protocol.encode(message)
        for viewer in self.viewers:
            if viewer.joined:
                viewer.push(text)

    def end(self, stopped: dict[str, Any]) -> None:
        """The owner's session is over: viewers are told `stopped`; the link stops working."""
        for viewer in self.viewers:
            viewer.push(protocol.encode(stopped))
        self.viewers.clear()
        self.audience.remove(self)

    def add(self, viewer: Viewer) -> None:
        viewer.push(protocol.encode(self.started))
        self.viewers.add(viewer)
        self._counted()

    def leave(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.discard(viewer)
            self._counted()

    def _counted(self) -> None:
        for viewer in self.viewers:
            viewer.tell_count(len(self.viewers))
        self.on_count(len(self.viewers))


class Audience:
    """Every live broadcast of one server, by watch id, and the viewer limits across them."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._broadcasts: dict[str, Broadcast] = {}

    @property
    def viewers(self) -> int:
        return sum(len(b.viewers) for b in self._broadcasts.values())

    def open(self, started: dict[str, Any], on_count: Callable[[int], None]) -> Broadcast:
        """A broadcast for a stream that has just started (`started`: its event, which viewers get first)."""
        broadcast = Broadcast(self, started, on_count)
        self._broadcasts[broadcast.id] = broadcast
        return broadcast

    def remove(self, broadcast: Broadcast) -> None:
        self._broadcasts.pop(broadcast.id, None)

    def check(self, watch: str, key: str) -> Broadcast:
        """The broadcast a watch link names, if its key is right and there is room; else `ProtocolError`."""
        broadcast = self._broadcasts.get(watch)
        if broadcast is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no live stream has this watch link (it may have ended)")
        if not hmac.compare_digest(key.encode(), broadcast.key.encode()):
            raise ProtocolError(ErrorCode.WRONG_KEY, "wrong key for this watch link")
        if len(broadcast.viewers) >= self.limits.max_viewers_per_session:
            raise ProtocolError(ErrorCode.SERVER_FULL, "this stream has as many viewers as it may have")
        if self.viewers >= self.limits.max_viewers:
            raise ProtocolError(ErrorCode.SERVER_FULL, "this server has as many viewers as it may have")
        return broadcast

    def join(self, watch: str, key: str, viewer: Viewer) -> Broadcast:
        broadcast = self.check(watch, key)
        broadcast.add(viewer)
        return broadcast

