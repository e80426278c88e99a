"""A live audience: watch links, viewers that receive the owner's very bytes from a key frame on, slow viewers
dropped to the next key frame without holding anyone up, limits, refusals. Tiny model, loopback."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
from functools import partial
from typing import Any

import av
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from streamgen import StreamingPipeline
from streamgen_server.app import serve_in_thread
from streamgen_server.audience import Audience, Viewer
from streamgen_server.connection import ClientSessions, Connection
from streamgen_server.metrics import Metrics
from streamgen_server.protocol import Limits
from streamgen_server.scheduler import Scheduler

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
TIMEOUT = 60  # seconds for any one conversation
WATCHERS = 20


def decoded_frames(init: bytes, media: list[bytes]) -> int:
    """Frames PyAV decodes from an init segment and the fragments after it: what a player could show."""
    with av.open(io.BytesIO(init + b"".join(media))) as container:
        return sum(1 for _ in container.decode(video=0))


def media_of(messages: list[str | bytes]) -> list[tuple[dict[str, Any], bytes]]:
    """(`segment` header, data) pairs from a recorded conversation."""
    pairs = []
    for text, data in zip(messages, messages[1:]):
        if isinstance(text, str) and json.loads(text)["type"] == "segment":
            pairs.append((json.loads(text), data))
    return pairs


def events(messages: list[str | bytes], kind: str) -> list[dict[str, Any]]:
    return [m for m in (json.loads(t) for t in messages if isinstance(t, str)) if m["type"] == kind]


async def until(socket: ClientConnection, kind: str) -> dict[str, Any]:
    """The next text message of type `kind` on `socket` (others, media included, are skipped)."""
    while not events([message := await socket.recv()], kind):
        pass
    return json.loads(message)


async def start(owner: ClientConnection, prompt: str, realtime: bool = True) -> dict[str, Any]:
    """Start a one-step stream; its `started`."""
    await owner.send(json.dumps({"type": "start", "prompt": prompt, "steps": 1, "realtime": realtime}))
    return await until(owner, "started")


def watch_link(base: str, started: dict[str, Any]) -> str:
    """The websocket URL of a stream's watch link (`base`: the server's /ws)."""
    return base + started["watch_url"].removeprefix("/")


def test_twenty_watchers_all_decode_the_owners_bytes(pipe: StreamingPipeline) -> None:
    async def watch(url: str, chunks: int) -> list[str | bytes]:
        """A viewer's conversation until it has `chunks` chunks of media."""
        received: list[str | bytes] = []
        async with connect(url, max_size=None) as socket:
            while sum(isinstance(m, bytes) for m in received) < chunks + 1:  # + the init segment
                received.append(await socket.recv())
        return received

    async def scenario(base: str, metrics_url: str) -> None:
        async with connect(base) as owner:
            started = await start(owner, "a crowd watching")
            link, owned = started["watch_url"], []
            assert link.startswith("/?watch=") and "&key=" in link
            viewers = [asyncio.create_task(watch(watch_link(base, started), 2)) for _ in range(WATCHERS)]
            while not any(m.get("count") == WATCHERS for m in events(owned, "viewers")):  # the owner is told
                owned.append(await owner.recv())
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url, timeout=10).read().decode())
            assert f"streamgen_viewers {float(WATCHERS)}" in metrics.splitlines()  # prometheus_client's format
            watched = await asyncio.gather(*viewers)
            for _ in range(12):  # the owner's media for every piece of a chunk a viewer may have seen
                while not isinstance(owned[-1], bytes):
                    owned.append(await owner.recv())
                owned.append(await owner.recv())
        owners = {header["first_frame"]: data for header, data in media_of(owned) if header["kind"] == "chunk"}
        for conversation in watched:
            assert events(conversation, "started")[0]["watch_url"] == link
            (init, init_data), *media = media_of(conversation)
            assert init["kind"] == "init" and media[0][0]["keyframe"]  # joined at a key frame, after the init
            assert media[1][0]["first_frame"] == media[0][0]["first_frame"] + media[0][0]["frames"]  # in step
            assert media[1][1] == owners[media[1][0]["first_frame"]]  # the very bytes the owner got
            frames = decoded_frames(init_data, [data for _, data in media])
            assert frames == sum(header["frames"] for header, _ in media)

    with serve_in_thread(pipe) as server:
        asyncio.run(asyncio.wait_for(scenario(server.websocket_url, server.url + "metrics"), TIMEOUT))


def test_a_watcher_that_stops_reading_is_dropped_to_key_frames_and_delays_no_one(pipe: StreamingPipeline) -> None:
    """Below the sockets (whose kernel buffers would hold hundreds of tiny chunks): a viewer whose sends never
    complete is exactly a client that stopped reading."""

    async def scenario() -> None:
        limits, metrics = Limits(), Metrics(dict)
        scheduler = Scheduler(pipe, max_active=1, limits=limits)
        runner = asyncio.create_task(scheduler.run())
        audience = Audience(limits)
        owned: list[str | bytes] = []
        read: list[str | bytes] = []
        stalled: list[str | bytes] = []
        reading = asyncio.Event()

        async def record(into: list[str | bytes], message: str | bytes) -> None:
            into.append(message)

        async def stall(message: str | bytes) -> None:
            await reading.wait()
            stalled.append(message)

        owner = Connection(
            scheduler, partial(record, owned), metrics, client="owner", sessions=ClientSessions(1), audience=audience
        )
        await owner.open()
        await owner.receive(json.dumps({"type": "start", "prompt": "fast", "steps": 1, "realtime": False}))
        while not events(owned, "started"):
            await asyncio.sleep(0.01)
        link = events(owned, "started")[0]["watch_url"]
        watch, key = link.removeprefix("/?watch=").split("&key=")
        slow, fast = (Viewer(audience, watch, key, send, metrics) for send in (stall, partial(record, read)))
        await slow.open()
        await fast.open()
        start = len(events(owned, "chunk"))
        while len(events(owned, "chunk")) < start + 12:  # the owner goes on at full speed...
            await asyncio.sleep(0.01)
        assert not stalled and metrics.viewer_drops >= 1  # ...while the stalled viewer was dropped, again and again
        fast_media = [h for h, _ in media_of(read) if h["kind"] == "chunk"]
        assert all(b["first_frame"] == a["first_frame"] + a["frames"] for a, b in zip(fast_media, fast_media[1:]))
        assert len(fast_media) >= 10  # the reading viewer missed nothing

        reading.set()  # it reads again: what it gets is the init segment, then media from a key frame on
        await owner.receive(json.dumps({"type": "stop"}))
        while not events(stalled, "stopped"):
            await asyncio.sleep(0.01)
        (init, init_data), *media = media_of(stalled)
        assert init["kind"] == "init" and media[0][0]["keyframe"]
        assert decoded_frames(init_data, [data for _, data in media]) == sum(h["frames"] for h, _ in media)
        for viewer in (slow, fast):
            await viewer.close()
        await owner.close()
        runner.cancel()
        await scheduler.shutdown()
        assert audience.viewers == 0

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))


def test_watch_links_are_checked_and_viewers_control_nothing(pipe: StreamingPipeline) -> None:
    async def scenario(base: str) -> None:
        async with connect(base) as owner:
            started = await start(owner, "private")
            watch = started["watch_url"].removeprefix("/?watch=").split("&key=")[0]
            refusals = {f"?watch={watch}&key=wrong": 403, f"?watch={watch}": 403, "?watch=nope&key=x": 404}
            for query, status in refusals.items():
                with pytest.raises(InvalidStatus) as refused:
                    await connect(base + query)
                assert refused.value.response.status_code == status
                assert json.loads(refused.value.response.body)["type"] == "error"
            async with connect(watch_link(base, started)) as viewer:
                assert json.loads(await viewer.recv())["type"] == "started"
                await viewer.send(json.dumps({"type": "stop"}))  # a viewer cannot stop (or steer) the stream
                assert (await until(viewer, "error"))["code"] == "watch_only"
                await owner.send(json.dumps({"type": "stop"}))
                await until(viewer, "stopped")  # the owner's stop ends the broadcast for its viewers
            with pytest.raises(InvalidStatus) as ended:
                await connect(watch_link(base, started))
            assert ended.value.response.status_code == 404  # and the link with it

    with serve_in_thread(pipe) as server:
        asyncio.run(asyncio.wait_for(scenario(server.websocket_url), TIMEOUT))


def test_viewer_limits(pipe: StreamingPipeline) -> None:
    async def scenario(base: str) -> None:
        async with connect(base) as owner, connect(base) as other:
            link = watch_link(base, await start(owner, "popular"))
            other_link = watch_link(base, await start(other, "less popular"))
            async with connect(link), connect(link), connect(other_link):
                for full_link in (link, other_link):  # this stream's audience is full; then the server's
                    with pytest.raises(InvalidStatus) as full:
                        await connect(full_link)
                    assert full.value.response.status_code == 503
                    assert "as many viewers" in json.loads(full.value.response.body)["message"]

    with serve_in_thread(pipe, limits=Limits(max_viewers_per_session=2, max_viewers=3)) as server:
        asyncio.run(asyncio.wait_for(scenario(server.websocket_url), TIMEOUT))
