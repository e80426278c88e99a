"""One server (`App`) and its websockets adapter: the live websocket, the web page, /healthz and /metrics on one
port; `streamgen serve`.

Everything protocol-shaped lives in `connection` and `scheduler`, and HTTP in `routes`; the adapter here only maps
websockets' handshake, messages and close onto them, as `asgi` does for an ASGI server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamgen.pipeline import StreamingPipeline

from .audience import Audience, Viewer
from .connection import ClientSessions, Connection, TokenBucket
from .metrics import Metrics
from .protocol import Limits
from .routes import WEB_ROOT, WEBSOCKET_PATH, Reply, Routes, allowed_hosts, watch_query
from .scheduler import Scheduler

SHUTDOWN_FLUSH_SECONDS = 2.0  # how long a graceful shutdown waits for clients to be told `stopped`
# How long leaving `serve_in_thread` waits for the server's shutdown (a running chunk finishes, then the flush) before
# it fails, naming what the server's loop still waits on.
SHUTDOWN_WAIT_SECONDS = 120.0


class LogThrottle(logging.Filter):
    """At most `burst` records, then `per_minute` a minute, with a count of those dropped: a client that makes
    every session fail must not flood the log with a traceback each."""

    def __init__(self, per_minute: float = 6, burst: int = 10) -> None:
        super().__init__()
        self._bucket = TokenBucket(per_minute / 60, burst)
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._bucket.take():
            self._dropped += 1
            return False
        if self._dropped:
            record.msg = f"{record.msg} ({self._dropped} similar records dropped before this one)"
            self._dropped = 0
        return True


logging.getLogger(Scheduler.__module__).addFilter(LogThrottle())  # where failed streams are logged


class App:
    """One server: a scheduler over one pipeline, the connections on it, and their metrics."""

    def __init__(
        self,
        pipe: StreamingPipeline,
        *,
        max_sessions: int = 2,
        token: str | None = None,
        origins: Sequence[str] = (),
        hosts: Iterable[str] = allowed_hosts(""),
        limits: Limits = Limits(),
        web_root: Path = WEB_ROOT,
        memory_budget: int | None = None,
        overlap: bool = False,
        max_batch: int | None = None,
        replica: str | None = None,
    ) -> None:
        """`origins`: pages of other sites allowed to open the websocket (the server's own host always is);
        `hosts`: the names the server may be reached as (`routes.allowed_hosts`); `memory_budget`, `overlap`,
        `max_batch`: see `Scheduler`; `replica`: this server's name among several (Ray Serve), told in `started`."""
        self.replica = replica
        self.scheduler = Scheduler(
            pipe,
            max_active=max_sessions,
            limits=limits,
            memory_budget=memory_budget,
            overlap=overlap,
            max_batch=max_batch,
        )
        self.metrics = Metrics(self._gauges, lambda: self.scheduler.runner.batch_sizes)
        self.limits = limits
        self.connections: set[Connection | Viewer] = set()
        self._runner: asyncio.Task[None] | None = None  # the scheduler's loop, from `start` to `shutdown`
        self.sessions = ClientSessions(limits.max_sessions_per_client)
        self.audience = Audience(limits)
        self.routes = Routes(
            metrics=self.metrics,
            health=self._health,
            connections=lambda: len(self.connections),
            watch=self.audience.check,
            max_connections=limits.max_connections,
            token=token,
            origins=origins,
            hosts=hosts,
            web_root=web_root,
        )

    async def serve(self, host: str, port: int, stop: asyncio.Event, on_listening: Callable[[int], None]) -> None:
        """Serve until `stop` is set, then shut down gracefully: every client is told `stopped`, a running chunk
        finishes, sessions are freed, sockets close with 1001 (going away). Raises OSError if it cannot listen."""
        async with serve(
            self._handle,
            host,
            port,
            process_request=self._route,
            compression=None,  # video does not compress; and no inflate bombs
            max_size=max(self.limits.max_message_bytes, self.limits.max_upload_bytes),
            max_queue=4,  # frames buffered per connection before TCP pushes back on the client
            server_header="streamgen",
        ) as server:
            self.start()
            on_listening(server.sockets[0].getsockname()[1])
            await stop.wait()
            await self.shutdown()

    def start(self) -> None:
        """Start generating: the scheduler's loop, on the running event loop (any transport's)."""
        self._runner = asyncio.create_task(self.scheduler.run())

    async def shutdown(self) -> None:
        """Every client is told `stopped` (reason "shutdown"), a running chunk finishes, sessions are freed, and
        what is left to send goes out (bounded); the transport then closes the sockets."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        await self.scheduler.shutdown()
        await asyncio.gather(*(connection.flush(SHUTDOWN_FLUSH_SECONDS) for connection in self.connections))

    def _gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "sessions_active": ("Sessions holding a generation slot.", self.scheduler.active),
            "sessions_queued": ("Sessions waiting for a slot.", self.scheduler.queued),
            "connections": ("Open websocket connections.", len(self.connections)),
            "session_bytes": ("Model memory (KV and decoder caches) held by sessions.", self.scheduler.nbytes),
            "memory_budget_bytes": ("Bytes sessions may reserve (--memory-budget).", self.scheduler.runner.memory_budget),
            "memory_reserved_bytes": ("Bytes reserved by admitted sessions (their most).", self.scheduler.runner.reserved),
            "viewers": ("Viewers watching a stream through its watch link.", self.audience.viewers),
        }

    def _health(self) -> dict:
        health = {"status": "ok", "active": self.scheduler.active, "queued": self.scheduler.queued}
        return health | ({"replica": self.replica} if self.replica is not None else {})

    def connect(
        self, send: Callable[[str | bytes], Awaitable[None]], client: str, watch: tuple[str, str] | None = None
    ) -> Connection | Viewer:
        """A new client connection (`client`: its address), counted until `disconnect`; with `watch` (the watch
        id and key of the websocket's query), a viewer of that stream."""
        if watch is not None:
            connection = Viewer(self.audience, *watch, send, self.metrics)
        else:
            connection = Connection(
                self.scheduler,
                send,
                self.metrics,
                client=client,
                sessions=self.sessions,
                audience=self.audience,
                replica=self.replica,
            )
        self.connections.add(connection)
        return connection

    async def disconnect(self, connection: Connection) -> None:
        self.connections.discard(connection)
        await connection.close()

    # -- websockets adapter --------------------------------------------------------------------------------
    async def _handle(self, websocket: ServerConnection) -> None:
        watch = watch_query(websocket.request.path)
        connection = self.connect(websocket.send, websocket.remote_address[0], watch)
        try:
            await connection.open()
            async for message in websocket:
                await connection.receive(message)
        except ConnectionClosed:
            pass
        finally:
            await self.disconnect(connection)

    def _route(self, websocket: ServerConnection, request: Request) -> Response | None:
        """None lets the websocket handshake go on; anything else is answered over plain HTTP."""
        reply = self.routes.route(request.method, request.path, request.headers.raw_items())
        return None if reply is None else _response(reply)


def _response(reply: Reply) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),  # websockets answers one request per connection
            *reply.header_items(),
        ]
    )
    return Response(reply.status, reply.reason, headers, reply.payload)


@dataclass
class Background:
    """A server running in a thread of this process."""

    app: App
    host: str
    port: int
    stop: Callable[[], None]  # callable from any thread: starts the graceful shutdown

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def websocket_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WEBSOCKET_PATH}"


@contextlib.contextmanager
def serve_in_thread(pipe: StreamingPipeline, host: str = "127.0.0.1", port: int = 0, **options) -> Iterator[Background]:
    """The server in a background thread with its own event loop, on a free port unless told otherwise: for tests,
    benchmarks and notebooks. Leaving the block shuts it down gracefully and waits for it."""
    listening = threading.Event()
    server: dict = {}

    async def run() -> None:
        app, stop, loop = App(pipe, **{"hosts": allowed_hosts(host), **options}), asyncio.Event(), asyncio.get_running_loop()

        def on_listening(bound: int) -> None:
            server.update(app=app, port=bound, stop=lambda: loop.call_soon_threadsafe(stop.set), loop=loop)
            listening.set()

        await app.serve(host, port, stop, on_listening)

    thread = threading.Thread(target=asyncio.run, args=(run(),), name="streamgen-server", daemon=True)
    thread.start()
    while not listening.wait(0.1):
        if not thread.is_alive():
            raise RuntimeError(f"the server could not start on {host}:{port}")
    loop = server.pop("loop")
    background = Background(host=host, **server)
    try:
        yield background
    finally:
        background.stop()
        thread.join(SHUTDOWN_WAIT_SECONDS)
        if thread.is_alive():
            waiting = asyncio.run_coroutine_threadsafe(_pending(), loop).result(10)
            raise RuntimeError(f"the server did not shut down in {SHUTDOWN_WAIT_SECONDS:.0f} s; waiting on:\n{waiting}")


async def _pending() -> str:
    """Where every other task of the running loop waits, down its chain of awaits: what a shutdown that does not end
    is stuck on."""

    def chain(awaited: Any) -> Iterator[str]:
        while (frame := getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)) is not None:
            yield f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        if awaited is not None:
            yield repr(awaited)[:200]

    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    return "\n".join(f"{task.get_name()}: " + " -> ".join(chain(task.get_coro())) for task in tasks)


def limits(args: argparse.Namespace) -> Limits:
    """The limits `streamgen serve` was given; the rest keep their defaults."""
    given = {name: getattr(args, name) for name in ("max_sessions_per_client", "max_pause_seconds")}
    return Limits(**{name: value for name, value in given.items() if value is not None})


def build(args: argparse.Namespace, replica: str | None = None) -> App:
    """The server `streamgen serve` describes: its model loaded, its limits, token, origins and hosts. Ray Serve
    replicas (`rayserve`) build theirs from the same arguments."""
    pipe = StreamingPipeline.load(args.model, args.device)
    size = {name: value for name in ("height", "width") if (value := getattr(args, name))}
    pipe.config = pipe.config.replace(**size)  # --height/--width: every session's default
    return App(
        pipe,
        max_sessions=args.max_sessions,
        token=args.token,
        origins=args.allow_origin or (),
        hosts=allowed_hosts(args.host, args.allow_host or ()),
        limits=limits(args),
        memory_budget=args.memory_budget,
        overlap=args.overlap,
        replica=replica,
    )


def main(args: argparse.Namespace) -> int:
    """`streamgen serve`: load the model, print the URL, serve until SIGINT or SIGTERM."""
    app = build(args)

    def listening(port: int) -> None:
        query = f"?token={args.token}" if args.token else ""
        config = app.scheduler.pipe.config
        print(
            f"streamgen serving {config.width}x{config.height} at {config.fps} fps on "
            f"http://{args.host}:{port}/{query} (websocket ws://{args.host}:{port}{WEBSOCKET_PATH})",
            flush=True,
        )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await app.serve(args.host, args.port, stop, listening)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
    except OSError as e:  # a busy port, an address not of this machine: one line, not a traceback
        raise RuntimeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print("streamgen serve: stopped", flush=True)
    return 0
