"""StreamingDecoder and encode_video against diffusers' own one-shot paths, on a tiny random Wan VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AnyFlowFARPipeline,
    AnyFlowFARTransformer3DModel,
    AutoencoderKLWan,
    FlowMapEulerDiscreteScheduler,
)
from diffusers.video_processor import VideoProcessor
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from streamgen.vae import StreamingDecoder, encode_video, to_uint8_frames


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    """10 normalised latent frames of an 8x8 (64x64-pixel) stream, transformer layout (B, F, C, h, w)."""
    return torch.randn(1, 10, 16, 8, 8, generator=torch.Generator().manual_seed(1))


def reference_decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """AnyFlowFARPipeline.__call__'s decode: de-normalise, then one-shot `vae.decode`."""
    z = latents.permute(0, 2, 1, 3, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(z / inv_std + mean, return_dict=False)[0]


def test_chunked_decode_equals_one_shot(vae: AutoencoderKLWan, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    chunks, start = [], 0
    for size in [1, 3, 3, 3]:
        chunks.append(decoder.decode(latents[:, start : start + size]))
        start += size
    assert [c.shape[2] for c in chunks] == [1, 12, 12, 12]
    assert chunks[0].shape == (1, 3, 1, 64, 64)
    reference = reference_decode(vae, latents)
    assert reference.shape == (1, 3, 37, 64, 64)
    torch.testing.assert_close(torch.cat(chunks, 2), reference, atol=1e-5, rtol=0)
    assert decoder.latent_frames == 10 and decoder.nbytes > 0


def test_reset_restarts_the_stream_and_close_frees(vae: AutoencoderKLWan, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    first = decoder.decode(latents[:, :2])
    decoder.reset()
    assert decoder.nbytes == 0
    torch.testing.assert_close(decoder.decode(latents[:, :2]), first, atol=0, rtol=0)
    with decoder:
        pass
    assert decoder.nbytes == 0
    with pytest.raises(RuntimeError):
        decoder.decode(latents[:, :1])


def test_uint8_frames_match_postprocess_video(vae: AutoencoderKLWan, latents: torch.Tensor) -> None:
    video = StreamingDecoder(vae).decode(latents[:, :2])
    expected = (VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")[0] * 255).round()
    frames = to_uint8_frames(video)
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, expected.astype(np.uint8))
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(2, 3, 1, 8, 8))


def test_decode_rejects_bad_shapes(vae: AutoencoderKLWan, latents: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae)
    with pytest.raises(ValueError, match="frames second"):
        decoder.decode(latents.permute(0, 2, 1, 3, 4))  # (B, C, F, h, w): the VAE's layout, not ours
    with pytest.raises(ValueError, match="frames second"):
        decoder.decode(latents[0])
    decoder.decode(latents[:, :1])
    with pytest.raises(ValueError, match="reset"):
        decoder.decode(latents[:, 1:2, :, :4])


@pytest.fixture(scope="module")
def pipe(vae: AutoencoderKLWan) -> AnyFlowFARPipeline:
    torch.manual_seed(0)
    transformer = AnyFlowFARTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=48, num_layers=2, freq_dim=32
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8
        )
    )
    return AnyFlowFARPipeline(
        tokenizer=ByT5Tokenizer(),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMapEulerDiscreteScheduler(shift=5.0),
    )


def test_encode_video_matches_pipeline(pipe: AnyFlowFARPipeline) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    as_float = frames.astype(np.float32) / 255.0
    with torch.no_grad():
        expected = pipe.encode_video(as_float, height=64, width=64)
    latents = encode_video(pipe.vae, frames)
    assert latents.shape == (1, 3, 16, 8, 8)
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)
    tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)
    torch.testing.assert_close(encode_video(pipe.vae, tensor), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((8, 64, 64, 3), np.uint8), "1 \\+ 4k"),
        (np.zeros((5, 64, 64, 4), np.uint8), "uint8"),
        (np.zeros((5, 64, 64, 3), np.float32), "uint8"),
        (np.zeros((5, 60, 64, 3), np.uint8), "multiples of 8"),
        (torch.zeros(5, 64, 64, 3), "float \\(T, 3, H, W\\)"),
        (torch.full((5, 3, 64, 64), -1.0), "\\[0, 1\\]"),
        ([np.zeros((64, 64, 3), np.uint8)], "numpy array or a torch tensor"),
    ],
)
def test_encode_video_rejects_bad_input(vae: AutoencoderKLWan, frames: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_video(vae, frames)
