"""`streamgen serve --ray` on a local Ray instance (2 CPUs, no dashboard): two replicas of the tiny model behind
Ray's HTTP proxy, driven with the same Python client as the plain server. Skipped when the `ray` extra is absent.

One deployment serves the module's tests in order; Ray is always shut down at the end."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

from ray import serve  # noqa: E402
from ray.serve.context import _get_global_client  # noqa: E402

from streamgen import cli  # noqa: E402
from streamgen_client.client import MAX_MESSAGE_BYTES, StreamClient, endpoint, record  # noqa: E402
from streamgen_server import rayserve  # noqa: E402



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
TIMEOUT = 60  # seconds for any one client conversation
SLOTS = 2  # --max-sessions per replica
METRICS_PORT = free_port()  # Ray's Prometheus endpoint


def run(coroutine, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def serve_args(*argv: str) -> argparse.Namespace:
    """`streamgen serve ...` as the real CLI parses it."""
    return cli.build_parser().parse_args(["serve", *argv])


@pytest.fixture(scope="module")
def deployment(model_dir: Path) -> Iterator[tuple[str, argparse.Namespace]]:
    """Two replicas on a local Ray instance (its metrics on METRICS_PORT); yields the proxy's websocket URL and
    the serve arguments."""
    argv = ["--ray", "--model", str(model_dir), "--device", "cpu", "--height", "64", "--width", "64"]
    args = serve_args(*argv, "--port", str(free_port()), "--replicas", "2", "--max-sessions", str(SLOTS))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _metrics_export_port=METRICS_PORT)  # fmt: skip
    try:
        rayserve.start(args)
        yield f"ws://127.0.0.1:{args.port}/ws", args
    finally:
        serve.shutdown()
        ray.shutdown()


def replicas() -> dict[str, dict[str, Any]]:
    """The deployment's replicas as the controller sees them: {replica id: details (state, pid, ...)}."""
    deployments = _get_global_client().get_serve_details()["applications"][rayserve.APP_NAME]["deployments"]
    return {replica["replica_id"]: replica for replica in deployments["Replica"]["replicas"]}


def frames_in(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


async def next_of(client: StreamClient, *kinds: str) -> dict[str, Any]:
    while True:
        message = await client.receive()
        if isinstance(message, dict) and message["type"] in kinds:
            return message


async def the_end(client: StreamClient) -> str:
    """How a stream ends for its client: "closed" (the socket), or an `error` or `stopped` message."""
    try:
        while True:
            message = await client.receive()
            if isinstance(message, dict) and message["type"] in ("error", "stopped"):
                return message["type"]
    except ConnectionClosed:
        return "closed"


async def started(url: str, prompt: str, open_timeout: float = 10) -> tuple[StreamClient, str]:
    """A live session, paced like a viewer: (client, the replica serving it). A handshake over every replica's
    capacity waits in Ray's proxy: `open_timeout` is how long the client lets it."""
    websocket = await connect(endpoint(url), open_timeout=open_timeout, max_size=MAX_MESSAGE_BYTES, compression=None)
    client = StreamClient(websocket, json.loads(await websocket.recv()))
    await client.start(prompt, realtime=True)
    return client, (await next_of(client, "started"))["replica"]


def test_streamgen_serve_ray_command_drains_on_sigterm(model_dir: Path) -> None:
    """`streamgen serve --ray` as a user runs it (its own local Ray instance): prints its URL, serves a session
    through the proxy, and on SIGTERM tells it `stopped` (reason shutdown) before Ray goes. Runs before the
    module's deployment exists, so that one Ray instance runs at a time."""
    port = free_port()
    command = [sys.executable, "-m", "streamgen.cli", "serve", "--ray", "--model", str(model_dir), "--device", "cpu",
               "--height", "64", "--width", "64", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in process.stdout:  # bounded by the test's timeout
            if "streamgen serving" in line:
                break
        assert f"ws://127.0.0.1:{port}/ws" in line

        async def session() -> None:
            client, replica = await started(f"ws://127.0.0.1:{port}/ws", "until the server goes")
            await next_of(client, "chunk")
            process.send_signal(signal.SIGTERM)
            assert (await next_of(client, "stopped"))["reason"] == "shutdown"
            await client.websocket.wait_closed()
            assert client.websocket.close_code == 1001

        run(session())
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sessions_are_spread_over_both_replicas_and_stream_whole(deployment, tmp_path: Path) -> None:
    url, _ = deployment

    async def session(i: int):
        async with await StreamClient.connect(url) as client:
            return await record(client, tmp_path / f"s{i}.mp4", prompt=f"scene {i}", chunks=4, seed=i)

    async def four():
        return await asyncio.gather(*(session(i) for i in range(4)))

    recordings = run(four())
    served_by = {next(e for e in r.events if e["type"] == "started")["replica"] for r in recordings}
    assert served_by == set(replicas())  # both replicas, each under its own id
    for recording in recordings:
        media = [s for s in recording.segments if s["kind"] != "init"]
        assert [s["chunk"] for s in media] == [c["chunk"] for c in recording.chunks] == [0, 1, 2, 3]
        assert [s["first_frame"] for s in media] == [0, 1, 13, 25]
        assert frames_in(recording.path) == recording.frames == 37


def test_each_replicas_metrics_reach_rays_metrics_endpoint(deployment) -> None:
    """Through the proxy `/metrics` is one replica's; Ray's endpoint has each replica's, tagged with its name.
    Every replica streams a chunk first, so the test stands alone."""
    url, _ = deployment
    names = set(replicas())

    async def a_chunk_on_every_replica() -> None:
        clients: list[tuple[StreamClient, str]] = []
        while {replica for _, replica in clients} != names:
            assert len(clients) < len(names) * SLOTS  # a full replica's next session goes to another
            clients.append(await started(url, f"metrics {len(clients)}"))
        for client, _ in clients:
            await next_of(client, "chunk")
            await client.close()

    run(a_chunk_on_every_replica())
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as response:
            text = response.read().decode()
        frames = [line for line in text.splitlines() if "streamgen_frames_sent_total{" in line]
        tagged = {replica for replica in names for line in frames if f'replica="{replica}"' in line}
        if tagged == names and all(float(line.rsplit(" ", 1)[1]) > 0 for line in frames):
            break
        assert time.monotonic() < deadline, frames
        time.sleep(2)


def test_a_websocket_counts_as_an_ongoing_request_so_the_one_over_capacity_waits(deployment) -> None:
    """With every slot of both replicas held, the next handshake waits in Ray's proxy (no replica accepts it)
    until a session ends; then it is served. Nothing is dropped."""
    url, _ = deployment

    async def scenario() -> None:
        held = [await started(url, f"hold {i}") for i in range(2 * SLOTS)]
        assert {replica for _, replica in held} == set(replicas())
        waiting = asyncio.create_task(StreamClient.connect(url))
        await asyncio.sleep(3.0)
        assert not waiting.done()  # not refused, not accepted: queued at the proxy
        first, _ = held.pop(0)
        await first.close()
        late = await asyncio.wait_for(waiting, 30)
        await late.start("finally", realtime=True)
        assert (await next_of(late, "started"))["replica"] in replicas()
        for client in [late, *(client for client, _ in held)]:
            client.websocket.transport.abort()

    run(scenario())


def test_a_killed_replica_ends_its_sessions_and_the_other_goes_on(deployment) -> None:
    url, _ = deployment

    async def scenario() -> None:
        sessions: dict[str, StreamClient] = {}
        extra: list[StreamClient] = []
        while len(sessions) < 2:  # one session on each replica
            client, replica = await started(url, "keep going")
            (extra if replica in sessions else []).append(client)
            sessions.setdefault(replica, client)
        for client in extra:
            client.websocket.transport.abort()
        (victim, doomed), (survivor, living) = sessions.items()
        pids = {replica: details["pid"] for replica, details in replicas().items()}
        rss = psutil.Process(pids[survivor]).memory_info().rss
        os.kill(pids[victim], signal.SIGKILL)
        assert await asyncio.wait_for(the_end(doomed), 30) in ("closed", "error", "stopped")  # no hang
        # The other replica's session goes on undisturbed...
        chunks = [await next_of(living, "chunk") for _ in range(3)]
        assert [c["chunk"] for c in chunks] == list(range(chunks[0]["chunk"], chunks[0]["chunk"] + 3))
        # ...and a new session is served.
        fresh, replica = await started(url, "after the fault")
        await next_of(fresh, "chunk")
        for client in (living, fresh):
            await client.send("stop")
            await next_of(client, "stopped")
            await client.close()
        grown = psutil.Process(pids[survivor]).memory_info().rss - rss
        assert grown < 64 * 2**20, f"the surviving replica grew by {grown / 2**20:.0f} MiB"

    run(scenario())


def test_a_replica_that_ray_stops_drains_its_sessions(deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaling down to one replica: the sessions of the replica that goes are told `stopped` (reason shutdown)
    and closed with 1001; the one that stays keeps streaming."""
    url, args = deployment
    deadline = time.monotonic() + 120
    while len([r for r in replicas().values() if r["state"] == "RUNNING"]) < 2:  # the killed one is back
        assert time.monotonic() < deadline, replicas()
        time.sleep(1)

    async def scenario() -> None:
        sessions: dict[str, StreamClient] = {}
        while len(sessions) < 2:
            client, replica = await started(url, "until the end")
            if replica in sessions:
                client.websocket.transport.abort()
            sessions.setdefault(replica, client)
        monkeypatch.setattr(args, "replicas", 1)
        await asyncio.to_thread(serve.run, rayserve.application(args), name=rayserve.APP_NAME, route_prefix="/")
        (kept,) = [replica for replica, details in replicas().items() if details["state"] == "RUNNING"]
        for replica, client in sessions.items():
            if replica == kept:
                await next_of(client, "chunk")
                await client.close()
            else:
                assert (await next_of(client, "stopped"))["reason"] == "shutdown"
                await client.websocket.wait_closed()
                assert client.websocket.close_code == 1001

    run(scenario())


def test_autoscaling_adds_a_replica_when_every_slot_is_taken(deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """One replica, then `--min-replicas 1 --max-replicas 2`: with its slots taken, a waiting connection makes
    Ray start a second replica, which serves it."""
    url, args = deployment
    monkeypatch.setattr(args, "replicas", 1)
    serve.run(rayserve.application(args), name=rayserve.APP_NAME, route_prefix="/")
    monkeypatch.setattr(args, "min_replicas", 1)
    monkeypatch.setattr(args, "max_replicas", 2)
    serve.run(rayserve.application(args), name=rayserve.APP_NAME, route_prefix="/")
    deadline = time.monotonic() + 60
    while len(running := [replica for replica, details in replicas().items() if details["state"] == "RUNNING"]) != 1:
        assert time.monotonic() < deadline, replicas()
        time.sleep(1)
    (first,) = running

    async def scenario() -> None:
        held = [await started(url, f"hold {i}") for i in range(SLOTS)]
        assert {replica for _, replica in held} == {first}
        late, replica = await started(url, "served by a new replica", open_timeout=90)  # Ray starts a replica
        assert replica != first and replica in replicas()
        for client in [late, *(client for client, _ in held)]:
            client.websocket.transport.abort()

    run(scenario(), timeout=120)
