"""The ASGI adapter: the same server (`App`) behind any ASGI server: uvicorn, or Ray Serve's proxy (`rayserve`).

Same protocol, pages, /healthz and /metrics as the websockets adapter in `app`, through the same `routes` (one
implementation of the HTTP answers and handshake checks) and the same `Connection` per websocket: `AsgiApp(App(
pipe, ...))`. Plain ASGI, no framework: `routes` already does all the routing a framework would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .app import App
from .protocol import ErrorCode
from .routes import Reply, watch_query

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GOING_AWAY = 1001  # the close code of a server shutting down
POLICY_VIOLATION = 1008  # a refused handshake, where the ASGI server cannot send an HTTP answer (HTTP 403)


class AsgiApp:
    """An ASGI application serving one `App`: HTTP requests, websockets, and the lifespan (start and graceful
    shutdown of the scheduler)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._sockets: dict[object, Send] = {}  # open websockets (by connection): closed at shutdown
        self._shutdown: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match scope["type"]:
            case "http":
                await self._http(scope, send)
            case "websocket":
                await self._websocket(scope, receive, send)
            case "lifespan":
                await self._lifespan(receive, send)

    async def startup(self) -> None:
        self.app.start()

    async def shutdown(self) -> None:
        """Every session is told `stopped` (reason "shutdown"), then every websocket is closed with 1001. Once,
        however many ask (a drain, then the lifespan's end)."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._close())
        await asyncio.shield(self._shutdown)

    async def _close(self) -> None:
        await self.app.shutdown()
        for send in list(self._sockets.values()):
            try:
                await send({"type": "websocket.close", "code": GOING_AWAY})
            except Exception:  # noqa: BLE001 - the client left meanwhile: nothing to close
                pass

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        reply = self.app.routes.route(scope["method"], _target(scope), _headers(scope))
        if reply is None:  # a plain GET of the websocket's path
            reply = self.app.routes.refuse(426, ErrorCode.BAD_REQUEST, "this path takes websocket connections")
        await send({"type": "http.response.start", "status": reply.status, "headers": _raw(reply)})
        await send({"type": "http.response.body", "body": reply.payload})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = _target(scope)
        reply = self.app.routes.route("GET", target, _headers(scope))
        if (await receive())["type"] != "websocket.connect":
            return
        if reply is not None:
            await _deny(scope, send, reply)
            return
        await send({"type": "websocket.accept"})

        async def send_message(data: str | bytes) -> None:
            await send({"type": "websocket.send", "text" if isinstance(data, str) else "bytes": data})

        client = (scope.get("client") or ("", 0))[0]
        connection = self.app.connect(send_message, client, watch_query(target))
        self._sockets[connection] = send
        try:
            await connection.open()
            while (message := await receive())["type"] == "websocket.receive":
                text = message.get("text")
                await connection.receive(text if text is not None else message.get("bytes") or b"")
        except OSError:  # the client went away while a message was being written
            pass
        finally:
            self._sockets.pop(connection, None)
            await self.app.disconnect(connection)


async def _deny(scope: Scope, send: Send, reply: Reply) -> None:
    """Refuse a handshake with the HTTP answer `routes` gave, where the ASGI server can send one."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": reply.status, "headers": _raw(reply)})
        await send({"type": "websocket.http.response.body", "body": reply.payload})
    else:
        await send({"type": "websocket.close", "code": POLICY_VIOLATION})


def _target(scope: Scope) -> str:
    """The request's path and query, relative to where the app is mounted (Ray's route prefix: `root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    query = scope.get("query_string", b"").decode("latin-1")
    return (path.removeprefix(root) or "/") + (f"?{query}" if query else "")


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]


def _raw(reply: Reply) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.header_items()]
