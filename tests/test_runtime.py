"""The chunk runner under the live server: batched sessions get their own frames, admission by memory, one copy
of the KV context, and "auto" budgets that yield to load. A tiny random model on loopback; every wait is bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np
import pytest

from streamgen import StreamingPipeline
from streamgen.runtime import Runner, Stream
from streamgen_client.client import StreamClient, record
from streamgen_server.app import serve_in_thread

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
TIMEOUT = 60


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(int)


async def next_of(client: StreamClient, kind: str) -> dict:
    while True:
        message = await client.receive()
        if isinstance(message, dict) and message["type"] == kind:
            return message


@pytest.mark.parametrize("overlap", [False, True])
def test_a_session_batched_with_another_gets_the_frames_it_gets_alone(
    pipe: StreamingPipeline, tmp_path: Path, overlap: bool
) -> None:
    async def session(url: str, name: str, seed: int, steps: int):
        async with await StreamClient.connect(url) as client:
            return await record(client, tmp_path / f"{name}.mp4", prompt=f"scene {seed}", chunks=4, seed=seed, steps=steps)

    async def together(url: str):
        return await asyncio.gather(session(url, "a", 5, 2), session(url, "b", 6, 3))

    with serve_in_thread(pipe, max_sessions=2, overlap=overlap) as server:
        batched, other = run(together(server.websocket_url))
        alone = run(session(server.websocket_url, "alone", 5, 2))
        batches = server.app.scheduler.runner.batch_sizes
    assert batches[2] >= 2  # the two streams shared transformer calls (their 3-frame chunks)
    assert any(chunk["batch"] == 2 for chunk in batched.chunks)
    assert all(chunk["batch"] == 1 for chunk in alone.chunks)
    assert [c["steps"] for c in batched.chunks] == [c["steps"] for c in alone.chunks] == [2] * 4
    a, b, c = decoded(batched.path), decoded(alone.path), decoded(other.path)
    assert a.shape == b.shape == (37, 64, 64, 3)
    assert np.abs(a - b).mean() < 0.5, "batching changed the session's frames"
    assert np.abs(a - c).mean() > 5, "different seeds should give different streams"


def test_admission_queues_a_session_over_the_memory_budget_until_memory_frees(pipe: StreamingPipeline) -> None:
    need = Runner(pipe).stream_bytes()
    with serve_in_thread(pipe, max_sessions=4, memory_budget=int(1.5 * need)) as server:
        scheduler = server.app.scheduler

        async def scenario():
            first, second = [await StreamClient.connect(server.websocket_url) for _ in range(2)]
            await first.start("first", seed=1)
            await next_of(first, "chunk")
            await second.start("second", seed=2)
            assert (await next_of(second, "queued"))["position"] == 1  # a slot is free, memory is not
            assert scheduler.runner.reserved == need and scheduler.active == 1
            assert 0 < scheduler.nbytes <= need
            await first.send("stop")
            await next_of(first, "stopped")
            await next_of(second, "started")
            await next_of(second, "chunk")
            assert scheduler.runner.reserved == need
            await second.close()
            await first.close()

        run(scenario())
        metrics = server.app.metrics.render()
        assert server.app.metrics.value("memory_budget_bytes") == int(1.5 * need)
    assert "streamgen_memory_reserved_bytes" in metrics and 'streamgen_batches_total{size="1"}' in metrics

    with serve_in_thread(pipe, memory_budget=need // 2) as server:

        async def refused():
            async with await StreamClient.connect(server.websocket_url) as client:
                await client.start("too big")
                return await next_of(client, "error")

        reply = run(refused())
    assert reply["code"] == "server_full" and "memory budget" in reply["message"]


def test_a_session_holds_one_copy_of_its_context_within_its_reservation(pipe: StreamingPipeline) -> None:
    runner = Runner(pipe)
    stream = Stream("a calm sea", seed=0, steps=1)
    assert runner.admit(stream)
    runner.open(stream)
    sizes = []
    for _ in range(10):  # past the window: chunks are evicted
        runner.turn([stream])
        sizes.append(stream.nbytes)
    cache = stream.session.cache
    assert cache.chunks_evicted > 0 and len(set(sizes[-3:])) == 1
    blocks = pipe.transformer.blocks
    heads, dim = blocks[0].attn1.heads, pipe.transformer.config.attention_head_dim
    one_copy = len(blocks) * 2 * heads * cache.capacity_tokens * dim * 4  # keys and values, float32, per layer
    latents = sum(chunk.nbytes for chunk in cache.chunks)
    assert cache.nbytes == one_copy + latents
    assert stream.nbytes == cache.nbytes + stream.session.decoder.nbytes <= stream.reserved == runner.reserved
    runner.release(stream)
    assert runner.reserved == 0 and stream.session is None


def test_auto_steps_yield_to_a_second_session(pipe: StreamingPipeline) -> None:
    """A target the first session meets with about 24 steps alone; a second session at the same target halves
    its fair share, so its budget must drop."""
    runner = Runner(pipe, memory_budget=2**30)
    first = Stream("first", seed=1, steps="auto", target_fps=16)
    runner.open(first)
    for _ in range(4):
        runner.turn([first])
    budget = first.session.budget
    frames = runner.turn([first])[0].frames
    target = 0.9 * frames / (budget.fixed_cost + 24 * budget.step_cost)
    first.set_budget("auto", target)
    alone = [runner.turn([first])[0].steps for _ in range(5)]
    second = Stream("second", seed=2, steps="auto", target_fps=target)
    runner.open(second)
    runner.turn([second])  # its first, 1-frame chunk
    shared = [runner.turn([first, second])[0].steps for _ in range(5)]
    assert min(alone[2:]) > 1 and max(shared[2:]) < min(alone[2:]), (alone, shared)
