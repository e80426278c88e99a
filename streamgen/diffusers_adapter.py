"""Every use of diffusers' private API, in one place.

The streaming engine runs diffusers' `AnyFlowFARTransformer3DModel` and `AutoencoderKLWan` module by module, which
their public `forward`s do not allow: a chunk's forward against our own cache (diffusers' `_forward_inference`
preallocates one finite video's cache), RoPE at explicit frame positions (`rope._build_freqs`), and a VAE decoder
whose causal feature cache outlives one `decode` call. Those pieces are private to diffusers and may move in any
release, so only this module touches them; the rest of streamgen calls the functions below.

`PRIVATE_API` lists each private name with the parameters we pass it; `tests/test_diffusers_adapter.py` checks
them against the installed diffusers, so an upgrade that moves one fails there, by name, rather than deep in a
forward. Checked against diffusers 0.42 (`pyproject.toml` pins the minor version).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AnyFlowFARTransformer3DModel, AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalRotaryPosEmbed, apply_rotary_emb

FAR = "diffusers.models.transformers.transformer_anyflow_far"
WAN_VAE = "diffusers.models.autoencoders.autoencoder_kl_wan"

# (module, qualified name, parameters we pass it by name or position): what diffusers does not promise to keep.
PRIVATE_API: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (FAR, "AnyFlowFARTransformer3DModel._unpack_latent_sequence", ("latents", "num_frames", "height", "width", "patch_size")),
    (FAR, "AnyFlowDualTimestepTextImageEmbeddingCausal.forward", ("timestep", "r_timestep", "encoder_hidden_states", "encoder_hidden_states_image", "far_cfg")),
    (FAR, "AnyFlowTransformerBlock.forward", ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb", "attention_mask", "kv_cache", "kv_cache_flag")),
    (FAR, "AnyFlowCausalAttnProcessor.__call__", ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb", "kv_cache", "kv_cache_flag")),
    (FAR, "AnyFlowCausalRotaryPosEmbed._build_freqs", ("device",)),
    (FAR, "AnyFlowCausalRotaryPosEmbed.avg_pool_complex", ("freq", "kernel_size", "stride")),
    (FAR, "apply_rotary_emb", ("hidden_states", "freqs")),
    (WAN_VAE, "WanCausalConv3d", ()),
    (WAN_VAE, "WanDecoder3d.forward", ("x", "feat_cache", "feat_idx", "first_chunk")),
    (WAN_VAE, "AutoencoderKLWan._encode", ("x",)),
    (WAN_VAE, "unpatchify", ("x", "patch_size")),
)  # fmt: skip

__all__ = [
    "AnyFlowCausalRotaryPosEmbed",
    "apply_rotary_emb",
    "compressed_frames",
    "condition",
    "decoder_cache",
    "decode_latent_frame",
    "embed",
    "encode_posterior",
    "output_head",
    "rope_axis_tables",
]


# -- the transformer, one piece of `_forward_inference` at a time ---------------------------------------------------
def embed(model: AnyFlowFARTransformer3DModel, latents: torch.Tensor, compressed: bool) -> torch.Tensor:
    """Tokens `(B, L, dim)` of latents `(B, F, C, h, w)`: 2x2 patches, or 1x4x4 for compressed context."""
    patches = model.far_patch_embedding if compressed else model.patch_embedding
    return patches(latents.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)


def condition(
    model: AnyFlowFARTransformer3DModel,
    t: torch.Tensor,
    r: torch.Tensor,
    text: torch.Tensor,
    full_frames: int,
    latent_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time and text conditioning of one forward whose last `full_frames` frames are at full resolution (the
    others compressed context): per-token time embedding, the blocks' modulation `(B, L, 6, dim)` and the text
    states. `t`, `r`: `(B, frames)` in scheduler units."""
    h, w = latent_size
    patch, down = model.config.patch_size, model.config.compressed_patch_size
    layout = {
        "num_full_frames": full_frames,
        "full_token_per_frame": (h // patch[1]) * (w // patch[2]),
        "compressed_token_per_frame": (h // down[1]) * (w // down[2]),
    }
    temb, proj, text_states, _ = model.condition_embedder(t, r, text, None, far_cfg=layout)
    return temb, proj.unflatten(2, (6, -1)), text_states


def run_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    text_states: torch.Tensor,
    modulation: torch.Tensor,
    freqs: torch.Tensor,
    mask: torch.Tensor | None,
    context: object,
    write: bool,
) -> torch.Tensor:
    """One transformer block; its self-attention processor receives `context` as `kv_cache` and `write` as
    `kv_cache_flag` (the block passes them on only when `context` is not None)."""
    return block(hidden, text_states, modulation, freqs, mask, context, write)


def output_head(
    model: AnyFlowFARTransformer3DModel,
    hidden: torch.Tensor,
    temb: torch.Tensor,
    frames: int,
    latent_size: tuple[int, int],
) -> torch.Tensor:
    """The velocity `(B, frames, C, h, w)` of the last `frames` frames' tokens (`hidden` holds only theirs)."""
    shift, scale = (model.scale_shift_table + temb.unsqueeze(2)).chunk(2, dim=2)
    hidden = (model.norm_out(hidden.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(hidden)
    h, w = latent_size
    return model._unpack_latent_sequence(model.proj_out(hidden), frames, h, w, model.config.patch_size[1])


def compressed_frames(model: AnyFlowFARTransformer3DModel, partition: Sequence[int]) -> int:
    """Frames of a training layout that diffusers' `_forward_train` turns into compressed context: the chunks
    beyond `full_chunk_limit` (training builds its inputs and dense mask to match)."""
    excess = max(0, len(partition) - model.config.full_chunk_limit)
    return sum(partition[:excess])


# -- RoPE ------------------------------------------------------------------------------------------------------------
def rope_axis_tables(
    rope: AnyFlowCausalRotaryPosEmbed, device: torch.device, compressed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The complex (time, height, width) frequency tables over all positions, complex-average-pooled over the
    compressed patch for compressed tokens, as diffusers' `_forward_compressed_frame` does."""
    table = rope._build_freqs(device)
    head = rope.attention_head_dim
    parts = table.split_with_sizes([head // 2 - 2 * (head // 6), head // 6, head // 6], dim=1)
    if compressed:
        down = [c // p for c, p in zip(rope.compressed_patch_size, rope.patch_size)]
        parts = [rope.avg_pool_complex(part, kernel_size=k, stride=k) for part, k in zip(parts, down)]
    return tuple(parts)


# -- the Wan VAE -----------------------------------------------------------------------------------------------------
def decoder_cache(vae: AutoencoderKLWan) -> list[torch.Tensor | str | None]:
    """An empty causal feature cache for the VAE's decoder: one slot per causal convolution."""
    return [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


def decode_latent_frame(vae: AutoencoderKLWan, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
    """Decode one latent frame (after `post_quant_conv`) against `cache`, which it updates, as `_decode` does;
    `first`: the stream's first frame (1 video frame out, 4 for every later one). Unpatchified."""
    out = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
    return out if vae.config.patch_size is None else unpatchify(out, patch_size=vae.config.patch_size)


def encode_posterior(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """The encoder's posterior parameters `(B, 2 z_dim, T, h, w)` of `(B, 3, T, H, W)` video in [-1, 1]."""
    return vae._encode(video)
