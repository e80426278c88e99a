"""HTTP on the server's port: the pages, /healthz, /metrics, and the checks a websocket handshake must pass.

Independent of the socket library: a transport adapter (websockets in `app`, ASGI in `asgi`) hands each request's
method, target and raw headers to `Routes.route` and either answers with the `Reply` it gets or, for `None`, goes
on with the websocket handshake. So both transports refuse exactly the same requests with the same answers.
"""

from __future__ import annotations

import dataclasses
import hmac
import http
import ipaddress
import json
import mimetypes
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import protocol
from .metrics import Metrics
from .protocol import ErrorCode, ProtocolError

WEB_ROOT = Path(__file__).resolve().parent / "web"  # the page ships as package data
WEBSOCKET_PATH = "/ws"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # names the server is always reachable as on its own machine
ANY_HOST = "*"  # `--allow-host '*'`: no Host check (behind a proxy that checks it)

Headers = Iterable[tuple[str, str]]  # raw (name, value) pairs, names in any case, repeats kept
# A refused watch link (`/ws?watch=ID&key=K`): HTTP status by the reason the audience gives.
WATCH_REFUSALS = {ErrorCode.NOT_FOUND: 404, ErrorCode.WRONG_KEY: 403, ErrorCode.SERVER_FULL: 503}


def watch_query(target: str) -> tuple[str, str] | None:
    """(watch id, key) of a viewer's websocket request `/ws?watch=ID&key=K`; None for anyone else's."""
    query = parse_qs(urlsplit(target).query)
    return (query["watch"][0], query.get("key", [""])[0]) if "watch" in query else None


@dataclasses.dataclass(frozen=True)
class Reply:
    """An HTTP answer; `headers` are the ones beyond Content-Type, Content-Length and the transport's own."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    head: bool = False  # the answer to a HEAD request: headers only

    @property
    def reason(self) -> str:
        return http.HTTPStatus(self.status).phrase

    @property
    def payload(self) -> bytes:
        """What goes on the wire after the headers."""
        return b"" if self.head else self.body

    def header_items(self) -> list[tuple[str, str]]:
        """Every header of the answer; Content-Length is the body's, also when a HEAD answer leaves it out."""
        return [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Cache-Control", "no-store"),
            *self.headers,
        ]


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names a request may name in `Host`: the bind address, this machine's loopback names, `extra`."""
    return frozenset(name.strip("[]").lower() for name in (bind, *LOCAL_HOSTS, *extra) if name)


class Routes:
    """The HTTP routes and handshake checks of one server; `health()` and `connections()` are read per request."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        health: Callable[[], dict],
        connections: Callable[[], int],
        max_connections: int,
        watch: Callable[[str, str], object] = lambda watch, key: None,
        token: str | None = None,
        origins: Iterable[str] = (),
        hosts: Iterable[str] = allowed_hosts(""),
        web_root: Path = WEB_ROOT,
    ) -> None:
        """`origins`: pages of other sites allowed to open the websocket (the server's own host always is).
        `hosts`: names the server may be reached as (`allowed_hosts`); IP addresses always pass. `watch(id, key)`
        raises `ProtocolError` for a watch link that must be refused."""
        self.metrics, self.health, self.connections, self.max_connections = metrics, health, connections, max_connections
        self.watch = watch
        self.token, self.origins, self.hosts = token, frozenset(origins), frozenset(hosts)
        # The web folder's own files, listed once: a request names one of these or nothing (no paths are built
        # from what a client sends, so no traversal and no file-system errors on odd names).
        self.pages = {page.name: page for page in web_root.iterdir() if page.is_file()} if web_root.is_dir() else {}

    def route(self, method: str, target: str, headers: Headers) -> Reply | None:
        """The answer to one request; None lets a websocket handshake on WEBSOCKET_PATH go on."""
        reply = self._route(method, target, headers)
        return dataclasses.replace(reply, head=True) if reply is not None and method == "HEAD" else reply

    def _route(self, method: str, target: str, headers: Headers) -> Reply | None:
        url = urlsplit(target)
        websocket = url.path == WEBSOCKET_PATH
        allowed = ("GET",) if websocket else ("GET", "HEAD")
        if method not in allowed:
            return self.refuse(405, ErrorCode.METHOD_NOT_ALLOWED, f"{method[:20]} is not allowed here", allow=allowed)
        values: dict[str, list[str]] = {"host": [], "origin": []}
        for name, value in headers:
            values.get(name.lower(), []).append(value)
        if len(values["host"]) != 1 or len(values["origin"]) > 1:
            return self.refuse(400, ErrorCode.BAD_REQUEST, "a request needs one Host header and at most one Origin")
        host = values["host"][0]
        if not self._host_allowed(host):
            # A name that resolves here only because someone rebound it (DNS rebinding): refuse before anything.
            return self.refuse(403, ErrorCode.FORBIDDEN_HOST, f"host {host[:100]!r} is not allowed; see --allow-host")
        if websocket:
            return self._admit(parse_qs(url.query), host, (values["origin"] or [None])[0], watch_query(target))
        if url.path == "/healthz":
            return Reply(200, json.dumps(self.health()).encode(), "application/json")
        if url.path == "/metrics":
            return Reply(200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        page = self.pages.get("index.html" if url.path == "/" else url.path.removeprefix("/"))
        if page is not None:
            return Reply(200, page.read_bytes(), mimetypes.guess_type(page.name)[0] or "application/octet-stream")
        return self.refuse(404, ErrorCode.NOT_FOUND, f"no such page: {url.path[:100]}")

    def _host_allowed(self, host: str) -> bool:
        if ANY_HOST in self.hosts:
            return True
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            return False
        try:
            ipaddress.ip_address(name)
            return True  # an address, not a name: no DNS involved, nothing to rebind
        except ValueError:
            return name in self.hosts

    def _admit(
        self, query: dict[str, list[str]], host: str, origin: str | None, watch: tuple[str, str] | None
    ) -> Reply | None:
        """Handshake checks: capacity, token (query parameter, as browsers cannot set headers), origin. A viewer's
        watch link carries its own secret, which stands in for the token."""
        if self.connections() >= self.max_connections:
            return self.refuse(503, ErrorCode.SERVER_FULL, "too many connections")
        if watch is not None:
            try:
                self.watch(*watch)
            except ProtocolError as e:
                return self.refuse(WATCH_REFUSALS[e.code], e.code, e.message)
        elif self.token is not None:
            given = query.get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return self.refuse(401, ErrorCode.UNAUTHORIZED, "missing or wrong token")
        if origin is not None and origin not in self.origins and urlsplit(origin).netloc != host:
            # A page of another site must not drive this server with its visitors' browsers.
            return self.refuse(403, ErrorCode.FORBIDDEN_ORIGIN, f"origin {origin[:100]} is not allowed")
        return None

    def refuse(self, status: int, code: ErrorCode, message: str, allow: Sequence[str] = ()) -> Reply:
        """An HTTP error whose body is the protocol's JSON `error` object, counted in the metrics."""
        self.metrics.error(code)
        extra = (("Allow", ", ".join(allow)),) if allow else ()
        return Reply(status, protocol.encode(protocol.error(code, message)).encode(), "application/json", extra)
