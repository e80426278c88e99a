"""Batched denoising across sessions equals each session alone; the chunk step never touches the host."""

from __future__ import annotations

import pytest
import torch

from streamgen import StreamConfig, StreamingPipeline, presets
from streamgen.engine import SinkWindow, StreamingEngine, TextCondition
from streamgen.engine.batch import DenoiseRequest, denoise_batch

# (prompt, seed, steps, guidance, chunks already generated alone): different prompts, budgets, cache lengths,
# one guided session (two rows), one fresh session (a 1-frame chunk: a group of its own).
SESSIONS = [
    ("a red circle", 1, 2, 1.0, 1),
    ("a blue square", 2, 4, 2.0, 2),
    ("a green triangle", 3, 1, 1.0, 3),
    ("a white star", 4, 3, 1.0, 0),
]


@pytest.fixture(scope="module")
def pipe():
    return StreamingPipeline(**presets.build("tiny"), config=StreamConfig(height=64, width=64, window=2))


def open_sessions(pipe):
    sessions = []
    for prompt, seed, steps, guidance, warm in SESSIONS:
        session = pipe.start_session(prompt, seed=seed, steps=steps, guidance_scale=guidance)
        for _ in range(warm):
            session.next_chunk(output_type="latent")
        sessions.append(session)
    return sessions


def test_batched_sessions_equal_each_session_alone(pipe):
    alone = open_sessions(pipe)
    expected = [[s.next_chunk(output_type="latent") for _ in range(2)] for s in alone]
    batched = open_sessions(pipe)
    calls = pipe.engine.model_calls
    got = [pipe.next_chunks(batched, output_type="latent") for _ in range(2)]
    # Per round: the 3-frame group runs max(2, 4, 1) = 4 calls, the fresh session's group 3; then 4 commits.
    assert pipe.engine.model_calls - calls == 4 + 3 + 4 + (4 + 4)
    for index, chunks in enumerate(expected):
        for round_, want in enumerate(chunks):
            torch.testing.assert_close(got[round_][index], want, atol=1e-5, rtol=0)
    assert [s.last_steps for s in batched] == [steps for _, _, steps, _, _ in SESSIONS]
    # The caches moved on identically too: the next chunk alone still matches.
    for a, b in zip(alone, batched):
        torch.testing.assert_close(
            b.next_chunk(output_type="latent"), a.next_chunk(output_type="latent"), atol=1e-5, rtol=0
        )


def test_a_session_cannot_be_batched_with_itself(pipe):
    session = pipe.start_session("a cat", seed=0)
    with pytest.raises(ValueError, match="one chunk"):
        pipe.next_chunks([session, session])


def test_no_host_tensors_or_syncs_in_the_chunk_step():
    """On the meta device any tensor from the host or any read of a value (`.item()`, a Python `if` on data)
    raises, so this is the CPU-only check that a CUDA chunk step does not stall on the host."""
    components = presets.build("tiny")
    engine = StreamingEngine(components["transformer"].to("meta"), components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32, device="meta"))
    caches = [engine.new_cache((8, 8), 3, SinkWindow(1, 1)) for _ in range(2)]
    for index in range(4):
        for cache in caches[: 1 + (index > 0)]:  # the second stream starts later: contexts of different lengths
            z = engine.denoise(
                cache, torch.randn(1, 3 if cache.chunks_committed else 1, 16, 8, 8, device="meta"), text, 2
            )
            engine.commit(cache, z, text)
    requests = [
        DenoiseRequest(cache, torch.randn(1, 3, 16, 8, 8, device="meta"), text, n) for cache, n in zip(caches, (1, 2))
    ]
    assert all(z.device.type == "meta" for z in denoise_batch(engine, requests))
