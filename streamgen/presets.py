"""Random-weight model presets: the same classes as NVIDIA's checkpoints at sizes that fit a test or a benchmark.

A random model costs exactly what a trained one of its shape costs, so latency figures of `wan-1.3b` compare with
published ones; `tiny` is what the tests build offline in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AnyFlowFARTransformer3DModel, AutoencoderKLWan, FlowMapEulerDiscreteScheduler
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel


@dataclass(frozen=True)
class Preset:
    heads: int
    head_dim: int
    layers: int
    ffn_dim: int
    text_dim: int
    vae_base_dim: int
    height: int
    width: int


PRESETS: dict[str, Preset] = {
    # Tests: 64x64 video, 8x8 latents, a 2-layer transformer.
    "tiny": Preset(heads=2, head_dim=12, layers=2, ffn_dim=48, text_dim=32, vae_base_dim=3, height=64, width=64),
    # CPU benchmarks: about the default model's cost.
    "small": Preset(heads=4, head_dim=32, layers=4, ffn_dim=512, text_dim=64, vae_base_dim=8, height=128, width=128),
    # Wan2.1-1.3B's transformer at 832x480 (GPU benchmarks; same cost as the real weights).
    "wan-1.3b": Preset(
        heads=12, head_dim=128, layers=30, ffn_dim=8960, text_dim=4096, vae_base_dim=96, height=480, width=832
    ),
}


def build(name: str, seed: int = 0) -> dict:
    """Components of `AnyFlowFARPipeline` (transformer, vae, scheduler, text_encoder, tokenizer), random weights."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[name]
    torch.manual_seed(seed)
    transformer = AnyFlowFARTransformer3DModel(
        num_attention_heads=p.heads,
        attention_head_dim=p.head_dim,
        text_dim=p.text_dim,
        ffn_dim=p.ffn_dim,
        num_layers=p.layers,
        freq_dim=min(256, 16 * p.head_dim),
    )
    vae = AutoencoderKLWan(
        base_dim=p.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4] if name == "wan-1.3b" else [1, 1, 1, 1],
        num_res_blocks=2 if name == "wan-1.3b" else 1,
        temperal_downsample=[False, True, True],
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=384,
            d_model=p.text_dim,
            d_kv=8,
            d_ff=2 * p.text_dim,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": FlowMapEulerDiscreteScheduler(shift=5.0),
        "text_encoder": text_encoder.eval(),
        "tokenizer": ByT5Tokenizer(),
    }
