"""The streaming engine against diffusers' reference pipeline, and its cache's bounds."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, WanTransformer3DModel

from streamgen import presets
from streamgen.diffusers_adapter import apply_rotary_emb
from streamgen.engine import SinkWindow, StreamingEngine, TextCondition
from streamgen.engine.attention import StreamingAttnProcessor
from streamgen.engine.batch import DenoiseRequest, denoise_batch
from streamgen.engine.positions import rope_frequencies, rotate
from streamgen.models import load_transformer
from reference import padded_like_diffusers

PARTITION = [1, 3, 3, 3]
LATENT = (8, 8)  # 64x64 pixels


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same numbers whatever ran before it: no test depends on the order they run in."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def components():
    return presets.build("tiny")


@pytest.fixture(scope="module")
def reference(components):
    return AnyFlowFARPipeline(**components)


def stream(engine, noise, text, steps, window=None, sink=0):
    """Run the engine chunk by chunk over `noise` (B, F, C, h, w) cut as PARTITION."""
    cache = engine.new_cache(LATENT, 3, SinkWindow(sink, window))
    out, start = [], 0
    for frames in PARTITION:
        z = engine.denoise(cache, noise[:, start : start + frames], text, steps)
        engine.commit(cache, z, text)
        out.append(z)
        start += frames
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_engine_equals_reference_pipeline(reference, components, steps):
    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 16, sum(PARTITION), *LATENT, generator=torch.Generator().manual_seed(2))
    expected = reference(
        prompt_embeds=embeds,
        height=64,
        width=64,
        num_frames=4 * (sum(PARTITION) - 1) + 1,
        num_inference_steps=steps,
        chunk_partition=PARTITION,
        output_type="latent",
        latents=noise.clone(),
    ).frames.permute(0, 2, 1, 3, 4)
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    with padded_like_diffusers(engine.transformer):
        got, _ = stream(engine, noise.permute(0, 2, 1, 3, 4), TextCondition(embeds), steps)
    start = 0
    for frames in PARTITION:  # chunk by chunk, so a failure names the chunk
        torch.testing.assert_close(got[:, start : start + frames], expected[:, start : start + frames], atol=1e-4, rtol=0)
        start += frames
    # Without diffusers' unmasked zero padding (NVIDIA's own inference) the result is a different computation.
    plain, _ = stream(StreamingEngine(components["transformer"], components["scheduler"]), noise.permute(0, 2, 1, 3, 4), TextCondition(embeds), steps)
    assert (plain - expected).abs().max() > 1e-3


def test_engine_equals_reference_with_guidance(reference, components):
    embeds, negative = torch.randn(2, 1, 16, 32, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 16, sum(PARTITION), *LATENT, generator=torch.Generator().manual_seed(4))
    expected = reference(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        guidance_scale=3.0,
        height=64,
        width=64,
        num_frames=37,
        num_inference_steps=2,
        chunk_partition=PARTITION,
        output_type="latent",
        latents=noise.clone(),
    ).frames.permute(0, 2, 1, 3, 4)
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    with padded_like_diffusers(engine.transformer):
        got, _ = stream(engine, noise.permute(0, 2, 1, 3, 4), TextCondition(embeds, negative, 3.0), 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_incremental_update_equals_full_reencode(components):
    """After every chunk, the cache's keys/values per layer equal a from-scratch re-encode of the whole prefix."""
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow())
    for index in range(7):
        latents = torch.randn(1, 1 if index == 0 else 3, 16, *LATENT)
        engine.commit(cache, latents, text)
        incremental = [(c.keys, c.values) for c in (*cache.compressed, *cache.full)]
        scratch = copy.deepcopy(cache)
        engine.recache(scratch, text)  # encodes every retained chunk again, as the reference does
        for (keys, values), chunk in zip(incremental, (*scratch.compressed, *scratch.full)):
            for layer in range(len(keys)):
                torch.testing.assert_close(keys[layer], chunk.keys[layer], atol=1e-5, rtol=0)
                torch.testing.assert_close(values[layer], chunk.values[layer], atol=1e-5, rtol=0)
    assert len(cache.compressed) == 5 and len(cache.full) == 2


def test_cache_update_cost_is_bounded(components):
    """Each commit runs one forward over at most one compressed and `full_chunk_limit - 1` full chunks."""
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow())
    seen = []
    hook = components["transformer"].patch_embedding.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[2]))
    try:
        for index in range(12):
            seen.clear()
            engine.commit(cache, torch.randn(1, 1 if index == 0 else 3, 16, *LATENT), text)
            assert sum(seen) <= 6  # full-resolution frames encoded: never the prefix
    finally:
        hook.remove()


def test_bounded_memory_over_300_chunks(components):
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow(sink=1, window=4))
    sizes = []
    for index in range(300):
        noise = torch.randn(1, 1 if index == 0 else 3, 16, *LATENT)
        engine.commit(cache, engine.denoise(cache, noise, text, 1), text)
        sizes.append(cache.nbytes)
    assert len(cache.compressed) == 5 and cache.chunks_evicted == 300 - 2 - 5
    assert len(set(sizes[10:])) == 1, "cache bytes must be constant once the window is full"
    # 300 chunks = 898 latent frames, close to the 1024-frame RoPE table; positions stay compact.
    assert cache.context_frames == 1 + 4 * 3 + 2 * 3  # sink (the 1-frame first chunk) + window + full


def test_real_rotation_equals_diffusers_complex_rope(components):
    rope = components["transformer"].rope
    for compressed in (False, True):
        grid = (2, 2) if compressed else (4, 4)
        positions = torch.tensor([0, 5, 9])
        x = torch.randn(2, 2, len(positions) * grid[0] * grid[1], 12)
        table = rope_frequencies(rope, positions, grid, compressed, torch.device("cpu"))
        expected = apply_rotary_emb(x, torch.view_as_complex(table.double().contiguous()))
        torch.testing.assert_close(rotate(x, table), expected, atol=1e-6, rtol=0)


def test_bounded_cache_lives_in_fixed_slabs(components):
    """Once the window is full every chunk sees the same shapes at the same addresses (what static-shape
    compilation and CUDA graphs need), and writing the chunk's tokens into the slab changes no result: the
    batched path, which concatenates instead, gives the same latents."""
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow(sink=1, window=1))
    seen = []
    for index in range(8):
        noise = torch.randn(1, 1 if index == 0 else 3, 16, *LATENT)
        z = engine.denoise(cache, noise, text, 2)
        torch.testing.assert_close(denoise_batch(engine, [DenoiseRequest(cache, noise, text, 2)])[0], z, atol=0, rtol=0)
        engine.commit(cache, z, text)
        keys = cache.storage[0][0]
        assert keys.shape[2] == cache.capacity_tokens >= cache.length + 3 * 16
        seen.append((cache.length, keys.data_ptr(), cache.nbytes))
    assert len(set(seen[3:])) == 1


def test_the_context_is_held_once(components):
    """A bounded cache holds its slabs (one copy of the keys and values, pre-RoPE) and the retained latents, no
    more; that is its capacity, known before the stream starts; chunks read their keys out of the slabs."""
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow(sink=1, window=2))
    capacity = engine.cache_bytes(cache, rows=1)
    for index in range(8):
        engine.commit(cache, engine.denoise(cache, torch.randn(1, 1 if index == 0 else 3, 16, *LATENT), text, 1), text)
    layers, cfg = len(components["transformer"].blocks), components["transformer"].config
    slab = 2 * layers * cfg.num_attention_heads * cache.capacity_tokens * cfg.attention_head_dim * 4
    latents = sum(chunk.latents.numel() * 4 for chunk in cache.chunks)
    assert cache.nbytes == slab + latents
    # Capacity counts every retained chunk at its largest; here the sink is the 1-frame first chunk.
    assert capacity == slab + (1 + 2 + cache.full_limit) * 3 * 16 * 8 * 8 * 4 == cache.nbytes + 2 * 16 * 8 * 8 * 4
    start, end = cache.span(cache.full[-1])
    assert cache.full[-1].keys[0].shape[2] == end - start == 3 * 16
    assert cache.full[-1].keys[0].data_ptr() != cache.storage[0][0].data_ptr()  # a copy for inspection


def test_unbounded_window_fails_clearly_past_rope_table(components):
    """`window=None` keeps absolute positions (the reference's); past the RoPE table it says so, not crash."""
    torch.manual_seed(0)
    short = AnyFlowFARTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=48, num_layers=2, freq_dim=32, rope_max_seq_len=16
    )
    engine = StreamingEngine(short, components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow())
    with pytest.raises(ValueError, match="RoPE table"):
        for _ in range(6):
            engine.commit(cache, torch.randn(1, 3, 16, *LATENT), text)
    bounded = engine.new_cache(LATENT, 3, SinkWindow(sink=1, window=1))
    for _ in range(20):  # 60 latent frames through a 16-frame table: positions stay compact
        engine.commit(bounded, torch.randn(1, 3, 16, *LATENT), text)
    assert engine.denoise(bounded, torch.randn(1, 3, 16, *LATENT), text, 1).isfinite().all()


def test_any_step_count_and_call_count(components):
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    text = TextCondition(torch.randn(1, 16, 32))
    cache = engine.new_cache(LATENT, 3, SinkWindow())
    for steps in (1, 3, 7, 16):
        before = engine.model_calls
        z = engine.denoise(cache, torch.randn(1, 1, 16, *LATENT), text, steps)
        assert engine.model_calls - before == steps and torch.isfinite(z).all()
    assert [len(engine.schedule(n)) for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert engine.schedule(4)[0].t.item() == 1000.0 and engine.schedule(4)[-1].r.item() == 0.0


@pytest.mark.parametrize(
    "noise, message",
    [
        (torch.randn(1, 3, 16, 8), "5-d tensor"),
        (torch.randn(1, 3, 4, 8, 8), "do not match"),
        (torch.randn(1, 3, 16, 16, 16), "do not match"),
        (torch.randn(1, 4, 16, 8, 8), "1 to 3 latent frames"),
        (torch.randn(1, 3, 16, 8, 8, dtype=torch.float64), "float64"),
    ],
)
def test_bad_inputs_raise_clear_errors(components, noise, message):
    engine = StreamingEngine(components["transformer"], components["scheduler"])
    cache = engine.new_cache(LATENT, 3, SinkWindow())
    with pytest.raises(ValueError, match=message):
        engine.denoise(cache, noise, TextCondition(torch.randn(1, 16, 32)), 2)
    with pytest.raises(ValueError, match="steps"):
        engine.denoise(cache, torch.randn(1, 1, 16, 8, 8), TextCondition(torch.randn(1, 16, 32)), 0)
    with pytest.raises(ValueError, match="negative"):
        TextCondition(torch.randn(1, 16, 32), guidance_scale=2.0)


def test_checkpoints_saved_by_diffusers_load(tmp_path, components):
    StreamingEngine(components["transformer"], components["scheduler"])  # a model the engine runs saves as any other
    components["transformer"].save_pretrained(tmp_path / "far")
    loaded = load_transformer(tmp_path / "far")
    assert isinstance(loaded, AnyFlowFARTransformer3DModel)
    for name, tensor in components["transformer"].state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert all(isinstance(b.attn1.processor, StreamingAttnProcessor) for b in components["transformer"].blocks)

    torch.manual_seed(0)
    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=48, num_layers=2, freq_dim=32)
    wan.save_pretrained(tmp_path / "wan")
    teacher = load_transformer(tmp_path / "wan")
    assert isinstance(teacher, AnyFlowFARTransformer3DModel)
    state = teacher.state_dict()
    for name, tensor in wan.state_dict().items():
        torch.testing.assert_close(state[name], tensor)
    emb = teacher.condition_embedder
    torch.testing.assert_close(emb.delta_embedder.linear_1.weight, emb.time_embedder.linear_1.weight)
    # With r = t the student is the teacher: on one frame (where causal = bidirectional) it predicts Wan's velocity.
    x = torch.randn(1, 1, 16, *LATENT)
    embeds = torch.randn(1, 16, 32)
    t = torch.tensor([700.0])
    with torch.no_grad():
        expected = wan(x.permute(0, 2, 1, 3, 4), t, embeds, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        got = teacher(x, t[:, None], t[:, None], embeds, chunk_partition=[1], return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
