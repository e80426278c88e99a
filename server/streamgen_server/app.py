"""The websockets adapter: the live websocket, the web page, /healthz and /metrics on one port; `streamgen serve`.

Everything protocol-shaped lives in `connection` and `scheduler`; this module only maps websockets' handshake,
messages and close onto them, so another transport (an ASGI websocket) needs another adapter of this size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import hmac
import http
import json
import logging
import mimetypes
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamgen.pipeline import StreamingPipeline

from . import protocol
from .connection import Connection
from .metrics import Metrics
from .protocol import ErrorCode, Limits
from .scheduler import Scheduler

WEB_ROOT = Path(__file__).resolve().parents[2] / "clients" / "web"  # the project is installed editable
WEBSOCKET_PATH = "/ws"
SHUTDOWN_FLUSH_SECONDS = 2.0  # how long a graceful shutdown waits for clients to be told `stopped`


class App:
    """One server: a scheduler over one pipeline, the connections on it, and their metrics."""

    def __init__(
        self,
        pipe: StreamingPipeline,
        *,
        max_sessions: int = 2,
        token: str | None = None,
        origins: Sequence[str] = (),
        limits: Limits = Limits(),
        web_root: Path = WEB_ROOT,
        memory_budget: int | None = None,
        overlap: bool = False,
    ) -> None:
        """`origins`: pages of other sites allowed to open the websocket (the server's own host always is);
        `memory_budget`, `overlap`: see `Scheduler`."""
        self.scheduler = Scheduler(
            pipe, max_active=max_sessions, limits=limits, memory_budget=memory_budget, overlap=overlap
        )
        self.metrics = Metrics(self._gauges, lambda: self.scheduler.runner.batch_sizes)
        self.token, self.origins, self.limits, self.web_root = token, set(origins), limits, web_root
        self.connections: set[Connection] = set()

    async def serve(self, host: str, port: int, stop: asyncio.Event, on_listening: Callable[[int], None]) -> None:
        """Serve until `stop` is set, then shut down gracefully: every client is told `stopped`, a running chunk
        finishes, sessions are freed, sockets close with 1001 (going away)."""
        runner = asyncio.create_task(self.scheduler.run())
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
            on_listening(server.sockets[0].getsockname()[1])
            await stop.wait()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
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
        }

    async def _handle(self, websocket: ServerConnection) -> None:
        connection = Connection(self.scheduler, websocket.send, self.metrics)
        self.connections.add(connection)
        try:
            await connection.open()
            async for message in websocket:
                await connection.receive(message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(connection)
            await connection.close()

    # -- HTTP ----------------------------------------------------------------------------------------------
    def _route(self, websocket: ServerConnection, request: Request) -> Response | None:
        """None lets the websocket handshake go on; anything else is answered over plain HTTP."""
        url = urlsplit(request.path)
        if url.path == WEBSOCKET_PATH:
            return self._admit(request, parse_qs(url.query))
        if url.path == "/healthz":
            health = {"status": "ok", "active": self.scheduler.active, "queued": self.scheduler.queued}
            return _response(200, json.dumps(health).encode(), "application/json")
        if url.path == "/metrics":
            return _response(200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        name = "index.html" if url.path == "/" else url.path.removeprefix("/")
        page = self.web_root / name
        if "/" not in name and page.is_file():  # files of the web folder itself, nothing above or below it
            content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
            return _response(200, page.read_bytes(), content_type)
        return self._refuse(404, ErrorCode.NOT_FOUND, f"no such page: {url.path[:100]}")

    def _admit(self, request: Request, query: dict[str, list[str]]) -> Response | None:
        """Handshake checks: capacity, token (query parameter, as browsers cannot set headers), origin."""
        if len(self.connections) >= self.limits.max_connections:
            return self._refuse(503, ErrorCode.SERVER_FULL, "too many connections")
        if self.token is not None:
            given = query.get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return self._refuse(401, ErrorCode.UNAUTHORIZED, "missing or wrong token")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.origins and urlsplit(origin).netloc != request.headers.get("Host"):
            # A page of another site must not drive this server with its visitors' browsers.
            return self._refuse(403, ErrorCode.FORBIDDEN_ORIGIN, f"origin {origin[:100]} is not allowed")
        return None

    def _refuse(self, status: int, code: ErrorCode, message: str) -> Response:
        self.metrics.error(code)
        return _response(status, protocol.encode(protocol.error(code, message)).encode(), "application/json")


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),  # websockets answers one request per connection
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


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
        app, stop, loop = App(pipe, **options), asyncio.Event(), asyncio.get_running_loop()

        def on_listening(bound: int) -> None:
            server.update(app=app, port=bound, stop=lambda: loop.call_soon_threadsafe(stop.set))
            listening.set()

        await app.serve(host, port, stop, on_listening)

    thread = threading.Thread(target=asyncio.run, args=(run(),), name="streamgen-server", daemon=True)
    thread.start()
    while not listening.wait(0.1):
        if not thread.is_alive():
            raise RuntimeError(f"the server could not start on {host}:{port}")
    background = Background(host=host, **server)
    try:
        yield background
    finally:
        background.stop()
        thread.join()


def main(args: argparse.Namespace) -> int:
    """`streamgen serve`: load the model, print the URL, serve until SIGINT or SIGTERM."""
    from streamgen.cli import load_pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per HTTP request
    pipe = load_pipeline(args)
    size = {name: value for name in ("height", "width") if (value := getattr(args, name))}
    pipe.config = pipe.config.replace(**size)  # --height/--width: every session's default
    app = App(
        pipe,
        max_sessions=args.max_sessions,
        token=args.token,
        origins=getattr(args, "allow_origin", None) or (),
        memory_budget=args.memory_budget,
    )

    def listening(port: int) -> None:
        query = f"?token={args.token}" if args.token else ""
        config = pipe.config
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

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    print("streamgen serve: stopped", flush=True)
    return 0
