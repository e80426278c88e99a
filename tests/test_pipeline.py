"""StreamingPipeline and Session on tiny random components saved in diffusers' layout."""

from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
from diffusers import AnyFlowFARPipeline

from streamgen import StreamConfig, StreamingPipeline, presets
from streamgen.engine import SinkWindow
from streamgen.media import MediaError
from reference import padded_like_diffusers

PARTITION = [1, 3, 3, 3]
CONFIG = StreamConfig(height=64, width=64, steps=2, window=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    AnyFlowFARPipeline(**presets.build("tiny")).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pipe(saved):
    pipe = StreamingPipeline.from_pretrained(saved)
    pipe.config = CONFIG
    return pipe


def chunks_of(noise):
    start = 0
    for frames in PARTITION:
        yield noise[:, start : start + frames]
        start += frames


def reference_frames(pipe, **kwargs):
    out = pipe.as_reference()(
        height=64, width=64, chunk_partition=PARTITION, num_frames=37, output_type="np", **kwargs
    ).frames[0]
    return np.round(out * 255).astype(np.uint8)


def test_t2v_matches_reference_frame_for_frame(pipe):
    noise = torch.randn(1, 16, 10, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_frames(pipe, prompt="a red circle", num_inference_steps=2, latents=noise.clone())
    with padded_like_diffusers(pipe.transformer), pipe.start_session("a red circle", window=None) as session:
        frames = np.concatenate([session.next_chunk(noise=n) for n in chunks_of(noise.permute(0, 2, 1, 3, 4))])
    assert frames.shape == expected.shape == (37, 64, 64, 3)
    assert np.abs(frames.astype(int) - expected).max() <= 1


def test_v2v_matches_reference(pipe):
    clip = np.random.default_rng(0).integers(0, 256, (13, 64, 64, 3), dtype=np.uint8)  # 4 latent frames: [1, 3]
    noise = torch.randn(1, 16, 10, 8, 8, generator=torch.Generator().manual_seed(1))
    video = torch.from_numpy(clip).permute(0, 3, 1, 2)[None].float() / 255
    expected = reference_frames(pipe, prompt="a cat", num_inference_steps=2, latents=noise.clone(), video=video)
    with padded_like_diffusers(pipe.transformer), pipe.start_session("a cat", window=None, video=clip) as session:
        assert session.chunk_index == 2 and len(session.context_frames) == 13
        generated = [session.next_chunk(noise=n) for n in list(chunks_of(noise.permute(0, 2, 1, 3, 4)))[2:]]
        frames = np.concatenate([session.context_frames, *generated])
    assert np.abs(frames.astype(int) - expected).max() <= 1


def test_same_seed_same_frames_and_streaming_decode_equals_one_shot(pipe):
    runs = []
    for _ in range(2):
        with pipe.start_session("a blue square", seed=7) as session:
            runs.append([session.next_chunk(output_type="pt") for _ in range(3)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)
    with pipe.start_session("a blue square", seed=7) as session:
        latents = torch.cat([session.next_chunk(output_type="latent") for _ in range(3)], dim=1)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    one_shot = vae.decode(latents.permute(0, 2, 1, 3, 4) * std + mean, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(torch.cat(runs[0], dim=2), one_shot, atol=1e-4, rtol=0)


def test_every_budget_runs_and_calls_the_transformer_steps_plus_one_times(pipe):
    calls = []
    hook = pipe.transformer.condition_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pipe.start_session("a green triangle", seed=1) as session:
            for steps in range(1, 17):
                calls.clear()
                frames = session.next_chunk(steps=steps)
                assert len(calls) == steps + 1  # steps denoising calls + one cache update
                assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3)
    finally:
        hook.remove()


def test_prompt_switch_changes_frames_and_rebuilds_the_cache(pipe):
    def run(switch: bool):
        with pipe.start_session("a red circle", seed=3) as session:
            frames = [session.next_chunk() for _ in range(3)]
            if switch:
                session.set_prompt("a white square")
                new_text = session.text
                rebuilt = [(c.latents, c.keys) for c in (*session.cache.compressed, *session.cache.full)]
            frames += [session.next_chunk() for _ in range(2)]
        return frames, (new_text, rebuilt) if switch else None

    plain, _ = run(False)
    switched, (text, rebuilt) = run(True)
    for a, b in zip(plain[:3], switched[:3]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(plain[3], switched[3])
    # The cache now holds exactly what encoding the same clean chunks under the new prompt gives.
    fresh = pipe.engine.new_cache((8, 8), 3, SinkWindow())
    for latents, _ in rebuilt:
        pipe.engine.commit(fresh, latents, text)
    assert len(rebuilt) == 3
    for (_, keys), chunk in zip(rebuilt, (*fresh.compressed, *fresh.full)):
        for layer, key in enumerate(keys):
            torch.testing.assert_close(key, chunk.keys[layer], atol=1e-5, rtol=0)


def test_i2v_from_an_image_file(pipe, tmp_path):
    from PIL import Image

    path = tmp_path / "frame.png"
    Image.fromarray(np.full((100, 80, 3), 200, np.uint8)).save(path)
    with pipe.start_session("a circle", image=path, seed=0) as session:
        assert session.chunk_index == 1 and session.context_frames.shape == (1, 64, 64, 3)
        assert session.next_chunk().shape == (12, 64, 64, 3)


@pytest.mark.parametrize("bad", [b"", b"not a video at all", io.BytesIO(b"\x00" * 64), "/no/such/file.mp4"])
def test_bad_media_gives_clear_errors(pipe, bad):
    with pytest.raises(MediaError):
        pipe.start_session("x", video=bad)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="exactly one"):
        pipe.start_session()
    with pytest.raises(ValueError, match="steps"):
        pipe.start_session("x", steps=0)
    with pytest.raises(ValueError, match="height must be a multiple of"):
        pipe.start_session("x", height=70)
    with pipe.start_session("x") as session:
        with pytest.raises(ValueError, match="steps"):
            session.next_chunk(steps=-1)
        with pytest.raises(ValueError, match="noise"):
            session.next_chunk(noise=torch.randn(1, 3, 16, 8, 8))
        with pytest.raises(ValueError, match="output_type"):
            session.next_chunk(output_type="gif")


def test_closed_session_releases_memory(pipe):
    session = pipe.start_session("a red circle", seed=0)
    for _ in range(4):
        session.next_chunk()
    assert session.nbytes > 0
    session.close()
    assert session.nbytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        session.next_chunk()
    gc.collect()


def test_missing_component_is_named(tmp_path, saved):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        StreamingPipeline.from_pretrained(broken)


def test_save_pretrained_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    again = StreamingPipeline.from_pretrained(tmp_path / "copy")
    assert again.config == pipe.config
    for name, tensor in pipe.transformer.state_dict().items():
        torch.testing.assert_close(again.transformer.state_dict()[name], tensor)
    AnyFlowFARPipeline.from_pretrained(tmp_path / "copy")  # still a diffusers directory
