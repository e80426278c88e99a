"""Issue 10, items 4 to 7, through a live server on loopback: DNS rebinding, slot hogging, a prompt no text encoder
takes, and HTTP edges. Raw HTTP goes over a plain socket, so a test can send what no client library would."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamgen import StreamingPipeline
from streamgen_client.client import StreamClient
from streamgen_server.app import Background, serve_in_thread
from streamgen_server.protocol import Limits
from streamgen_server.routes import allowed_hosts

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]
TIMEOUT = 30  # seconds for any one client conversation


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


async def next_of(client: StreamClient, *kinds: str) -> dict[str, Any]:
    """The next event of one of `kinds`, skipping media and other events."""
    while True:
        message = await client.receive()
        if isinstance(message, dict) and message["type"] in kinds:
            return message


def http(server: Background, request_line: str, headers: list[tuple[str, str]] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw request; `headers` default to a proper Host."""
    if headers is None:
        headers = [("Host", f"127.0.0.1:{server.port}")]
    lines = [request_line, *(f"{name}: {value}" for name, value in headers), "", ""]
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := sock.recv(65536):  # the server closes after one answer, unless it switches protocols
            data += chunk
            if data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {name.lower(): value for name, value in fields.items()}, body


def upgrade(server: Background, host: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    """Headers of a websocket handshake that names `host`."""
    return [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        *extra,
    ]


def code(body: bytes) -> str:
    return json.loads(body)["code"]


# -- 4. DNS rebinding ------------------------------------------------------------------------------------------
def test_only_the_hosts_the_server_is_reachable_as_are_served(pipe: StreamingPipeline) -> None:
    hosts = allowed_hosts("127.0.0.1", ["streamgen.lan"])
    with serve_in_thread(pipe, hosts=hosts) as server:
        port = server.port
        # A page of evil.example whose name now resolves to 127.0.0.1: same "origin" as Host, still refused.
        evil = f"evil.example:{port}"
        status, _, body = http(server, "GET /ws HTTP/1.1", upgrade(server, evil, ("Origin", f"http://{evil}")))
        assert (status, code(body)) == (403, "forbidden_host")
        for path in ("/", "/healthz", "/metrics"):  # every HTTP request, not only the handshake
            status, _, body = http(server, f"GET {path} HTTP/1.1", [("Host", evil)])
            assert (status, code(body)) == (403, "forbidden_host")
        # The names it is reachable as: bind address, localhost, an --allow-host name, any IP address.
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"streamgen.lan:{port}", "[::1]", "10.0.0.7"):
            status, _, _ = http(server, "GET /healthz HTTP/1.1", [("Host", host)])
            assert status == 200, host
        status, _, _ = http(server, "GET /ws HTTP/1.1", upgrade(server, f"streamgen.lan:{port}", ("Origin", f"http://streamgen.lan:{port}")))
        assert status == 101
        assert server.app.metrics.value("errors_total", code="forbidden_host") == 4


# -- 5. slot hogging -------------------------------------------------------------------------------------------
def test_a_paused_session_is_stopped_after_the_pause_limit(pipe: StreamingPipeline) -> None:
    """Two clients start then pause, holding both slots; a third waits only until the pause limit."""
    limits = Limits(max_pause_seconds=1.0)
    with serve_in_thread(pipe, max_sessions=2, limits=limits) as server:

        async def scenario() -> None:
            a, b, c = [await StreamClient.connect(server.websocket_url) for _ in range(3)]
            assert a.ready["limits"]["max_pause_seconds"] == 1.0
            for client in (a, b):
                await client.start("hold the slot", realtime=True)
                await next_of(client, "started")
                await client.send("pause")
                await next_of(client, "paused")
            await c.start("waiting")
            assert (await next_of(c, "queued", "started"))["type"] == "queued"
            for client in (a, b):  # told why, in a word the web page shows: "stopped (idle)"
                assert (await next_of(client, "stopped"))["reason"] == "idle"
            await next_of(c, "started")
            # Resuming in time keeps the session; the clock starts over at the next pause.
            await c.send("pause")
            await next_of(c, "paused")
            await asyncio.sleep(0.5)
            await c.send("resume")
            await next_of(c, "resumed")
            await asyncio.sleep(1.0)  # past the first pause's limit: the session must still be there
            await c.send("pause")
            assert (await next_of(c, "paused", "error"))["type"] == "paused"
            await a.start("back again")  # a stopped client may start anew
            await next_of(a, "started")
            for client in (a, b, c):
                await client.close()

        run(scenario())


def test_one_client_address_holds_at_most_its_share_of_sessions(pipe: StreamingPipeline) -> None:
    limits = Limits(max_sessions_per_client=2)
    with serve_in_thread(pipe, max_sessions=1, limits=limits) as server:

        async def scenario() -> None:
            clients = [await StreamClient.connect(server.websocket_url) for _ in range(3)]
            assert clients[0].ready["limits"]["max_sessions_per_client"] == 2
            for client in clients[:2]:  # one holds the slot, one waits: both count
                await client.start("mine")
                await next_of(client, "started", "queued")
            await clients[2].start("one too many")
            refused = await next_of(clients[2], "error")
            assert refused["code"] == "too_many_sessions"
            await clients[0].send("stop")
            await next_of(clients[0], "stopped")
            await clients[2].start("now there is room")  # the same connection, once one of the two ended
            await next_of(clients[2], "started", "queued")
            clients[1].websocket.transport.abort()  # leaving frees its share too
            while server.app.scheduler.active + server.app.scheduler.queued > 1:
                await asyncio.sleep(0.05)
            await clients[0].start("and again")
            assert (await next_of(clients[0], "started", "queued", "error"))["type"] != "error"
            for client in clients:  # unread media would hold up a close handshake
                client.websocket.transport.abort()

        run(scenario())


# -- 6. a prompt no text encoder takes; failures do not flood the log --------------------------------------------
def test_lone_surrogates_are_bad_messages_and_failures_log_sparingly(
    pipe: StreamingPipeline, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with serve_in_thread(pipe) as server:

        async def surrogates() -> None:
            async with await StreamClient.connect(server.websocket_url) as client:
                await client.websocket.send('{"type": "start", "prompt": "a \\ud800 cat"}')
                assert (await next_of(client, "error"))["code"] == "bad_message"
                await client.start("a cat")
                await next_of(client, "started")
                await client.websocket.send('{"type": "prompt", "prompt": "\\udfff"}')
                assert (await next_of(client, "error"))["code"] == "bad_message"
                await next_of(client, "chunk")  # the session goes on

        run(surrogates())

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a failure of the model")

        monkeypatch.setattr(pipe, "start_session", broken)

        async def failing_sessions() -> int:
            async with await StreamClient.connect(server.websocket_url) as client:
                for _ in range(40):
                    await client.start("fails")
                    assert (await next_of(client, "error"))["code"] == "internal"
                    await next_of(client, "stopped")
            return 40

        with caplog.at_level(logging.ERROR):
            run(failing_sessions())
        logged = [record for record in caplog.records if record.name == "streamgen_server.scheduler"]
        assert 1 <= len(logged) <= 10  # every failure answered, the log gets a few


# -- 7. HTTP edges and CLI errors ------------------------------------------------------------------------------
def test_http_edges_are_answered_not_crashed_on(pipe: StreamingPipeline) -> None:
    with serve_in_thread(pipe) as server:
        host = ("Host", f"127.0.0.1:{server.port}")
        status, _, body = http(server, f"GET /{'a' * 300} HTTP/1.1")
        assert (status, code(body)) == (404, "not_found")
        status, _, body = http(server, "GET / HTTP/1.1", [host, host])
        assert (status, code(body)) == (400, "bad_request")
        status, _, body = http(server, "GET / HTTP/1.1", [])
        assert (status, code(body)) == (400, "bad_request")
        origin = ("Origin", f"http://127.0.0.1:{server.port}")
        status, _, body = http(server, "GET /ws HTTP/1.1", upgrade(server, host[1], origin, origin))
        assert (status, code(body)) == (400, "bad_request")
        status, headers, body = http(server, "HEAD / HTTP/1.1")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 100
        for method in ("TRACE", "PROPFIND", "POST", "DELETE"):
            status, headers, body = http(server, f"{method} / HTTP/1.1")
            assert (status, headers["allow"], code(body)) == (405, "GET, HEAD", "method_not_allowed")
        status, headers, _ = http(server, "HEAD /ws HTTP/1.1")
        assert (status, headers["allow"]) == (405, "GET")
        status, _, body = http(server, "GET / HTTP/1.1")
        assert status == 200 and b"<video" in body  # and it still serves


def serve_command(model_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "streamgen.cli", "serve", "--model", str(model_dir), "--device", "cpu", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_and_busy_ports_are_one_line_errors(model_dir: Path) -> None:
    result = serve_command(model_dir, "--port", "99999")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --port: 99999 is not a TCP port" in result.stderr.splitlines()[-1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = serve_command(model_dir, "--port", str(busy.getsockname()[1]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot listen on 127.0.0.1" in errors[0] and "in use" in errors[0]


def test_serve_ray_without_the_ray_extra_is_a_one_line_error(model_dir: Path) -> None:
    """The plain server needs no Ray; asking for it without the extra says what to install."""
    hide_ray = "import sys; sys.modules['ray'] = None; from streamgen.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", hide_ray, "serve", "--ray", "--model", str(model_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--ray needs Ray Serve: pip install -e '.[ray]'" in result.stderr.splitlines()[-1]
